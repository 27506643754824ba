"""Paired speed ratios: the verdict must follow the data, and pairing must cancel drift."""

from __future__ import annotations

import random

from qcompile.runtimes.bench import _interleave
from qcompile.runtimes.paired_ratio import paired_ratio


def _drifting(rounds: int, speedup: float, noise: float, seed: int):
    """Two series sharing a machine whose speed drifts +-25 %, ours ``speedup`` times faster."""
    rng = random.Random(seed)
    ours, theirs = [], []
    for r in range(rounds):
        machine = 100 * (1 + 0.25 * ((r % 7) - 3) / 3)
        ours.append(machine * speedup * (1 + rng.uniform(-noise, noise)))
        theirs.append(machine * (1 + rng.uniform(-noise, noise)))
    return ours, theirs


def test_a_consistent_small_win_is_found_through_drift():
    ours, theirs = _drifting(21, 1.04, 0.01, seed=1)
    result = paired_ratio(ours, theirs)
    assert result["verdict"] == "ours faster"
    assert 1.0 < result["low"] <= result["ratio"] <= result["high"]
    assert abs(result["ratio"] - 1.04) < 0.01 and result["rounds"] == 21


def test_a_consistent_loss_is_reported_as_slower():
    ours, theirs = _drifting(21, 0.95, 0.01, seed=2)
    result = paired_ratio(ours, theirs)
    assert result["verdict"] == "ours slower" and result["high"] < 1.0


def test_equal_bundles_give_no_verdict():
    ours, theirs = _drifting(21, 1.0, 0.05, seed=3)
    result = paired_ratio(ours, theirs)
    assert result["verdict"] == "no measurable difference"
    assert result["low"] < 1.0 < result["high"]


def test_the_interval_is_deterministic_and_skips_missing_rounds():
    ours, theirs = _drifting(9, 1.0, 0.05, seed=4)
    first = paired_ratio(ours + [None], theirs + [50.0])
    assert first == paired_ratio(ours, theirs) and first["rounds"] == 9
    assert paired_ratio([1.0, 2.0], [1.0, 2.0]) is None  # too few rounds for an interval


class _Worker:
    def __init__(self, name: str, log: list[str]):
        self.name, self.log, self.count = name, log, 0

    def run(self) -> dict:
        self.log.append(self.name)
        self.count += 1
        return {"worker": self.name, "run": self.count}


def test_rounds_alternate_order_and_keep_runs_with_their_worker():
    log: list[str] = []
    a, b = _Worker("a", log), _Worker("b", log)
    timed = _interleave([a, b], 4)
    assert log == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then 4 rounds
    assert [r["worker"] for r in timed[0]] == ["a"] * 4
    assert [r["run"] for r in timed[1]] == [2, 3, 4, 5]
