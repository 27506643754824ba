"""Activation observers: what calibrating passes record about the activations they see.

An observer is fed tensors one batch at a time (``observe``) and summarises them (``result``),
so a pass runs the model once over its calibration windows and asks each observer what it
saw. The KV-cache pass's per-(head, channel) ranges use :class:`ChannelRange`; AWQ's and
SmoothQuant's per-input-channel statistics of a block's linears :class:`InputStatistics`
(through :func:`linear_input_statistics`); activation quantization, OutlierTune and MiKV take
the same contract for theirs.
:func:`calibration_windows` is the text they all calibrate on; :func:`calibration_calls` the
keyword arguments that run a captured graph over it (one window per call, empty cache).
"""

from __future__ import annotations

import torch

__all__ = ["ChannelRange", "InputStatistics", "calibration_calls", "calibration_windows",
           "linear_input_statistics"]


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


class InputStatistics:
    """Per input channel, the mean and the maximum of ``|x|`` over every token of
    ``[tokens, channels]`` inputs, and a sample of every ``stride``-th token."""

    def __init__(self, stride: int):
        self.stride, self.abs_sum, self.abs_max, self.count, self.rows = stride, None, None, 0, []

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().to("cpu", torch.float32)
        magnitude = x.abs()
        total, top = magnitude.sum(0), magnitude.amax(0)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.abs_max = top if self.abs_max is None else torch.maximum(self.abs_max, top)
        self.count += x.shape[0]
        self.rows.append(x[:: self.stride])

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean |x|, max |x|, token sample)``; an observer that saw nothing refuses."""
        if not self.count:
            raise ValueError("InputStatistics.result() before any observe()")
        return self.abs_sum / self.count, self.abs_max, torch.cat(self.rows)


def linear_input_statistics(job, names: list[str], sample_tokens: int) -> dict:
    """``{linear name: InputStatistics.result()}`` over every calibration batch of ``job``
    (a :class:`~qcompile.calibration.engine.BlockJob`), each sample about
    ``sample_tokens`` tokens."""
    tokens = sum(job.inputs[i].shape[0] * job.inputs[i].shape[1] for i in range(len(job.inputs)))
    stats = {name: InputStatistics(max(1, tokens // sample_tokens)) for name in names}
    job.progress("input statistics")
    job.observe_inputs(names, lambda name, x: stats[name].observe(x))
    return {name: s.result() for name, s in stats.items()}


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


def calibration_calls(context, windows: int, tokens: int) -> list[dict]:
    """Keyword arguments of the captured graph (``context.signature``), one call per
    calibration window of ``tokens`` ids, each from an empty cache."""
    empty = context.signature.cache.empty(1)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "past_key_values": list(empty)}
            for ids in (w[None, :] for w in calibration_windows(context, windows, tokens))]
