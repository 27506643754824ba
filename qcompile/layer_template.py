"""Compile a decoder of alike layers by capturing three of them (the streamed compile).

``torch.export`` (twice: before and after the passes), ``torch.onnx``, its optimizer and ORT's
fusions walk every decoder layer, though the layers of a decoder are one structure with different weights: at 30 layers
that fixed cost was most of a small model's compile. When the layers are alike (the same
module types, parameter shapes and settings; recipe passes that treat every layer alike), the
compile captures, quantizes, exports, optimizes and fuses the model cut to its first three
layers, and :mod:`qcompile.lowering.instantiate_layers` copies the third into the remaining
ones in the lowered ONNX graph. Each copy's weights are the template's computations repeated
on that layer's checkpoint tensors (:meth:`qcompile.lazy_weights.LazyWeights.retarget`; packed
siblings stacked again), made real only as the bundle is written, as every streamed weight is.

Anything that makes layers differ (per-layer attention kinds such as Gemma's sliding windows,
layer-specific recipe settings, a pass that calibrates) keeps the whole capture, and
report.json's ``graph.capture`` says which was used and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

from qcompile.capture import WRAPPER_ATTRIBUTE, prepare_for_capture
from qcompile.hf_adapter import decoder_layers, text_config
from qcompile.lazy_weights import LazyWeight, LazyWeights, is_fake
from qcompile.lowering.instantiate_layers import LayerCopies, LayerTemplateError, layer_pattern
from qcompile.lowering.pack_matmul_nbits import StackedTensor
from qcompile.pass_infra import PassContext

__all__ = ["LayerTemplate", "plan_template"]

#: layers captured: the first (which fusions make unlike the others), the one compared with
#: the template, and the template
CAPTURED = 3
#: the captured layer the others are copied from
TEMPLATE = CAPTURED - 1
#: per-layer attributes that name the layer rather than configure it
_INDEX_ATTRIBUTES = frozenset({"layer_idx", "layer_index", "layer_id", "layer_number"})
_PLAIN = (bool, int, float, str, type(None))


def _settings(module: torch.nn.Module) -> tuple:
    """What makes one decoder layer compute differently from another of the same class: its
    submodules' types, plain attributes and parameter / buffer shapes."""
    described = []
    for name, sub in module.named_modules():
        plain = tuple(sorted((k, v) for k, v in vars(sub).items()
                             if not k.startswith("_") and k not in _INDEX_ATTRIBUTES
                             and isinstance(v, _PLAIN)))
        described.append((name, type(sub).__qualname__, plain))
    tensors = [(n, tuple(t.shape), t.dtype) for n, t in
               (*module.named_parameters(remove_duplicate=False), *module.named_buffers())]
    return tuple(described), tuple(tensors)


def _config_reason(model) -> str | None:
    kinds = getattr(text_config(model.config), "layer_types", None)
    if kinds and len(set(kinds)) > 1:
        return f"its layers are of {len(set(kinds))} kinds ({', '.join(sorted(set(kinds)))})"
    return None


def _layers_reason(layers) -> str | None:
    template = _settings(layers[TEMPLATE])
    for index, layer in enumerate(layers):
        if _settings(layer) != template:
            return f"layer {index} is configured unlike layer {TEMPLATE}"
    return None


def _passes_reason(recipe, model_type: str, paths: list[tuple[str, str]]) -> str | None:
    for qpass in recipe.instantiate(PassContext(model_type)):
        if not qpass.layer_uniform:
            return f"pass {qpass.name} does not treat every layer alike"
        for template_path, path in paths:
            if not qpass.treats_alike(template_path, path):
                return f"pass {qpass.name}'s options treat {path} unlike {template_path}"
    return None


def _module_paths(layers_path: str, layers, count: int) -> list[tuple[str, str]]:
    """``(template module path, the same module's path in layer i)`` for every module and
    layer."""
    names = [name for name, _ in layers[TEMPLATE].named_modules()]
    return [(f"{layers_path}.{TEMPLATE}.{n}".rstrip("."), f"{layers_path}.{i}.{n}".rstrip("."))
            for i in range(count) for n in names]


