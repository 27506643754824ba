"""Perplexity of any runner over token windows, with a progress bar.

Each window is scored on its own (no state carried between windows): the mean negative
log-likelihood of tokens 2..L given their prefix, pooled over all windows, exponentiated.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qcompile.console import progress_bar

__all__ = ["perplexity", "perplexity_through_cache"]


def _window_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    logits_t = torch.from_numpy(np.asarray(logits[0, :-1], dtype=np.float32))
    targets = torch.from_numpy(ids[0, 1:])
    nll = torch.nn.functional.cross_entropy(logits_t, targets, reduction="sum")
    return float(nll), int(targets.numel())


def perplexity(runner, windows: torch.Tensor, label: str) -> dict:
    """``{"perplexity", "tokens", "windows"}`` of ``runner`` on ``windows`` ``[count, L]``."""
    total_nll, total_tokens = 0.0, 0
    bar, task = progress_bar(f"perplexity {label}", len(windows))
    with bar:
        for window in windows:
            ids = window.numpy().astype(np.int64)[None, :]
            nll, tokens = _window_nll(runner(ids, np.ones_like(ids)), ids)
            total_nll += nll
            total_tokens += tokens
            bar.advance(task)
    return {
        "perplexity": round(math.exp(total_nll / total_tokens), 4),
        "tokens": total_tokens,
        "windows": len(windows),
    }


def perplexity_through_cache(generator, windows: torch.Tensor, label: str) -> dict:
    """Perplexity of each window's second half, scored from the cache of its first half.

    The first half is prefilled; the second half then runs on top of that cache (``generator``
    is a :class:`~qcompile.runtimes.generation.OrtGenerator`), so a quantized cache is read
    back exactly as in decoding instead of being skipped.
    """
    total_nll, total_tokens = 0.0, 0
    bar, task = progress_bar(f"perplexity through the cache {label}", len(windows))
    with bar:
        for window in windows:
            ids = window.numpy().astype(np.int64)
            half = len(ids) // 2
            logprobs = generator.score_continuation(ids[:half], ids[half:])
            total_nll -= float(logprobs.sum())
            total_tokens += len(logprobs)
            bar.advance(task)
    return {
        "perplexity": round(math.exp(total_nll / total_tokens), 4),
        "tokens": total_tokens,
        "windows": len(windows),
        "context_tokens": int(windows.shape[1] // 2),
    }
