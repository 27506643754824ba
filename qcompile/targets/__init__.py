"""The target registry: one folder per target, one line here each.

Importing it is cheap (no torch, no onnx): a target's translation table and rewrites are
named as ``"module:function"`` and imported only when a model is lowered. The CLI's
``--target`` choices, the default recipes, the compiler and the parity ladder all read
:data:`TARGETS`.
"""

from __future__ import annotations

from qcompile.errors import QcompileError
from qcompile.targets import onnx_qdq, ort, ort_mobile
from qcompile.targets.base import Target

__all__ = ["Target", "TARGETS", "get_target", "target_names"]

TARGETS: dict[str, Target] = {t.name: t for t in (ort.TARGET, onnx_qdq.TARGET, ort_mobile.TARGET)}


def target_names() -> list[str]:
    """Registered target names, the first being the CLI's default."""
    return list(TARGETS)


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise QcompileError(f"unknown target {name!r}", f"choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
