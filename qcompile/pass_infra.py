"""The pass contract, the registry of passes by name, and the runner.

A pass follows ``torch.fx``'s ``PassBase`` contract (``call(gm) -> PassResult``, optional
``requires``/``ensures``) and adds two things qcompile needs: an ``Options`` dataclass that
recipes fill in from YAML/JSON (validated with messages that name the field), and a shared
:class:`PassContext` where passes record what they did for ``report.json``.

Passes register themselves by name with :func:`register_pass` when their module is imported;
:func:`qcompile.passes.get_pass` imports them all and looks one up (this module imports no
pass, so no pass module depends on itself through it). A failing pass is reported with its
name and the passes that ran before it.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any, ClassVar

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from qcompile.errors import QcompileError

__all__ = [
    "PassContext",
    "QPass",
    "PASS_REGISTRY",
    "register_pass",
    "build_options",
    "compose_options",
    "run_passes",
]


@dataclasses.dataclass
class PassContext:
    """What passes share: the source model's config and the report they write into."""

    model_type: str
    config: Any = None
    model: Any = None
    #: the decoder's export signature; a pass that changes the cache (KV quant) replaces it
    signature: Any = None
    #: for passes that calibrate on text (None for models saved without one)
    tokenizer: Any = None
    layers: dict[str, dict] = dataclasses.field(default_factory=dict)
    #: what a calibrated pass calibrated on and how long it took (report.json "calibration")
    calibration: dict = dataclasses.field(default_factory=dict)
    #: a calibrated pass's output (:class:`~qcompile.calibration.record.CalibrationRecord`);
    #: set beforehand (``verify`` reading a bundle's record) the pass replays it instead
    calibrated: Any = None
    #: the target's ``weight_layout`` (:class:`~qcompile.targets.base.Target`), which
    #: ``pack_weights`` emits
    weight_layout: str = "matmul_nbits"
    passes_run: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """For passes that take no options."""


class QPass(PassBase):
    """Base class of qcompile passes; subclasses set ``name`` and ``Options``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: the parity-ladder stage this pass completes ("fake-quant", "lowered", ...), if any
    ladder_stage: ClassVar[str | None] = None
    #: how ``verify`` judges the stage against the one before it: "quality" (a metric only:
    #: rounding is the point) or "exact" (the same function up to float noise)
    ladder_check: ClassVar[str] = "quality"
    #: what the pass quantizes ("weights", "kv_cache"), for the targets' capability checks
    quantizes: ClassVar[str | None] = None
    #: runs on a skeleton model (fake matrices) in a streamed compile: every tensor it
    #: computes from weights goes through :func:`qcompile.lazy_weights.derive`
    streams: ClassVar[bool] = False
    #: computes each decoder layer from that layer's weights alone, alike for every layer
    #: (given :meth:`treats_alike`), so a streamed compile may capture two layers and repeat
    #: the second (:mod:`qcompile.layer_template`); a calibrating pass is not
    layer_uniform: ClassVar[bool] = False

    def __init__(self, options=None, context: PassContext | None = None):
        super().__init__()
        self.options = options if options is not None else self.Options()
        self.context = context or PassContext(model_type="unknown")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def treats_alike(self, path: str, other: str) -> bool:
        """Whether this pass's options treat the modules at ``path`` and ``other`` (the same
        module of two decoder layers) alike; options that name module paths may not."""
        return True

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        graph_module.graph.lint()


PASS_REGISTRY: dict[str, type[QPass]] = {}


def register_pass(cls: type[QPass]) -> type[QPass]:
    """Class decorator: make ``cls`` available to recipes under ``cls.name``."""
    if not cls.name or cls.name in PASS_REGISTRY:
        raise ValueError(f"pass name {cls.name!r} is empty or already registered")
    PASS_REGISTRY[cls.name] = cls
    return cls


def compose_options(name: str, *groups: type, doc: str = "") -> type:
    """A frozen options dataclass ``name`` holding the fields of ``groups`` in order.

    Recipes write a pass's options flat (``bits``, ``calibration``, ``damp`` side by side), and
    methods share field groups (every weight pass the weight fields, every calibrated one the
    calibration fields, both AdaDim variants AdaDim's), so a pass's options are composed from
    the groups it uses rather than inherited from another pass's: ``validate`` runs each
    group's own ``validate`` on the composed object, in order, and nothing depends on an MRO.
    """
    fields = []
    for group in groups:
        hints = typing.get_type_hints(group)
        for field in dataclasses.fields(group):
            default = (dataclasses.field(default_factory=field.default_factory)
                       if field.default is dataclasses.MISSING
                       else dataclasses.field(default=field.default))
            fields.append((field.name, hints[field.name], default))

    def validate(self, where: str) -> None:
        for group in groups:
            check = getattr(group, "validate", None)
            if check is not None:
                check(self, where)

    caller = sys._getframe(1).f_globals.get("__name__", __name__)
    cls = dataclasses.make_dataclass(name, fields, frozen=True,
                                     namespace={"validate": validate, "__doc__": doc or name,
                                                "groups": groups})
    cls.__module__ = caller  # so it pickles and documents as the module that names it
    return cls


def _check_type(value, annotation, where: str):
    """Accept ``value`` for a field annotated ``int``/``float``/``bool``/``str``/``tuple``/
    dataclass (a list for a ``tuple`` field becomes a tuple: YAML has no tuples)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(a for a in options if a is not type(None))
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise QcompileError(f"{where} must be a mapping", "write it as key: value pairs")
        return build_options(annotation, value, where)
    if annotation is tuple and isinstance(value, list):
        return tuple(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and (
        type(value) is not annotation
    ):
        raise QcompileError(
            f"{where} must be {annotation.__name__}, got {value!r}",
            f"write a {annotation.__name__} value",
        )
    return value


def build_options(options_cls: type, raw: dict | None, where: str):
    """Build ``options_cls`` from a plain mapping, naming any unknown or mistyped field."""
    raw = dict(raw or {})
    hints = typing.get_type_hints(options_cls)
    fields = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise QcompileError(
            f"unknown option(s) {', '.join(unknown)} in {where}",
            f"valid options: {', '.join(sorted(fields)) or 'none'}",
        )
    values = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    try:
        built = options_cls(**values)
    except (TypeError, ValueError) as exc:
        raise QcompileError(f"invalid options in {where}: {exc}", "see `qcompile recipes`") from exc
    validate = getattr(built, "validate", None)
    if validate:
        validate(where)
    return built


def run_passes(
    gm: torch.fx.GraphModule, passes: list[QPass], on_stage=None
) -> torch.fx.GraphModule:
    """Run ``passes`` in order; a failure names the pass and those before it.

    ``on_stage(stage, gm)`` is called after each pass that completes a parity-ladder stage
    (its ``ladder_stage``), so ``verify`` can keep a copy of the graph at that point.
    """
    done: list[str] = []
    for qpass in passes:
        try:
            result = qpass(gm)
        except QcompileError:
            raise
        except Exception as exc:
            before = ", ".join(done) or "none"
            raise RuntimeError(
                f"pass {qpass.name!r} failed (passes run before it: {before}): {exc}"
            ) from exc
        gm = result.graph_module if result is not None else gm
        done.append(qpass.name)
        qpass.context.passes_run.append(
            {"name": qpass.name, "options": dataclasses.asdict(qpass.options)}
        )
        if on_stage is not None and qpass.ladder_stage:
            on_stage(qpass.ladder_stage, gm)
    return gm
