"""``bench``: prefill latency, decode speed, peak memory and cache size of a bundle (vs another).

Each bundle is loaded in its own fresh worker process (``python -m qcompile.runtimes.bench
--worker``), so its peak RSS is its own and not the other bundle's or the parent's (the worker
reads its ``VmHWM``; see :func:`_peak_rss_bytes`). Nothing the worker imports loads
torch (``qcompile`` itself is torch-free, see ``tests/test_import_structure.py``), so the peak is
the runtime's; ``baseline_rss_bytes`` is the bare
interpreter's, before ONNX Runtime and the model are loaded. With two bundles the parent
runs the two warm workers in rounds, one run each, so both share the machine's noise; the order
flips every round (A B, B A, ...) so neither bundle always runs right after the other, and each
figure is the median of the runs after one warm-up run. The decode and
prefill ratios also come as paired estimates with a 95 % interval
(:func:`qcompile.runtimes.paired_ratio.paired_ratio`), which says whether a difference is larger
than the machine's noise. Both bundles run on the same engine with the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

from qcompile.errors import QcompileError

__all__ = ["BenchWorker", "bench", "bench_prompt", "main", "measure_once"]

DEFAULT_PROMPT_TOKENS = 128
DEFAULT_NEW_TOKENS = 128

# --------------------------------------------------------------------------- in the worker


def _load_engine(bundle: str, engine: str, threads: int):
    if engine == "genai":
        from qcompile.runtimes.genai_session import GenaiSession

        return GenaiSession(bundle, threads)
    from qcompile.runtimes.generation import OrtGenerator

    return OrtGenerator(bundle, threads, require_tokenizer=False)


def measure_once(runner, prompt_ids: list[int], new_tokens: int) -> dict:
    """One greedy generation of exactly ``new_tokens`` tokens (eos ignored), timed.

    Prefill is the time to the first new token (prompt forward + token choice); decode speed
    counts the remaining ``new_tokens - 1`` steps only.
    """
    start = time.perf_counter()
    first = last = None
    count = 0
    for _ in runner.stream(prompt_ids, new_tokens, None, stop_at_eos=False):
        last = time.perf_counter()
        first = first or last
        count += 1
    decode_s = last - first
    return {"prefill_ms": 1000 * (first - start), "tokens": count,
            "decode_tok_s": (count - 1) / decode_s if count > 1 and decode_s > 0 else None}


def _peak_rss_bytes() -> int:
    """This process's RSS high-water mark.

    ``VmHWM`` of /proc/self/status where it exists: ``ru_maxrss`` survives fork + exec on Linux,
    so a worker spawned by a parent holding torch would report the parent's peak.
    """
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker_main(bundle: str, engine: str, threads: int) -> None:
    """Serve ``run`` / ``stats`` / ``quit`` lines on stdin with JSON lines on the real stdout.

    The first stdin line is ``{"prompt_ids": [...], "new_tokens": N}``. Native libraries'
    stdout noise is redirected to stderr so the reply channel stays clean.
    """
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    setup = json.loads(sys.stdin.readline())
    baseline = _peak_rss_bytes()
    try:
        runner = _load_engine(bundle, engine, threads)
    except QcompileError as exc:
        reply.write(json.dumps({"error": exc.problem, "hint": exc.hint}) + "\n")
        reply.flush()
        return
    reply.write(json.dumps({"ready": True}) + "\n")
    reply.flush()
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            result = measure_once(runner, setup["prompt_ids"], setup["new_tokens"])
        elif command == "stats":
            result = {"peak_rss_bytes": _peak_rss_bytes(), "baseline_rss_bytes": baseline}
        else:
            return
        reply.write(json.dumps(result) + "\n")
        reply.flush()


# --------------------------------------------------------------------------- in the parent


class BenchWorker:
    """A worker process with one bundle loaded, driven line by line."""

    def __init__(self, bundle: pathlib.Path, engine: str, threads: int,
                 prompt_ids: list[int], new_tokens: int):
        self.bundle = bundle
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qcompile.runtimes.bench", "--worker", str(bundle),
             "--engine", engine, "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        self._send(json.dumps({"prompt_ids": prompt_ids, "new_tokens": new_tokens}))
        ready = self._receive()
        if "error" in ready:
            self.close()
            raise QcompileError(ready["error"], ready.get("hint", ""))

    def _send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def _receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            raise RuntimeError(f"bench worker for {self.bundle} died "
                               f"(exit {self.process.returncode}):\n"
                               f"{self.process.stderr.read()[-3000:]}")
        return json.loads(line)

    def run(self) -> dict:
        self._send("run")
        return self._receive()

    def stats(self) -> dict:
        self._send("stats")
        return self._receive()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self._send("quit")
            except (BrokenPipeError, OSError):
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            stream.close()


def bench_prompt(bundle: pathlib.Path, prompt_tokens: int) -> list[int]:
    """The first ``prompt_tokens`` ids of the default evaluation text, by the bundle's tokenizer.

    Texts shorter than that (tiny vocabularies) are repeated.
    """
    from qcompile.runtimes.generation import load_tokenizer
    from qcompile.text_data import token_ids

    ids = [int(i) for i in token_ids(load_tokenizer(bundle), None, "evaluation")]
    if not ids:
        raise QcompileError(f"the tokenizer of {bundle} gives no tokens for the default text",
                            "check the bundle's tokenizer files")
    while len(ids) < prompt_tokens:
        ids = ids + ids
    return ids[:prompt_tokens]


def _check_setup(bundles: list[pathlib.Path], prompt_tokens: int, new_tokens: int) -> None:
    from qcompile.bundle.files import check_bundle_files
    from qcompile.runtimes.generation import load_genai_config

    vocabs = set()
    for bundle in bundles:
        check_bundle_files(bundle)
        model = load_genai_config(bundle)["model"]
        vocabs.add(model.get("vocab_size"))
        context = model.get("context_length")
        if context and prompt_tokens + new_tokens > context:
            raise QcompileError(f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} "
                                f"exceeds the context length {context} of {bundle}",
                                "lower --prompt-tokens or --new-tokens")
    if len(vocabs) > 1:
        raise QcompileError(f"the bundles have different vocabularies ({sorted(vocabs)}), so "
                            "the same prompt ids cannot be fed to both",
                            "compare bundles of the same model")


def _summary(bundle: pathlib.Path, runs: list[dict], stats: dict) -> dict:
    from qcompile.bundle.files import model_bytes
    from qcompile.runtimes.generation import bundle_cache_bytes_per_token

    prefill = [r["prefill_ms"] for r in runs]
    decode = [r["decode_tok_s"] for r in runs]  # None where a run had no timed decode step
    measured = [v for v in decode if v is not None]
    return {
        "path": str(bundle),
        "prefill_ms": statistics.median(prefill),
        "decode_tok_s": statistics.median(measured) if measured else None,
        "prefill_ms_runs": [round(v, 3) for v in prefill],
        "decode_tok_s_runs": [None if v is None else round(v, 3) for v in decode],  # by round
        "peak_rss_bytes": stats["peak_rss_bytes"],
        "baseline_rss_bytes": stats["baseline_rss_bytes"],
        "cache_bytes_per_token": bundle_cache_bytes_per_token(bundle),
        "model_bytes": model_bytes(bundle),
    }


def _paired(ours: dict, theirs: dict) -> dict:
    """Per-round ratios (decode speed, prefill speed) with their interval; see paired_ratio."""
    from qcompile.runtimes.paired_ratio import paired_ratio

    def inverse(values):
        return [1 / v if v else None for v in values]

    return {
        "decode_tok_s_ours_over_theirs": paired_ratio(ours["decode_tok_s_runs"],
                                                      theirs["decode_tok_s_runs"]),
        "prefill_latency_theirs_over_ours": paired_ratio(inverse(ours["prefill_ms_runs"]),
                                                         inverse(theirs["prefill_ms_runs"])),
    }


def _ratios(ours: dict, theirs: dict) -> dict:
    def div(a, b):
        return a / b if a is not None and b else None

    return {
        "decode_tok_s_ours_over_theirs": div(ours["decode_tok_s"], theirs["decode_tok_s"]),
        "prefill_latency_theirs_over_ours": div(theirs["prefill_ms"], ours["prefill_ms"]),
        "peak_rss_ours_over_theirs": div(ours["peak_rss_bytes"], theirs["peak_rss_bytes"]),
        "cache_bytes_per_token_ours_over_theirs": div(ours["cache_bytes_per_token"],
                                                      theirs["cache_bytes_per_token"]),
        "model_bytes_ours_over_theirs": div(ours["model_bytes"], theirs["model_bytes"]),
    }


def bench(bundle, vs=None, engine: str = "auto", runs: int = 5,
          prompt_tokens: int = DEFAULT_PROMPT_TOKENS, new_tokens: int = DEFAULT_NEW_TOKENS,
          threads: int = 0) -> dict:
    """Measure ``bundle`` (and ``vs``, runs interleaved) with greedy decoding.

    Args:
        bundle: the bundle measured ("ours").
        vs: optional second bundle ("theirs"), measured in the same invocation.
        engine: ``auto`` (genai when every bundle allows it, else the own loop for all),
            ``genai`` or ``ort``.
        runs: timed runs per bundle after one warm-up run; figures are medians.
        prompt_tokens: prompt length (a fixed slice of the default evaluation text).
        new_tokens: generated tokens per run (eos ignored).
        threads: intra-op threads for both bundles (0 = ONNX Runtime's default).

    Returns:
        ``{"engine", "engine_reason", "threads", "runs", "prompt_tokens", "new_tokens",
        "bundles": {"ours": {...}, "theirs": {...}}, "ratios": {...}}``; ``theirs`` and
        ``ratios`` only with ``vs``.
    """
    from qcompile.runtimes.genai_session import choose_engine

    if runs < 1 or prompt_tokens < 1 or new_tokens < 2:
        raise QcompileError("bench needs --runs >= 1, --prompt-tokens >= 1, --new-tokens >= 2",
                            "raise the value that is too small")
    paths = [pathlib.Path(bundle)] + ([pathlib.Path(vs)] if vs else [])
    _check_setup(paths, prompt_tokens, new_tokens)
    chosen, reason = choose_engine(engine, paths)
    prompt = bench_prompt(paths[0], prompt_tokens)
    workers = []
    try:
        for path in paths:
            workers.append(BenchWorker(path, chosen, threads, prompt, new_tokens))
        timed = _interleave(workers, runs)
        stats = [w.stats() for w in workers]
    finally:
        for worker in workers:
            worker.close()
    result = {"engine": chosen, "engine_reason": reason, "threads": threads, "runs": runs,
              "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "bundles": {}}
    for role, path, runs_of, stat in zip(("ours", "theirs"), paths, timed, stats):
        result["bundles"][role] = _summary(path, runs_of, stat)
    if vs:
        ours, theirs = result["bundles"]["ours"], result["bundles"]["theirs"]
        result["ratios"] = _ratios(ours, theirs)
        result["paired"] = _paired(ours, theirs)
    return result


def _interleave(workers: list[BenchWorker], runs: int) -> list[list[dict]]:
    """One warm-up run each, then ``runs`` rounds: A B, then B A, and so on.

    Flipping the order cancels a bias from running first or second in a round (a warmer
    cache, a machine that is speeding up or slowing down). ``timed[i][r]`` is worker i's run
    of round r, whatever its position within the round.
    """
    from qcompile.console import progress_bar

    for worker in workers:
        worker.run()
    timed: list[list[dict]] = [[] for _ in workers]
    bar, task = progress_bar("timed runs", runs * len(workers))
    with bar:
        for round_index in range(runs):
            order = list(enumerate(workers))
            for i, worker in order[::-1] if round_index % 2 else order:
                timed[i].append(worker.run())
                bar.advance(task)
    return timed


# --------------------------------------------------------------------------- entry point


def main(argv=None) -> None:
    """``python -m qcompile.runtimes.bench --worker BUNDLE ...`` (used by :func:`bench`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", required=True, help="bundle to load and serve")
    parser.add_argument("--engine", default="ort", choices=["genai", "ort"])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    worker_main(args.worker, args.engine, args.threads)


if __name__ == "__main__":
    main()