@dataclasses.dataclass
class LayerTemplate:
    """How a streamed compile captures the decoder: three layers grown to ``count``
    (``reason`` None), or all of them (``reason`` says why)."""

    reason: str | None
    layers_path: str = ""
    layers: torch.nn.ModuleList | None = None
    model: torch.nn.Module | None = None
    weights: LazyWeights | None = None
    _memos: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def count(self) -> int:
        return len(self.layers) if self.layers is not None else 0

    @property
    def used(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict:
        if self.used:
            return {"kind": "template", "layers_captured": CAPTURED, "layers": self.count}
        return {"kind": "whole", "reason": self.reason}

    @contextlib.contextmanager
    def cut(self):
        """The model with only its first ``CAPTURED`` layers (config included) for the
        capture."""
        if not self.used:
            yield
            return
        prepare_for_capture(self.model)  # every layer's Conv1D a Linear, not only the two cut
        owner_path, _, attribute = self.layers_path.rpartition(".")
        owner = self.model.get_submodule(owner_path) if owner_path else self.model
        full, config = self.layers, text_config(self.model.config)
        saved = {k: getattr(config, k) for k in ("num_hidden_layers", "n_layer", "layer_types")
                 if getattr(config, k, None) is not None}
        setattr(owner, attribute, torch.nn.ModuleList(list(full)[:CAPTURED]))
        for key, value in saved.items():
            setattr(config, key, value[:CAPTURED] if key == "layer_types" else CAPTURED)
        try:
            yield
        finally:
            setattr(owner, attribute, full)
            for key, value in saved.items():
                setattr(config, key, value)

    def signature(self, captured):
        """The full decoder's signature from the captured one's."""
        return dataclasses.replace(captured, cache=dataclasses.replace(
            captured.cache, num_layers=self.count))

    def layer_entries(self, layers: dict[str, dict]) -> dict[str, dict]:
        """report.json's per-module entries with the template layer's repeated for the
        instantiated layers (in layer order, where the whole capture lists them)."""
        pattern = layer_pattern(self.layers_path, TEMPLATE)
        template = [k for k in layers if pattern.search(k)]
        grown: dict[str, dict] = {}
        for key, entry in layers.items():
            grown[key] = entry
            if template and key == template[-1]:
                for index in range(CAPTURED, self.count):
                    grown.update({pattern.sub(rf"\g<1>{index}", k): dict(layers[k])
                                  for k in template})
        return grown

    def copies(self) -> LayerCopies:
        """What :func:`~qcompile.lowering.instantiate_layers.instantiate_layers` needs."""
        return LayerCopies(f"{WRAPPER_ATTRIBUTE}.{self.layers_path}", self.count,
                           self._tensor_for, TEMPLATE)

    def _tensor_for(self, value, index: int):
        """Layer ``index``'s tensor for the template's initializer ``value``: that layer's
        checkpoint tensor, or the template's computation repeated on them."""
        pattern = layer_pattern(self.layers_path, TEMPLATE)
        rename = lambda text: pattern.sub(rf"\g<1>{index}", text)  # noqa: E731
        return self._retargeted(value.const_value, value.name, index, rename)

    def _retargeted(self, tensor, name: str, index: int, rename):
        import onnx_ir as ir
        from onnx_ir.tensor_adapters import TorchTensor

        if isinstance(tensor, StackedTensor):  # sibling matmuls packed into one
            return StackedTensor([self._retargeted(part, part.name, index, rename)
                                  for part in tensor.parts], rename(name))
        if isinstance(tensor, LazyWeight):
            swap, memo = self._retargeting(index)
            fake = self.weights.retarget(tensor.fake, swap, memo, rename)
            return self.weights.lazy_tensor(fake, rename(name))
        if isinstance(tensor, ir.LazyTensor):
            raise LayerTemplateError(f"initializer {name} is computed by a lowering step the "
                                     "copies cannot repeat")
        own = self._state.get(name.removeprefix(f"{WRAPPER_ATTRIBUTE}."))
        theirs = self._state.get(rename(name).removeprefix(f"{WRAPPER_ATTRIBUTE}."))
        if own is None or theirs is None or is_fake(own) or not _same_values(own, tensor):
            raise LayerTemplateError(f"initializer {name} is not a tensor of the checkpoint "
                                     "the other layers have their own of")
        return TorchTensor(theirs.detach(), name=rename(name))

    @functools.cached_property
    def _state(self) -> dict[str, torch.Tensor]:
        """The full model's parameters and buffers by name (read after :meth:`cut`)."""
        return {**dict(self.model.named_parameters(remove_duplicate=False)),
                **dict(self.model.named_buffers())}

    def _retargeting(self, index: int) -> tuple:
        """``(swap, memo)`` for layer ``index``, made once per layer: ``swap`` maps a template
        layer tensor to this layer's; the one memo lets a linear's codes, scales and zero
        points share one quantize call."""
        if index not in self._memos:
            def tensors(layer):
                return (*layer.named_parameters(remove_duplicate=False), *layer.named_buffers())

            template = {id(t): n for n, t in tensors(self.layers[TEMPLATE])}
            target = dict(tensors(self.layers[index]))

            def swap(tensor: torch.Tensor):
                name = template.get(id(tensor))
                return None if name is None else target[name]

            self._memos[index] = (swap, {})
        return self._memos[index]


def _same_values(state: torch.Tensor, tensor) -> bool:
    """Whether the graph's ``tensor`` holds the checkpoint's ``state`` unchanged (not a value
    the optimizer folded from it under the same name)."""
    raw = getattr(tensor, "raw", None)
    if not isinstance(raw, torch.Tensor):
        raw = torch.from_numpy(tensor.numpy().copy())
    state = state.detach()
    return raw.shape == state.shape and raw.dtype == state.dtype and torch.equal(raw, state)


def plan_template(model, recipe, model_type: str, weights: LazyWeights | None) -> LayerTemplate:
    """Whether ``model``'s decoder can be captured as ``CAPTURED`` layers (see the module
    docstring)."""
    if weights is None:
        return LayerTemplate("the whole model is loaded (not streamed)")
    try:
        path, layers = decoder_layers(model)
    except ValueError as exc:
        return LayerTemplate(str(exc))
    if len(layers) <= CAPTURED:
        return LayerTemplate(f"the decoder has {len(layers)} layers")
    reason = (_config_reason(model) or _layers_reason(layers)
              or _passes_reason(recipe, model_type, _module_paths(path, layers, len(layers))))
    if reason:
        return LayerTemplate(reason)
    return LayerTemplate(None, path, layers, model, weights)
