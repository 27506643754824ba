"""Decoder parity: the bundle generates what its torch reference generates, token for token.

For a prompt, the bundle's greedy continuation through ONNX Runtime (qcompile's own loop over
the fused session, cache fed back step by step, quantized caches included) is compared with
the same greedy loop over the torch reference graph (same quantization, the last stage of the
ladder). Tokens must be identical; each step's logits must agree within the stage tolerance.
Float-precision bundles can still part at an exact near-tie (two logits closer than the
tolerance allows either to be off): such a first difference passes as a tie, and every step is
then compared teacher-forced on the reference's tokens, so nothing after it goes unchecked.

Bundles that round activations inside the graph (a quantized KV cache, int8 compute) cannot
promise identical greedy tokens: one code landing on its neighbour can flip a near-tie. For
them (a tolerance without a float bound) ORT is teacher-forced with the torch reference's
tokens and every step's logits are compared within the stage tolerance; whether the
free-running greedy tokens matched, and from which step they differ, is still reported.
"""

from __future__ import annotations

import numpy as np
import torch

from qcompile.console import step
from qcompile.runtimes.float_noise import decode_float_noise
from qcompile.runtimes.generation import OrtGenerator
from qcompile.runtimes.parity import Tolerance, compare
from qcompile.runtimes.torch_runner import TorchRunner

__all__ = ["decoder_parity", "forced_logits", "torch_greedy", "decode_stage", "ladder_verdict",
           "one_pass_decoder_parity"]


def torch_greedy(runner: TorchRunner, prompt: np.ndarray, new_tokens: int):
    """Greedy decoding over a captured decoder: ``(tokens, step_logits [steps, vocab])``."""
    ids = np.asarray(prompt, dtype=np.int64)[None, :]
    logits, past = runner.step(ids, np.ones_like(ids))
    tokens, step_logits = [], []
    for _ in range(new_tokens):
        step_logits.append(logits[0, -1])
        tokens.append(int(logits[0, -1].argmax()))
        total = ids.shape[1] + len(tokens)
        logits, past = runner.step(np.array([[tokens[-1]]]), np.ones((1, total), np.int64), past)
    return tokens, np.stack(step_logits)


def forced_logits(generator: OrtGenerator, prompt: np.ndarray, tokens: list[int]):
    """ORT's step logits ``[len(tokens), vocab]`` when it is fed ``tokens`` one at a time
    after ``prompt`` (step i: the logits that chose ``tokens[i]``)."""
    logits, cache = generator.forward(np.asarray(prompt, np.int64)[None], generator.empty_cache(),
                                      0)
    steps = []
    for i, token in enumerate(tokens):
        steps.append(logits[0, -1])
        if i + 1 < len(tokens):
            logits, cache = generator.forward(np.array([[token]]), cache, len(prompt) + i)
    return np.stack(steps)


def _is_tie(reference_row: np.ndarray, chosen: int, tolerance: Tolerance) -> bool:
    """Whether ``chosen`` is within numerical reach of the reference's top token: both logits
    may be off by the tolerance, so a margin under twice its bound is a tie, not an error."""
    if tolerance.rel_max is None:
        return False
    margin = float(reference_row.max() - reference_row[chosen])
    return margin <= 2 * tolerance.rel_max * float(np.abs(reference_row).max())


def _result(against: str, tolerance: Tolerance, prompt, new_tokens: int, same, tie: bool,
            passed: bool, stats) -> dict:
    return {
        "stage": "decode",
        "compared_with": against,
        "tolerance": tolerance.describe(),
        "prompt_tokens": int(len(prompt)),
        "new_tokens": new_tokens,
        "tokens_equal": same is None,
        "first_different_step": same,
        "tie_at_first_difference": tie,
        "passed": passed,
        **stats.as_dict(),
    }


