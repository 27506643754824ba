"""What a target is: the contract each folder under ``qcompile/targets/`` fills in.

A target says which weight formats it can express (checked before the model loads, with the
fix named), which ``qcompile::`` op translations ``torch.onnx.export`` uses, the rewrites it
runs on the exported onnx-ir model, how the written bundle is packaged (another model file
format) and how the ladder reads the shipped codes back, whether it may emit ONNX Runtime's
contrib ops (fused attention with an in-kernel KV cache, fused norms, packed ``MatMulNBits``),
and how the parity ladder must judge its integer kernels. Everything outside ``qcompile/targets/`` (the
CLI's choices, the compiler, the ladder, the report) asks the registry, never a name.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

from qcompile.errors import QcompileError

__all__ = ["Target"]


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    linear_bits: tuple[int, ...]
    embedding_bits: tuple[int, ...]
    #: the recipe ``qcompile compile -t NAME`` uses without ``-r``
    default_recipe: str
    #: ``"module:function"`` of the translation table builder, called with the accuracy
    #: level (resolved only when lowering, so the registry imports neither torch nor onnx)
    translation: str
    #: ``"module:function"`` returning ``(initializers, metadata)`` of the bundle's model file:
    #: how the parity ladder reads the shipped integer codes back
    read_tensors: str
    #: how ``pack_weights`` hands quantized weights to the lowering: ``"matmul_nbits"``
    #: (ONNX Runtime's packed bytes in ``qcompile::linear_wNa16`` / ``embedding_wN``) or
    #: ``"codes"`` (layout-neutral codes through ``qcompile::dequantize``, packed after export)
    weight_layout: str
    #: ``"module:function"`` rewrites run on the exported onnx-ir model, in order
    post_export: tuple[str, ...] = ()
    #: ``"module:function"`` run on the bundle directory after the ONNX model is written, with
    #: the accuracy level (e.g. conversion to another model format); returns the report's
    #: ``package`` section
    package: str | None = None
    #: may emit ONNX Runtime contrib ops: GroupQueryAttention (and its in-kernel KV cache),
    #: the fused RMSNorm / rotary rules, packed sibling MatMulNBits
    fuse: bool = False
    #: the hint given with a refused bit width
    bits_hint: str = "change bits"
    #: MatMulNBits is in the file, so accuracy level 4 computes in int8 also in an unoptimized
    #: session (a Q/DQ target gets MatMulNBits only from ORT's optimizer)
    int8_without_fusion: bool = False

    def check(self, recipe) -> None:
        """Refuse recipes whose weight or cache formats this target cannot express."""
        kv_cache = recipe.kv_cache_options()
        if (not self.fuse and kv_cache is not None and kv_cache.in_attention
                and kv_cache.fallback == "error"):
            raise QcompileError(
                f"target {self.name} is standard ONNX; recipe {recipe.name} quantizes the KV "
                "cache inside ONNX Runtime's GroupQueryAttention",
                "use --target ort, or +kv8 / +kv4 (explicit cache quantization)")
        formats = recipe.weight_formats()
        if not formats:
            return
        body = formats["linear"]
        if body.bits not in self.linear_bits:
            raise QcompileError(
                f"target {self.name} cannot export {body.bits}-bit linear weights "
                f"(recipe {recipe.name})",
                f"{self.name} supports {_bits(self.linear_bits)}-bit; {self.bits_hint}",
            )
        for role, allowed in (("lm_head", self.linear_bits), ("embedding", self.embedding_bits)):
            spec = formats[role]
            if spec is not None and spec.bits not in allowed:
                raise QcompileError(
                    f"target {self.name} cannot export a {spec.bits}-bit {role} "
                    f"(recipe {recipe.name})",
                    f"{self.name} supports a {_bits(allowed)}-bit {role}, or null for float",
                )

    def translation_table(self, accuracy_level: int) -> dict[object, Callable]:
        """``qcompile::`` op -> onnxscript function, for ``torch.onnx.export``."""
        return resolve(self.translation)(accuracy_level)

    def package_bundle(self, bundle, accuracy_level: int) -> dict | None:
        """Run the target's packaging step on the written bundle (None: ONNX as written)."""
        return resolve(self.package)(bundle, accuracy_level) if self.package else None

    def rewrite(self, model):
        """Run the target's post-export rewrites on the onnx-ir ``model``."""
        for name in self.post_export:
            model = resolve(name)(model)
        return model


def resolve(reference: str) -> Callable:
    """The function a ``"package.module:function"`` reference names."""
    module, _, function = reference.partition(":")
    return getattr(importlib.import_module(module), function)


def _bits(bits: tuple[int, ...]) -> str:
    return "/".join(str(b) for b in bits)
