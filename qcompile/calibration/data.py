"""Calibration samples: ``[samples, seq_len]`` token ids for the calibrated weight passes.

Where the text comes from (the recipe's ``calibration.data``):

* ``default``: the calibration half of the offline default text (``pydoc_data.topics``); the
  evaluation half is never seen by calibration;
* a path to a text file;
* ``hf:NAME[:CONFIG][:SPLIT][:COLUMN]``: a Hugging Face dataset column;
* ``random``: uniformly random token ids (for models saved without a tokenizer, such as test
  models; useless for quality, say so in a report).

Samples are consecutive windows when the text is long enough, otherwise windows at seeded
random offsets (GPTQ's "random segments"), so a recipe and seed always give the same samples.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.errors import QcompileError
from qcompile.text_data import token_ids

__all__ = ["CalibrationOptions", "calibration_samples"]


@dataclasses.dataclass(frozen=True)
class CalibrationOptions:
    """Recipe options shared by every calibrated pass (``calibration: {...}``)."""

    data: str = "default"
    samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    #: keep block activations on disk instead of in memory (models whose activations for
    #: ``samples x seq_len`` tokens do not fit beside one block)
    spill: bool = False

    def validate(self, where: str) -> None:
        for field in ("samples", "seq_len", "batch_size"):
            if getattr(self, field) < 1:
                raise QcompileError(f"{where}.{field} must be >= 1", f"set {field}: 1 or more")
        if self.seq_len < 8:
            raise QcompileError(f"{where}.seq_len = {self.seq_len} is too short to calibrate",
                                "use 128 tokens or more (512 is the default)")


def _random_ids(options: CalibrationOptions, vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(options.seed)
    return torch.randint(0, vocab_size, (options.samples, options.seq_len), generator=generator)


def _windows(ids: torch.Tensor, options: CalibrationOptions, source: str) -> torch.Tensor:
    n, length = options.samples, options.seq_len
    if ids.numel() < length:
        raise QcompileError(
            f"calibration text {source!r} has {ids.numel()} tokens, fewer than one sample of "
            f"{length}", "pass a longer text or a smaller calibration.seq_len")
    if ids.numel() >= n * length:
        return ids[: n * length].reshape(n, length).clone()
    generator = torch.Generator().manual_seed(options.seed)
    starts = torch.randint(0, ids.numel() - length + 1, (n,), generator=generator)
    return torch.stack([ids[s: s + length] for s in starts.tolist()])


def calibration_samples(options: CalibrationOptions, tokenizer, vocab_size: int) -> torch.Tensor:
    """``[samples, seq_len]`` int64 token ids under ``options``."""
    if options.data == "random":
        return _random_ids(options, vocab_size)
    if tokenizer is None:
        raise QcompileError(
            "calibration needs text, but this model was saved without a tokenizer",
            "save the tokenizer with the model, compile with -r w4a16-rtn (no calibration), or "
            "set calibration.data: random (smoke tests only)")
    source = None if options.data == "default" else options.data
    ids = token_ids(tokenizer, source, split="calibration")
    return _windows(ids, options, options.data)