def decoder_parity(reference: torch.nn.Module, bundle, prompt: np.ndarray,
                   tolerance: Tolerance, new_tokens: int = 32) -> dict:
    """Greedy ``new_tokens`` from ``prompt`` through the bundle and through ``reference``."""
    strict = tolerance.rel_max is not None  # float-precision: greedy tokens must match
    theirs, their_logits = torch_greedy(TorchRunner(reference), prompt, new_tokens)
    generator = OrtGenerator(bundle, require_tokenizer=False)
    ours, our_logits = generator.generate(list(map(int, prompt)), new_tokens, stop_at_eos=False,
                                          return_logits=True)
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    tie = same is not None and _is_tie(their_logits[same], ours[same], tolerance)
    if strict and same is None:
        stats = compare(our_logits, their_logits)
        passed = tolerance.passes(stats)
    else:
        forced = forced_logits(generator, prompt, theirs)
        stats = compare(forced, their_logits)
        passed = tolerance.passes(stats) and (tie or not strict)
    noise = None
    if not strict and not passed:
        with step("stage decode in float64 (float32 rounding floor)"):
            noise = decode_float_noise(reference, prompt, theirs, forced, their_logits, tolerance,
                                       stats.top1)
        passed = bool(noise and noise["passed"])
    against = ("torch reference (greedy, same quantization)" if strict else
               "torch reference's greedy tokens, ORT teacher-forced")
    result = _result(against, tolerance, prompt, new_tokens, same, tie, passed, stats)
    return {**result, "float_noise": noise} if noise else result


def one_pass_decoder_parity(reference: torch.nn.Module, bundle, prompt: np.ndarray,
                            tolerance: Tolerance, new_tokens: int = 32) -> dict:
    """Decoder parity with the torch reference run once: ORT decodes greedily through its
    cache, and torch scores the prompt plus ORT's tokens in one causal forward (each
    position's logits are those the cached step computes). For large models, whose packed
    torch reference dequantizes every weight per call: one call instead of ``new_tokens``.
    Tokens are equal when torch's argmax at every position is ORT's token (then torch's own
    greedy loop would choose the same); a first difference at a near-tie passes as in
    :func:`decoder_parity`, and every step is compared either way."""
    strict = tolerance.rel_max is not None
    generator = OrtGenerator(bundle, require_tokenizer=False)
    ours, our_logits = generator.generate(list(map(int, prompt)), new_tokens, stop_at_eos=False,
                                          return_logits=True)
    sequence = np.concatenate([np.asarray(prompt, np.int64), np.asarray(ours[:-1], np.int64)])
    their_logits = TorchRunner(reference)(sequence[None], np.ones((1, len(sequence)), np.int64))
    their_logits = their_logits[0, len(prompt) - 1:]
    theirs = their_logits.argmax(-1)
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    tie = same is not None and _is_tie(their_logits[same], ours[same], tolerance)
    stats = compare(our_logits, their_logits)
    passed = tolerance.passes(stats) and (same is None or tie or not strict)
    return _result("torch reference scoring ORT's greedy tokens in one forward", tolerance,
                   prompt, new_tokens, same, tie, passed, stats)


def decode_stage(reference: torch.nn.Module, bundle, inputs, tolerance: Tolerance,
                 one_pass: bool = False) -> dict:
    """The ladder's decode stage: greedy tokens after the first 16 tokens of the first input
    (``one_pass``: :func:`one_pass_decoder_parity`)."""
    check = one_pass_decoder_parity if one_pass else decoder_parity
    with step("stage decode: 32 greedy tokens through the cache, ORT vs torch"):
        return check(reference, bundle, inputs[0][0, :16], tolerance)


def ladder_verdict(failed: list[str], decode: dict, codes: dict | None, inputs) -> dict:
    """The summary's verdict fields: passed overall, the first failing stage, decode, inputs."""
    failed = failed + (["decode"] if not decode["passed"] else [])
    return {
        "passed": not failed and not (codes and codes["mismatched"]),
        "first_failing_stage": failed[0] if failed else None,
        "decode": decode,
        "inputs": {"batch": int(inputs[0].shape[0]), "tokens": int(inputs[0].shape[1])},
    }
