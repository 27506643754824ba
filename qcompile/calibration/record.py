"""The calibration record: a bundle's calibrated integer weights and exact float updates.

Calibrated passes (GPTQ, AWQ, FlexRound, ...) take minutes to hours. ``verify`` and
``eval --reference`` must rebuild the quantized torch model the bundle was lowered from; the
record lets them do that by replaying what calibration produced instead of calibrating again.
It is written next to the model as ``calibration.safetensors`` (packed codes, so about half the
model's size at 4 bits). The model never reads it: delete it to ship a smaller bundle, and
``verify`` then recalibrates (the same data and seed give the same codes).

A recipe may chain calibrated passes when the earlier ones only change float parameters
(SmoothQuant's folded scales, then GPTQ on the smoothed model): the record then holds one
stage per pass, in recipe order (:attr:`CalibrationRecord.before`), and each pass replays its
own stage.

What a replay proves: the ONNX model computes what the torch model with these codes and float
updates computes, and its integer codes equal them. That calibration itself is deterministic is
checked separately (the bundle-rebuild tests).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import torch

from qcompile.errors import QcompileError
from qcompile.lazy_weights import materialize
from qcompile.weight_format import QuantizedWeight, pack_codes, unpack_codes

__all__ = ["RECORD_FILE", "CalibrationRecord", "load_record", "save_record"]

RECORD_FILE = "calibration.safetensors"
_FORMAT = "qcompile-calibration-record-1"
#: the same with earlier float-only stages (``before``) stored as ``s<i>.f.<name>``
_CHAINED_FORMAT = "qcompile-calibration-record-2"


@dataclasses.dataclass
class CalibrationRecord:
    """What one calibrated pass produced: ``qweights`` by module path, ``float_updates`` by
    parameter name (see :class:`~qcompile.calibration.engine.BlockCalibrationResult`)."""

    algorithm: str
    qweights: dict[str, QuantizedWeight]
    float_updates: dict[str, torch.Tensor]
    #: per-layer facts for report.json (AWQ's alpha, AdaDim's choice), by module path
    notes: dict[str, dict] = dataclasses.field(default_factory=dict)
    #: the float-only stages this one calibrated on top of, in recipe order (SmoothQuant
    #: before GPTQ); each has no integer weights and no ``before`` of its own
    before: tuple["CalibrationRecord", ...] = ()

    @property
    def chain(self) -> str:
        """The algorithms of every stage, ``smoothquant+gptq``."""
        return "+".join(stage.algorithm for stage in self.stages())

    def stages(self) -> list["CalibrationRecord"]:
        return [*self.before, dataclasses.replace(self, before=())]

    def then(self, stage: "CalibrationRecord") -> "CalibrationRecord":
        """This record followed by ``stage``, which calibrated on this one's float updates."""
        if self.qweights:
            raise ValueError(f"{self.algorithm} quantized weights; only float-only stages "
                             "may come before another calibrated pass")
        return dataclasses.replace(stage, before=tuple(self.stages()))

    def combined_updates(self) -> dict[str, torch.Tensor]:
        """Every stage's float updates, later stages over earlier ones."""
        updates: dict[str, torch.Tensor] = {}
        for stage in self.stages():
            updates.update(stage.float_updates)
        return updates


def _code_bits(bits: int) -> int:
    return 4 if bits <= 4 else 8


def save_record(directory: pathlib.Path, record: CalibrationRecord) -> pathlib.Path:
    """Write ``record`` into ``directory`` (a bundle being built); returns the file."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for path, q in sorted(record.qweights.items()):
        q = materialize(q)  # a streamed compile's spilled codes, read back one weight at a time
        n, k = q.codes.shape
        tensors[f"q.{path}.codes"] = pack_codes(q.codes, _code_bits(q.bits), k).contiguous()
        tensors[f"q.{path}.scales"] = q.scales.contiguous()
        if q.zeros is not None:
            tensors[f"q.{path}.zeros"] = q.zeros.contiguous()
        layout[path] = {"bits": q.bits, "group_size": q.group_size, "axis": q.axis,
                        "shape": [n, k]}
    for name, value in sorted(record.float_updates.items()):
        tensors[f"f.{name}"] = value.detach().contiguous()
    before = []
    for i, stage in enumerate(record.before):
        for name, value in sorted(stage.float_updates.items()):
            tensors[f"s{i}.f.{name}"] = value.detach().contiguous()
        before.append({"algorithm": stage.algorithm, "notes": stage.notes})
    fields = {"format": _CHAINED_FORMAT if before else _FORMAT,
              "algorithm": record.algorithm, "weights": layout, "notes": record.notes}
    if before:
        fields["before"] = before
    # one metadata key: safetensors writes several in hash order, and bundles must be
    # byte-identical when rebuilt
    metadata = {"record": json.dumps(fields, sort_keys=True)}
    target = pathlib.Path(directory) / RECORD_FILE
    save_file(tensors, str(target), metadata=metadata)
    target.chmod(0o644)  # safetensors creates it owner-only; the bundle's other files are not
    return target


def load_record(directory: pathlib.Path) -> CalibrationRecord | None:
    """The record of the bundle ``directory``, or None when it has none."""
    from safetensors import safe_open

    path = pathlib.Path(directory) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = json.loads((f.metadata() or {}).get("record", "{}"))
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if metadata.get("format") not in (_FORMAT, _CHAINED_FORMAT):
            raise ValueError(f"format {metadata.get('format')!r}, expected {_FORMAT!r} or "
                             f"{_CHAINED_FORMAT!r}")
        layout = metadata["weights"]
        qweights = {p: _weight(tensors, p, spec) for p, spec in layout.items()}
    except Exception as exc:  # corrupt or foreign file: say which and how to recover
        raise QcompileError(f"{path} is not a readable calibration record ({exc})",
                            f"delete {path.name} (verify then recalibrates) or re-compile "
                            "the bundle") from exc
    before = tuple(CalibrationRecord(stage["algorithm"], {}, _updates(tensors, f"s{i}.f."),
                                     stage.get("notes", {}))
                   for i, stage in enumerate(metadata.get("before", [])))
    return CalibrationRecord(metadata["algorithm"], qweights, _updates(tensors, "f."),
                             metadata.get("notes", {}), before)


def _updates(tensors: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {n.removeprefix(prefix): t for n, t in tensors.items() if n.startswith(prefix)}


def _weight(tensors: dict, path: str, spec: dict) -> QuantizedWeight:
    n, k = spec["shape"]
    codes = unpack_codes(tensors[f"q.{path}.codes"], _code_bits(spec["bits"]), k)
    if tuple(codes.shape) != (n, k):
        raise ValueError(f"{path}: codes unpack to {tuple(codes.shape)}, expected {(n, k)}")
    return QuantizedWeight(codes, tensors[f"q.{path}.scales"], tensors.get(f"q.{path}.zeros"),
                           spec["bits"], spec["group_size"], spec["axis"])
