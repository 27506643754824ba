"""A lower bound of a bundle's size before the model loads, from the source's tensor headers.

:func:`qcompile.bundle.check_output_path` refuses a disk that cannot hold the bundle with this
estimate, so a full disk is found before a long compile, not after it. Only headers are read
(safetensors' JSON, GGUF's tensor table); no weights.
"""

from __future__ import annotations

import math
import os
import pathlib
import struct

from qcompile.errors import QcompileError

__all__ = ["estimate_bundle_bytes", "matrix_bits", "source_elements"]

#: GGUF metadata value types: bytes of each scalar type, and the string and array types
_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_RANK = 4


def estimate_bundle_bytes(source: str | None, recipe) -> int | None:
    """A lower bound of the bundle's size, or None where it is unknown before loading (a hub
    id, an unreadable file: loading then says what is wrong).

    Matrices count at :func:`matrix_bits`, vectors (norms, biases) at float32; tensors of more
    than two dimensions (GPT-2's saved causal masks) are not weights and are left out. Real
    bundles are larger (8-bit embedding and lm_head, zero points, a tied head stored twice, the
    graph and the tokenizer; SmolLM2 w4a16-rtn: ~72 MB estimated, 126 MB written), so only a
    disk that cannot hold the bundle is refused, never a compile that would fit.
    """
    elements = source_elements(source)
    if elements is None:
        return None
    matrices, vectors = elements
    return int(matrices * matrix_bits(recipe) / 8 + vectors * 4)


def matrix_bits(recipe) -> float:
    """Bits per matrix element the bundle stores at least: the body's container width (3-bit
    codes take 4) plus one float32 scale per group; 32 without weight quantization."""
    formats = recipe.weight_formats()
    if not formats:
        return 32.0
    from qcompile.formats.integer import container_bits

    spec = formats["linear"]
    return container_bits(spec.bits) + (32 / spec.group_size if spec.group_size > 0 else 0)


def source_elements(source: str | None) -> tuple[int, int] | None:
    """``(matrix elements, vector elements)`` of a local source, read from the tensor headers
    only (no weights); a directory without safetensors counts its ``*.bin`` bytes as float32
    matrices. None for a hub id or unreadable headers."""
    path = _local_source(source)
    try:
        if path is None:
            return None
        if path.is_file():
            return _gguf_elements(path)
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            return sum(p.stat().st_size for p in path.glob("*.bin")) // 4, 0
        counts = [_safetensors_elements(shard) for shard in shards]
    except (OSError, ValueError, KeyError, TypeError, struct.error, QcompileError):
        return None
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def _local_source(source: str | None) -> pathlib.Path | None:
    """The model directory or GGUF file ``source`` names (the default: the packaged GGUF)."""
    from qcompile.models import DEFAULT_MODEL, default_model_path

    if source in (None, "", DEFAULT_MODEL):
        return default_model_path()
    path = pathlib.Path(source).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    return None


def _split_elements(shapes) -> tuple[int, int]:
    """``(elements of 2-D tensors, elements of 0-/1-D tensors)``; higher ranks are ignored."""
    sizes = [(len(shape), math.prod(shape)) for shape in shapes]
    return (sum(n for rank, n in sizes if rank == 2), sum(n for rank, n in sizes if rank < 2))


def _safetensors_elements(path: pathlib.Path) -> tuple[int, int]:
    """Element counts from a safetensors header."""
    from qcompile.checkpoint import read_header

    return _split_elements(t["shape"] for t in read_header(path, check_size=False).values())


def _gguf_elements(path: pathlib.Path) -> tuple[int, int]:
    """Element counts from a GGUF file's tensor table (format v2/v3, little-endian). The
    key-value header before it is skipped, not decoded: gguf's ``GGUFReader`` decodes every
    vocabulary entry, ~6 s for SmolLM2's, which ``load_model`` already pays once."""
    with open(path, "rb") as file:
        magic, version, tensors, pairs = _unpack(file, "4sIQQ")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path}: not a GGUF v2/v3 file")
        for _ in range(pairs):
            _skip_gguf_value(file, _GGUF_STRING)
            _skip_gguf_value(file, _unpack(file, "I")[0])
        shapes = []
        for _ in range(tensors):
            _skip_gguf_value(file, _GGUF_STRING)
            (rank,) = _unpack(file, "I")
            if rank > _GGUF_MAX_RANK:
                raise ValueError(f"{path}: a tensor of rank {rank}")
            shapes.append(_unpack(file, f"{rank}Q"))
            _unpack(file, "IQ")  # the tensor's type and data offset
    return _split_elements(shapes)


def _unpack(file, layout: str) -> tuple:
    size = struct.calcsize(f"<{layout}")
    return struct.unpack(f"<{layout}", file.read(size))


def _skip_gguf_value(file, kind: int) -> None:
    """Read past one GGUF metadata value of type ``kind`` (a string, an array, a scalar)."""
    if kind == _GGUF_STRING:
        file.seek(_unpack(file, "Q")[0], os.SEEK_CUR)
    elif kind == _GGUF_ARRAY:
        item, count = _unpack(file, "IQ")
        if item in _GGUF_SCALAR_BYTES:
            file.seek(count * _GGUF_SCALAR_BYTES[item], os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_gguf_value(file, item)
    else:
        file.seek(_GGUF_SCALAR_BYTES[kind], os.SEEK_CUR)
