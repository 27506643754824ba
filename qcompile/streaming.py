"""Whether a compile streams its weights (:mod:`qcompile.lazy_weights`) or loads the model.

A streamed compile needs a local safetensors checkpoint (a GGUF file is converted to one once),
passes that run on a skeleton (``QPass.streams``: round-to-nearest, GPTQ through the block
engine, KV-cache calibration and packing today; AWQ, FlexRound, LRQ and AdaDim still run the
whole model) and a target that
takes ONNX Runtime's packed layout (``onnx-qdq`` rewrites the codes after export, which would
hold them all). ``--stream auto`` streams whenever these hold, ``always`` refuses a compile
that cannot, ``never`` loads the whole model.
"""

from __future__ import annotations

import pathlib

from qcompile.errors import QcompileError

__all__ = ["STREAM_MODES", "StreamPlan", "plan_stream"]

STREAM_MODES = ("auto", "always", "never")


class StreamPlan:
    """The decision and what it rests on, for the compiler and report.json."""

    def __init__(self, directory: pathlib.Path | None, kind: str, name: str,
                 reason: str | None):
        self.directory, self.kind, self.name, self.reason = directory, kind, name, reason

    @property
    def streamed(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict:
        return {"streamed": self.streamed, **({"reason": self.reason} if self.reason else {})}


def _refusal(directory: pathlib.Path | None, recipe, target) -> str | None:
    from qcompile.passes import get_pass

    if directory is None:
        return "a hub id is loaded by transformers"
    if not any(directory.glob("*.safetensors")):
        return "the checkpoint is not in safetensors files"
    whole = [step.name for step in recipe.steps if not get_pass(step.name).streams]
    if whole:
        return f"pass {', '.join(whole)} runs on the whole model"
    if target.weight_layout != "matmul_nbits":
        return f"target {target.name} rewrites the codes after export"
    return None


def plan_stream(source: str | None, recipe, target, mode: str = "auto") -> StreamPlan:
    """How ``source`` compiles under ``mode``; ``always`` on a compile that cannot stream is
    refused with the reason."""
    from qcompile.models import local_directory

    if mode not in STREAM_MODES:
        raise QcompileError(f"unknown stream mode {mode!r}",
                            f"use one of {', '.join(STREAM_MODES)}")
    if mode == "never":
        return StreamPlan(None, "", source or "", "--stream never")
    kind, directory, name = local_directory(source)
    reason = _refusal(directory, recipe, target)
    if reason and mode == "always":
        raise QcompileError(f"this compile cannot stream its weights: {reason}",
                            "use --stream auto (loads the whole model where it must), or a "
                            "round-to-nearest recipe (w4a16-rtn, w8a16-rtn) on a safetensors "
                            "checkpoint for the ort target")
    return StreamPlan(directory, kind, name, reason)
