"""The integer-code check of ``verify``: every weight the bundle stores as codes holds exactly
the codes of the torch stage, read back from the model file the way its target wrote it.

Tensors are read one at a time (:class:`~qcompile.targets.onnx_file.Initializers`), and a
packed sibling ``MatMulNBits`` (q/k/v as one matrix) is cut into its members' rows on access,
so the check of a multi-gigabyte bundle holds one tensor at a time.
"""

from __future__ import annotations

import collections.abc
import pathlib

import numpy as np
import torch

from qcompile.lowering.pack_matmul_nbits import packed_members
from qcompile.targets import get_target
from qcompile.targets.base import resolve
from qcompile.weight_format import unpack_codes

__all__ = ["check_codes"]


def check_codes(final: torch.nn.Module, model_path: pathlib.Path, target_name: str) -> dict:
    """Every exported integer weight equals the torch stage's codes exactly, read back from the
    bundle's model file the way its target wrote it."""
    initializers, metadata = resolve(get_target(target_name).read_tensors)(model_path)
    initializers = _WithMembers(initializers, metadata)
    checked, mismatched = 0, []
    shapes = _code_shapes(final)
    for name, packed in final.named_buffers():
        if not name.endswith(".qweight"):
            continue
        path = name.removesuffix(".qweight")
        same = _exported_codes_equal(initializers, path, packed)
        if same is None and path in shapes:
            same = _fused_codes_equal(initializers, path, packed, *shapes[path])
        if same is None:
            mismatched.append(f"{path} (not found in the ONNX model)")
            continue
        checked += 1
        if not same:
            mismatched.append(path)
    return {"weights_checked": checked, "mismatched": mismatched}


class _WithMembers(collections.abc.Mapping):
    """The initializers plus each member's ``qweight`` rows of a packed sibling
    ``MatMulNBits`` (ort target), cut from the packed tensor when asked for."""

    def __init__(self, initializers, metadata: dict):
        self._initializers = initializers
        self._rows: dict[str, tuple[str, int, int]] = {}
        for packed, members in packed_members(metadata).items():
            start = 0
            for member, count in members:
                self._rows[f"{member}.qweight"] = (packed, start, start + count)
                start += count

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._rows:
            packed, start, stop = self._rows[name]
            return self._initializers[packed][start:stop]
        return self._initializers[name]

    def __iter__(self):
        yield from self._initializers
        yield from self._rows

    def __len__(self) -> int:
        return len(self._initializers) + len(self._rows)

    def __contains__(self, name) -> bool:
        return name in self._rows or name in self._initializers


def _exported_codes_equal(initializers: dict, path: str, packed: torch.Tensor) -> bool | None:
    """Compare the exported form of ``path`` with the torch stage's codes (None: absent)."""
    if f"{path}.qweight" in initializers:  # ort target: the canonical bytes themselves
        return bool(np.array_equal(initializers[f"{path}.qweight"], packed.numpy()))
    if f"{path}.qweight_int8" in initializers:  # onnx-qdq symmetric 8-bit embedding
        shifted = initializers[f"{path}.qweight_int8"].astype(np.int16) + 128
        return bool(np.array_equal(shifted, packed.numpy().astype(np.int16)))
    if f"{path}.weight_q" not in initializers:
        return None
    array = initializers[f"{path}.weight_q"]  # onnx-qdq linear: [K, N] int4/int8
    k = array.shape[0]
    cbits = 8 if array.dtype in (np.int8, np.uint8) else 4
    # [N, K] layout-neutral codes (onnx-qdq), or ORT's packed bytes (ort's per-IC linears)
    codes = packed if packed.ndim == 2 else unpack_codes(packed, cbits, k)
    codes = codes.numpy().astype(np.int16)
    exported = array.astype(np.int16).T
    if f"{path}.weight_zero_point" not in initializers:
        exported = exported + (1 << (cbits - 1))
    return bool(np.array_equal(codes, exported))


def _code_shapes(final: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{module path: (container bits, codes per row)}`` of each packed linear of ``final``."""
    from qcompile.formats.integer import container_bits

    linear = torch.ops.qcompile.linear_wNa16.default
    shapes = {}
    for node in getattr(final, "graph", torch.fx.Graph()).nodes:
        if node.op == "call_function" and node.target is linear:
            path = node.args[1].target.removesuffix(".qweight")
            shapes[path] = (container_bits(node.args[5]), node.args[7])
    return shapes


def _fused_codes_equal(initializers: dict, path: str, packed: torch.Tensor, cbits: int,
                       k: int) -> bool | None:
    """A DequantizeLinear -> MatMul that ONNX Runtime's optimizer fused into ``MatMulNBits``
    before the file was saved (``ort-mobile``): ``{path}.weight_q_T``, ``[N, blocks, blob]``
    unsigned codes in its own blocks (symmetric codes offset like ours)."""
    fused = initializers.get(f"{path}.weight_q_T")
    if fused is None:
        return None
    theirs = unpack_codes(torch.from_numpy(np.array(fused)), cbits, k)
    return bool(torch.equal(theirs, unpack_codes(packed, cbits, k)))
