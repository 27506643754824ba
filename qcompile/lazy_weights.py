"""Weights that exist only as shapes until the bundle is written: the streamed compile.

A streamed compile captures, quantizes and exports a *skeleton* model whose matrices are
``FakeTensor``s (shape and dtype, no data; :mod:`qcompile.skeleton`), so the graph work costs
kilobytes whatever the model's size. Every fake tensor knows how to become real:

* a checkpoint matrix reads its one tensor from the safetensors file (:meth:`LazyWeights.add`);
* a tensor a pass computes from fake inputs (RTN's codes and scales, ``pack_weights``' packed
  bytes) is recorded by :func:`derive` with the function and arguments that made it, and is
  recomputed from the real inputs when asked.

:meth:`LazyWeights.to_lazy_tensors` turns the exported ONNX model's fake initializers into
``onnx_ir.LazyTensor``s, so ``ir.save`` reads, quantizes, packs and writes one weight at a time,
appending to the external data file and freeing it: the full-precision model is never resident.
Results are cached per call for as long as the few siblings written next to each other need
them (``qweight``, ``scales``, ``zero_points`` of one linear; the bundle writes initializers
sorted by name, so siblings are adjacent).

Outside a streamed compile nothing here is active: :func:`derive` calls the function, and
:func:`materialize` returns its argument.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import itertools
import pathlib
import shutil
import tempfile
import threading
from typing import Callable

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import from_torch_dtype
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

__all__ = ["LazyWeight", "LazyWeights", "active", "derive", "is_fake", "materialize"]

_ACTIVE: contextvars.ContextVar["LazyWeights | None"] = contextvars.ContextVar(
    "qcompile_lazy_weights", default=None)
#: calls whose results stay cached (a linear's quantize and pack, the q/k/v of a fused pack)
_CACHED_CALLS = 8


class LazyWeight(ir.LazyTensor):
    """An initializer of the exported graph that is a fake tensor until it is written;
    ``fake`` is that tensor, so a decoder layer copied in the ONNX graph
    (:mod:`qcompile.layer_template`) can compute its own from it."""

    def __init__(self, fake: torch.Tensor, produce: Callable, name: str):
        self.fake = fake
        super().__init__(produce, dtype=from_torch_dtype(fake.dtype),
                         shape=ir.Shape(tuple(fake.shape)), name=name)


def is_fake(value) -> bool:
    return isinstance(value, FakeTensor)


def active() -> "LazyWeights | None":
    """The registry of the streamed compile in progress (None: a whole-model compile)."""
    return _ACTIVE.get()


def derive(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``; inside a streamed compile, when an argument holds fake tensors,
    the fake results are recorded so each can be recomputed from the real arguments later."""
    registry = active()
    result = fn(*args, **kwargs)
    if registry is not None and _has_fake((args, kwargs)):
        registry.record(fn, args, kwargs, result)
    return result


def materialize(value):
    """``value`` with every fake tensor in it made real (only inside a streamed compile)."""
    registry = active()
    return value if registry is None else registry.realize(value)


def _spilled_reader(path, name: str) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as file:
            return file.get_tensor(name)

    return read


