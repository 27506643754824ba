"""How much faster one bundle is than another, with an honest error bar.

On a shared machine single runs drift by +-10-20 % within a minute, so the ratio of two
medians can move several percent between invocations with nothing changed. ``bench`` runs the
two bundles in alternating rounds; the runs of one round share the machine's state, so the
per-round ratio cancels most of the drift. This module summarises those per-round ratios by
their geometric mean and a percentile-bootstrap 95 % interval (distribution-free and
deterministic: a fixed seed), and says whether the interval excludes 1.
"""

from __future__ import annotations

import math
import random
import statistics

__all__ = ["paired_ratio"]

BOOTSTRAP_SAMPLES = 4000
_SEED = 0


def _bootstrap_interval(logs: list[float], level: float) -> tuple[float, float]:
    rng = random.Random(_SEED)
    n = len(logs)
    means = sorted(statistics.fmean(rng.choices(logs, k=n)) for _ in range(BOOTSTRAP_SAMPLES))
    tail = (1 - level) / 2
    low = means[int(tail * (BOOTSTRAP_SAMPLES - 1))]
    high = means[math.ceil((1 - tail) * (BOOTSTRAP_SAMPLES - 1))]
    return math.exp(low), math.exp(high)


def paired_ratio(ours: list[float | None], theirs: list[float | None],
                 level: float = 0.95) -> dict | None:
    """Geometric mean of ``ours[i] / theirs[i]`` over rounds, its interval and a verdict.

    Args:
        ours, theirs: one figure per round, in round order (higher = better, e.g. tokens/s;
            pass inverted latencies for lower-is-better figures). Rounds where either is
            missing or not positive are skipped.
        level: coverage of the interval.

    Returns:
        ``{"ratio", "low", "high", "rounds", "verdict"}`` with verdict ``"ours faster"``,
        ``"ours slower"`` or ``"no measurable difference"``; None with fewer than 3 rounds.
    """
    logs = [math.log(a / b) for a, b in zip(ours, theirs)
            if a is not None and b is not None and a > 0 and b > 0]
    if len(logs) < 3:
        return None
    low, high = _bootstrap_interval(logs, level)
    verdict = ("ours faster" if low > 1 else "ours slower" if high < 1
               else "no measurable difference")
    return {"ratio": math.exp(statistics.fmean(logs)), "low": low, "high": high,
            "rounds": len(logs), "verdict": verdict}
