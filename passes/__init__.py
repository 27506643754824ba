"""Graph passes, one per file, each registered by name on import (see ``qcompile.pass_infra``).

:func:`get_pass` is the lookup recipes use: importing this package registers every built-in.
"""

from __future__ import annotations

from qcompile.passes import (adadim, awq, flexround, gptq, outliertune,  # noqa: F401
                             pack_weights, quantize_activations, quantize_kv_cache,
                             quantize_weights_rtn, smoothquant)
from qcompile.errors import QcompileError
from qcompile.pass_infra import PASS_REGISTRY, QPass

__all__ = ["get_pass", "ladder_stages", "adadim", "awq", "gptq", "outliertune", "pack_weights",
           "quantize_activations", "quantize_kv_cache", "quantize_weights_rtn", "smoothquant"]


def get_pass(name: str) -> type[QPass]:
    """The registered pass ``name``; an unknown name lists the available ones."""
    if name not in PASS_REGISTRY:
        raise QcompileError(
            f"unknown pass {name!r}", f"available passes: {', '.join(sorted(PASS_REGISTRY))}"
        )
    return PASS_REGISTRY[name]


def ladder_stages() -> dict[str, str]:
    """``{stage name: ladder check}`` of every registered pass that snapshots a stage, which
    ``verify`` turns into its torch stages."""
    return {cls.ladder_stage: cls.ladder_check for cls in PASS_REGISTRY.values()
            if cls.ladder_stage}
