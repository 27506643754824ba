"""Interleaved A/B of one decode step of several bundles, in one process, plain ONNX Runtime.

    python samples/decode_step_ab.py BASELINE OTHER [OTHER ...] [--past 128] [--rounds 60]

``qcompile bench`` measures whole generations through onnxruntime-genai; this isolates the
graph: every bundle runs the same decode step (batch 1, one new token, ``--past`` cached
positions of random values) in blocks of ``--steps`` steps, bundles taking turns block by
block, so all of them see the same machine. Prints each bundle's median step time and its
speed relative to the first bundle as a paired ratio with a 95 % interval
(:func:`qcompile.runtimes.paired_ratio.paired_ratio`; > 1: faster than the first).
Bundles with a quantized cache are not supported (the step feeds float past tensors).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from qcompile.runtimes.generation import cache_slots, load_genai_config
from qcompile.runtimes.paired_ratio import paired_ratio


def decode_session(bundle: str, past: int, threads: int):
    """The bundle's session and the feeds of one decode step with ``past`` cached positions."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(f"{bundle}/model.onnx", options,
                                   providers=["CPUExecutionProvider"])
    head_size = load_genai_config(bundle)["model"]["decoder"]["head_size"]
    rng = np.random.default_rng(0)
    feeds = {"input_ids": np.array([[42]], dtype=np.int64),
             "attention_mask": np.ones((1, past + 1), dtype=np.int64)}
    for slot in cache_slots(session):
        if slot.dtype is not np.float32:
            raise SystemExit(f"{bundle}: cache input {slot.past} is not float32 (a quantized "
                             "cache); this A/B feeds float caches only, use qcompile bench")
        shape = list(slot.empty(1, head_size).shape)
        shape[slot.past_axis] = past
        feeds[slot.past] = rng.random(shape, dtype=np.float32)
    return session, feeds


def block_ms(session, feeds, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        session.run(None, feeds)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--steps", type=int, default=10, help="decode steps per timed block")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    sessions = [decode_session(b, args.past, args.threads) for b in args.bundles]
    for session, feeds in sessions:
        block_ms(session, feeds, 10)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(args.rounds):
        for i, (session, feeds) in enumerate(sessions):
            times[i].append(block_ms(session, feeds, args.steps))
    speeds = [[1 / t for t in series] for series in times]
    for bundle, series, speed in zip(args.bundles, times, speeds):
        line = f"{bundle}: median {statistics.median(series):.2f} ms/step"
        paired = paired_ratio(speed, speeds[0]) if speed is not speeds[0] else None
        if paired:
            line += (f", speed vs {args.bundles[0]}: {paired['ratio']:.3f} "
                     f"({paired['low']:.3f}-{paired['high']:.3f}), {paired['verdict']}")
        print(line)


if __name__ == "__main__":
    main()
