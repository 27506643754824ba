"""A safetensors checkpoint as users have it, read from its headers only: one file, or shards
named by ``model.safetensors.index.json``.

Before a single weight is read, :func:`check_checkpoint` refuses what would otherwise fail late
or, worse, load: a shard the index names that is not there, a truncated or corrupt file, and a
tensor whose shape disagrees with ``config.json`` (transformers would stop with a size-mismatch
traceback, or silently re-initialise it). The expected shapes come from transformers' own model
class built on the meta device, so no memory is used and every architecture is covered. Tensor
names the model class does not know are left to transformers (it renames old checkpoints' keys).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import torch

from qcompile.errors import QcompileError

__all__ = ["INDEX_FILE", "TensorEntry", "checkpoint_tensors", "check_checkpoint",
           "read_header"]

INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100_000_000  # safetensors' own limit on a header's JSON
_FIX_FILES = "re-download or re-save the checkpoint (save_pretrained writes every shard)"


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its file, dtype code (``BF16``...) and shape."""

    file: pathlib.Path
    dtype: str
    shape: tuple[int, ...]


def read_header(path: pathlib.Path, check_size: bool = True) -> dict[str, dict]:
    """The tensor table of a safetensors file (8 bytes of length, then JSON), checked against
    the file's size so a truncated download is named here, not halfway through loading.
    ``check_size`` False reads the shapes only (the bundle-size estimate: a disk too small for
    the bundle is the first thing to say, whatever the file holds)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if size < 8 or length > min(_MAX_HEADER, size - 8):
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(file.read(length))
        end = max((t["data_offsets"][1] for n, t in header.items() if n != "__metadata__"),
                  default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise QcompileError(f"cannot load model weights: {path} is not a readable safetensors "
                            f"file ({exc})",
                            f"the file is corrupt or truncated; {_FIX_FILES}") from exc
    if check_size and 8 + length + end > size:
        raise QcompileError(f"cannot load model weights: {path} is truncated: its header "
                            f"needs {8 + length + end:,} bytes, the file has {size:,}",
                            _FIX_FILES)
    return {n: t for n, t in header.items() if n != "__metadata__"}


def _shard_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / INDEX_FILE
    if not index.is_file():
        return sorted(directory.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise QcompileError(f"cannot read the shard index {index}: {exc}",
                            "repair or re-download model.safetensors.index.json") from exc
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise QcompileError(
            f"cannot load model weights from {directory}: {len(missing)} of the "
            f"{len(names)} shards its index names are missing: {', '.join(missing)}",
            f"download the missing shard(s); {_FIX_FILES}")
    return [directory / name for name in names]


def checkpoint_tensors(directory: pathlib.Path) -> dict[str, TensorEntry]:
    """Every tensor of the safetensors checkpoint in ``directory`` (empty: it has none)."""
    tensors = {}
    for path in _shard_files(directory):
        for name, table in read_header(path).items():
            tensors[name] = TensorEntry(path, table["dtype"], tuple(table["shape"]))
    return tensors


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` the model class of ``config`` holds (meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    hf_config = AutoConfig.for_model(config["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_checkpoint(directory: pathlib.Path, config: dict) -> dict[str, TensorEntry]:
    """The checkpoint's tensors, after refusing missing shards, truncated files and shapes that
    disagree with ``config``."""
    tensors = checkpoint_tensors(directory)
    if not tensors:
        return tensors
    try:
        expected = _expected_shapes(config)
    except Exception:  # a config transformers cannot build: from_pretrained will say why
        return tensors
    wrong = [(name, entry, expected[name]) for name, entry in tensors.items()
             if name in expected and entry.shape != expected[name]]
    if wrong:
        name, entry, shape = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise QcompileError(
            f"weight {name} in {entry.file.name} has shape {list(entry.shape)}, but "
            f"config.json describes {list(shape)}{more}",
            "the weights and config.json are from different models: use the config.json "
            "saved with these weights")
    return tensors