def _leaves(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [leaf for f in dataclasses.fields(value)
                for leaf in _leaves(getattr(value, f.name))]
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    return []


def _map_tensors(value, fn: Callable[[torch.Tensor], torch.Tensor],
                 on_str: Callable[[str], str] | None = None):
    """``value`` (a tensor, a dataclass, a tuple / list / dict of them) with ``fn`` applied to
    every tensor in it (and ``on_str`` to every string, when given)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, str):
        return on_str(value) if on_str is not None else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{
            f.name: _map_tensors(getattr(value, f.name), fn, on_str)
            for f in dataclasses.fields(value) if f.init})
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn, on_str) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn, on_str) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn, on_str) for k, v in value.items()}
    return value


def _has_fake(value) -> bool:
    return any(is_fake(leaf) for leaf in _leaves(value))


class LazyWeights:
    """Fake tensors of one streamed compile and how to make each real."""

    def __init__(self):
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._producers: dict[int, Callable[[], torch.Tensor]] = {}
        #: how each derived fake was made: ``(call, fn, args, kwargs, leaf index)``
        self._derived: dict[int, tuple] = {}
        self._keep: list = []  # the fake tensors, so their ids stay theirs
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self._calls = itertools.count()
        self._spills = itertools.count()
        self._spill_dir: pathlib.Path | None = None

    @contextlib.contextmanager
    def activated(self):
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)
            if self._spill_dir is not None:
                shutil.rmtree(self._spill_dir, ignore_errors=True)
                self._spill_dir = None

    def spill(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write ``tensors`` (a calibrated block's integer weights) to one safetensors file
        in this compile's spill directory and return a fake tensor for each that reads it
        back when the bundle is written; the directory goes when the compile ends."""
        from safetensors.torch import save_file

        if self._spill_dir is None:
            self._spill_dir = pathlib.Path(tempfile.mkdtemp(prefix="qcompile-weights-"))
        path = self._spill_dir / f"spill-{next(self._spills)}.safetensors"
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(path))
        return {name: self.add(self.fake(t.shape, t.dtype), _spilled_reader(path, name))
                for name, t in tensors.items()}

    def fake(self, shape, dtype=torch.float32) -> torch.Tensor:
        with self.mode:
            return torch.empty(tuple(shape), dtype=dtype)

    def add(self, fake: torch.Tensor, producer: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Register ``producer`` as the way to make ``fake`` real."""
        self._producers[id(fake)] = producer
        self._keep.append(fake)
        return fake

    def record(self, fn: Callable, args: tuple, kwargs: dict, result) -> None:
        """Register every fake tensor of ``result`` as a leaf of ``fn`` on the real arguments."""
        call = next(self._calls)
        for index, leaf in enumerate(_leaves(result)):
            if is_fake(leaf) and id(leaf) not in self._producers:
                self.add(leaf, lambda c=call, i=index: self._call(c, fn, args, kwargs)[i])
                self._derived[id(leaf)] = (call, fn, args, kwargs, index)

    def retarget(self, tensor: torch.Tensor, swap: Callable[[torch.Tensor], torch.Tensor | None],
                 memo: dict, rename: Callable[[str], str] | None = None) -> torch.Tensor:
        """``tensor`` as it would have been computed from other inputs: ``swap(t)`` gives the
        tensor standing in for ``t`` (a layer's weight for the template layer's) or None to
        keep ``t``; ``rename`` maps the string arguments (module paths). A derived fake gets a new fake whose producer repeats the recorded call
        on the swapped arguments; ``memo`` (one per target) makes the siblings of one call
        (a linear's codes, scales and zero points) share one new call, computed once.

        This is how a decoder layer instantiated from a captured one
        (:mod:`qcompile.layer_template`) gets its own weights without being captured."""
        swapped = swap(tensor)
        if swapped is not None:
            return swapped
        derived = self._derived.get(id(tensor)) if is_fake(tensor) else None
        if derived is None:
            return tensor
        call, fn, args, kwargs, index = derived
        if call not in memo:
            again = lambda t: self.retarget(t, swap, memo, rename)  # noqa: E731
            new_args = _map_tensors(args, again, rename)
            new_kwargs = _map_tensors(kwargs, again, rename)
            memo[call] = (next(self._calls), new_args, new_kwargs, {})
        new_call, new_args, new_kwargs, leaves = memo[call]
        if index not in leaves:
            leaves[index] = self.add(
                self.fake(tensor.shape, tensor.dtype),
                lambda: self._call(new_call, fn, new_args, new_kwargs)[index])
            self._derived[id(leaves[index])] = (new_call, fn, new_args, new_kwargs, index)
        return leaves[index]

    def _call(self, call: int, fn: Callable, args: tuple, kwargs: dict) -> list:
        """The leaves of one recorded call, computed once for the siblings that ask for them
        close together, also from two threads (the bundle writes one weight while the next
        is made, :mod:`qcompile.lowering.write_ahead`): the second asker waits for the
        first's result."""
        with self._lock:
            pending = self._cache.get(call)
            owner = pending is None
            if owner:
                pending = self._cache[call] = concurrent.futures.Future()
            self._cache.move_to_end(call)
            while len(self._cache) > _CACHED_CALLS:
                self._cache.popitem(last=False)
        if owner:
            try:
                pending.set_result(_leaves(fn(*self.realize(args), **self.realize(kwargs))))
            except BaseException as exc:
                pending.set_exception(exc)
                with self._lock:
                    self._cache.pop(call, None)
                raise
        return pending.result()

    def real(self, tensor: torch.Tensor) -> torch.Tensor:
        """The real value of ``tensor`` (itself when it is not fake)."""
        if not is_fake(tensor):
            return tensor
        producer = self._producers.get(id(tensor))
        if producer is None:
            raise RuntimeError(f"a fake tensor of shape {tuple(tensor.shape)} has no producer: "
                               "a pass computed it without qcompile.lazy_weights.derive")
        value = producer()
        if tuple(value.shape) != tuple(tensor.shape) or value.dtype != tensor.dtype:
            raise RuntimeError(f"a producer made {tuple(value.shape)} {value.dtype} for a "
                               f"{tuple(tensor.shape)} {tensor.dtype} fake tensor")
        return value

    def realize(self, value):
        """``value`` (a tensor, a dataclass of tensors, a tuple / list / dict) made real."""
        return _map_tensors(value, self.real)

    def to_lazy_tensors(self, model, on_write: Callable[[str, int], None] | None = None) -> int:
        """Replace each fake initializer of the onnx-ir ``model`` by a :class:`LazyWeight` that
        makes it real when it is written; returns how many were replaced. ``on_write(name,
        bytes)`` is called as each one is produced (progress)."""
        replaced = 0
        for value in model.graph.initializers.values():
            raw = getattr(value.const_value, "raw", None)
            if not is_fake(raw):
                continue
            value.const_value = self.lazy_tensor(raw, value.name, on_write)
            replaced += 1
        return replaced

    def lazy_tensor(self, fake: torch.Tensor, name: str, on_write=None) -> "LazyWeight":
        """An ONNX tensor that is ``fake`` made real when it is written."""
        from onnx_ir.tensor_adapters import TorchTensor

        def produce():
            tensor = TorchTensor(self.real(fake).contiguous(), name=name)
            if on_write is not None:
                on_write(name, tensor.nbytes)
            return tensor

        return LazyWeight(fake, produce, name)
