"""Lowering targets: what each accepts (capability checks) and how it lowers.

| target   | linear weights                     | embedding          | ONNX ops                     |
|----------|------------------------------------|--------------------|------------------------------|
| ort      | 2/3/4/8-bit, groups or per-channel | 2/3/4/8-bit        | MatMulNBits, GatherBlockQuantized |

(``ort`` writes a per-channel weight whose K is not a power of two as DequantizeLinear + MatMul,
which ONNX Runtime fuses into MatMulNBits at load time, instead of zero-padding its one block.)
| onnx-qdq | 3/4/8-bit (int4/uint4, int8/uint8) | 8-bit              | DequantizeLinear + MatMul / Gather |

Per-IC linear weights (AdaDim, groups along N) lower to DequantizeLinear (blocked on the N axis
of MatMul's ``[K, N]``) + MatMul on both targets: ``MatMulNBits`` cannot express them. Their
codes use an opset-21 container, int4/uint4 for 2/3/4-bit codes (a 2-bit per-IC layer costs 4
bits a weight) and int8/uint8 for 8-bit.

A request the target cannot represent is refused before the model is loaded, naming the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from qcompile.errors import QcompileError

__all__ = ["Target", "TARGETS", "get_target"]


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    linear_bits: tuple[int, ...]
    embedding_bits: tuple[int, ...]
    post_export: tuple[str, ...] = ()
    #: apply ONNX Runtime's fused contrib ops (RMSNorm, rotary, attention) after export
    fuse: bool = False

    def check(self, recipe) -> None:
        """Refuse recipes whose weight or cache formats this target cannot express."""
        kv_cache = recipe.kv_cache_options()
        if (not self.fuse and kv_cache is not None and kv_cache.in_attention
                and kv_cache.fallback == "error"):
            raise QcompileError(
                f"target {self.name} is standard ONNX; recipe {recipe.name} quantizes the KV "
                "cache inside ONNX Runtime's GroupQueryAttention",
                "use --target ort, or +kv8 / +kv4 (explicit cache quantization)")
        options = recipe.weight_options()
        if options is None:
            return
        if options.bits not in self.linear_bits:
            raise QcompileError(
                f"target {self.name} cannot export {options.bits}-bit linear weights "
                f"(recipe {recipe.name})",
                f"{self.name} supports {_bits(self.linear_bits)}-bit; "
                + ("use --target ort for 2-bit" if self.name == "onnx-qdq" else "change bits"),
            )
        for role, allowed in (("lm_head", self.linear_bits), ("embedding", self.embedding_bits)):
            spec = getattr(options, role)
            if spec is not None and spec.bits not in allowed:
                raise QcompileError(
                    f"target {self.name} cannot export a {spec.bits}-bit {role} "
                    f"(recipe {recipe.name})",
                    f"{self.name} supports a {_bits(allowed)}-bit {role}, or null for float",
                )

    def translation_table(self, accuracy_level: int) -> dict[object, Callable]:
        from qcompile.lowering.ort_table import ort_translation_table
        from qcompile.lowering.per_ic import per_ic_translation_table

        return {**ort_translation_table(accuracy_level), **per_ic_translation_table()}


def _bits(bits: tuple[int, ...]) -> str:
    return "/".join(str(b) for b in bits)


TARGETS = {
    "ort": Target(
        "ort",
        "ONNX Runtime contrib ops (MatMulNBits, GatherBlockQuantized)",
        linear_bits=(2, 3, 4, 8),
        embedding_bits=(2, 3, 4, 8),
        post_export=("padded_per_channel_to_qdq",),
        fuse=True,
    ),
    "onnx-qdq": Target(
        "onnx-qdq",
        "standard ONNX opset 21: int4/int8 weights, DequantizeLinear feeding MatMul",
        linear_bits=(3, 4, 8),
        embedding_bits=(8,),
        post_export=("contrib_to_qdq",),
    ),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise QcompileError(f"unknown target {name!r}", f"choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
