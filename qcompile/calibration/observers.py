"""Activation observers: what calibrating passes record about the activations they see.

An observer is fed tensors one batch at a time (``observe``) and summarises them (``result``),
so a pass runs the model once over its calibration windows and asks each observer what it
saw. The KV-cache pass's per-(head, channel) ranges use :class:`ChannelRange`; activation
quantization, SmoothQuant, OutlierTune and MiKV take the same contract for their statistics.
:func:`calibration_windows` is the text they all calibrate on.
"""

from __future__ import annotations

import torch

__all__ = ["ChannelRange", "calibration_windows"]


class ChannelRange:
    """Running minimum and maximum over every axis but ``keep`` (a static per-channel range).

    Args:
        keep: the axes that stay, e.g. ``(1, 3)`` for the heads and channels of a
            ``[batch, heads, positions, head_dim]`` cache tensor.
    """

    def __init__(self, keep: tuple[int, ...]):
        self.keep = keep
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def observe(self, tensor: torch.Tensor) -> None:
        reduce = tuple(d for d in range(tensor.dim()) if d not in self.keep)
        low, high = tensor.amin(dim=reduce), tensor.amax(dim=reduce)
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(minimum, maximum)`` per kept index; an observer that saw nothing refuses."""
        if self.low is None:
            raise ValueError("ChannelRange.result() before any observe()")
        return self.low, self.high


def calibration_windows(context, windows: int, tokens: int) -> torch.Tensor:
    """``[windows, tokens]`` ids from the calibration half of the default text, or seeded
    random ids for a model saved without a tokenizer."""
    from qcompile.text_data import token_ids, token_windows

    tokenizer = getattr(context, "tokenizer", None)
    if tokenizer is not None:
        return token_windows(token_ids(tokenizer, None, split="calibration"), tokens, windows)
    generator = torch.Generator().manual_seed(0)
    vocab = int(context.config.vocab_size)
    return torch.randint(0, vocab, (windows, tokens), generator=generator)
