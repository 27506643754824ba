"""The calibration engine: run the model one decoder block at a time.

Calibrated weight algorithms (GPTQ, AWQ, FlexRound, LRQ, AdaDim) all need, for each decoder
block, the activations entering it *from the already-quantized blocks before it* (and, for
block-output reconstruction, the float block's outputs on float inputs as targets). Running the
whole model per sample would keep every layer's activations alive; instead::

    capture the inputs of block 0 and every block's keyword arguments (mask, rotary
        tables: they differ between sliding-window and global layers); no block is run
    for each block:
        copy the block (float32, onto the calibration device)        <- one block in memory
        [targets = float block(float inputs)]                        (reconstruction only)
        algorithm(job): quantize the copy's linears in place, record integer weights
        inputs = quantized block(inputs)                              <- next block's inputs

Only the current block and its activations are alive at any time; with ``spill`` the
activations live on disk between uses, so what must fit is one block plus one batch. The model
passed in is never modified: algorithms write into the copy and report what changed
(:class:`BlockJob.qweights`, :class:`BlockJob.float_updates`) for the graph pass to apply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import pathlib
import tempfile
import time
from collections.abc import Callable, Iterator

import torch

from qcompile.console import console, progress_bar
from qcompile.errors import QcompileError
from qcompile.calibration.streamed_blocks import float_copy, kept_results, real_outside_blocks
from qcompile.hf_adapter import decoder_layers

__all__ = [
    "ActivationStore",
    "BlockAlgorithm",
    "BlockJob",
    "CalibrationResult",
    "decoder_blocks",
    "run_block_calibration",
]


class ActivationStore:
    """Per-batch activations of one point in the model, in memory or spilled to disk."""

    def __init__(self, spill_dir: pathlib.Path | None = None, tag: str = "act"):
        self._spill_dir, self._tag = spill_dir, tag
        self._items: list = []

    def append(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if self._spill_dir is None:
            self._items.append(tensor)
            return
        path = self._spill_dir / f"{self._tag}-{len(self._items)}.pt"
        torch.save(tensor.cpu(), path)
        self._items.append(path)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        return torch.load(item) if isinstance(item, pathlib.Path) else item

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def clear(self) -> None:
        for item in self._items:
            if isinstance(item, pathlib.Path):
                item.unlink(missing_ok=True)
        self._items = []


def decoder_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """``(prefix, blocks)``: the ModuleList holding the model's ``num_hidden_layers`` blocks."""
    try:
        return decoder_layers(model)
    except ValueError as exc:
        raise QcompileError(f"cannot find the decoder blocks of {type(model).__name__}: {exc}",
                            "calibrated passes need the decoder layers as one ModuleList") from exc


class _StopForward(Exception):
    pass


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


@dataclasses.dataclass
class BlockJob:
    """One block's calibration work: a private float copy and its activations."""

    index: int
    prefix: str  # "model.layers.3"
    block: torch.nn.Module
    inputs: ActivationStore
    kwargs: list[dict]
    targets: ActivationStore | None
    device: torch.device
    qweights: dict = dataclasses.field(default_factory=dict)
    float_updates: dict = dataclasses.field(default_factory=dict)
    progress: Callable[[str], None] = lambda text: None

    def linears(self) -> dict[str, torch.nn.Linear]:
        """Relative module name -> Linear, in definition order."""
        return {n: m for n, m in self.block.named_modules() if isinstance(m, torch.nn.Linear)}

    def path(self, relative: str) -> str:
        return f"{self.prefix}.{relative}"

    def store(self, name: str, qweight) -> None:
        """Keep ``qweight`` as linear ``name``'s result, and put its dequantized weight in the
        block so that the linears quantized after it see its error."""
        linear = self.linears()[name]
        linear.weight.data = qweight.dequantize().to(linear.weight.device)
        self.qweights[self.path(name)] = qweight

    @torch.no_grad()
    def forward(self, batch: int, block: torch.nn.Module | None = None) -> torch.Tensor:
        block = block or self.block
        x = self.inputs[batch].to(self.device)
        return _block_output(block(x, **_to(self.kwargs[batch], self.device)))

    def forward_with_grad(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        return _block_output(self.block(x, **_to(self.kwargs[batch], self.device)))

    def observe_inputs(self, names: list[str], observe: Callable[[str, torch.Tensor], None]):
        """Run every batch through the block, calling ``observe(name, x)`` with the input
        of each linear in ``names`` (as ``[tokens, in_features]``).

        Each batch's forward stops as soon as all of ``names`` have been seen: collecting
        q/k/v inputs needs only the first norm, not attention and the MLP."""
        modules = self.linears()
        seen: set[str] = set()

        def hook(module, args, name):
            observe(name, args[0].reshape(-1, args[0].shape[-1]))
            seen.add(name)
            if len(seen) == len(names):
                raise _StopForward

        hooks = [modules[name].register_forward_pre_hook(
            lambda mod, args, name=name: hook(mod, args, name)) for name in names]
        try:
            for batch in range(len(self.inputs)):
                seen.clear()
                try:
                    self.forward(batch)
                except _StopForward:
                    pass
        finally:
            for h in hooks:
                h.remove()

    def call_groups(self) -> list[list[str]]:
        """Linears grouped by shared input, in the order the block calls them (q/k/v, o,
        gate/up, down for Llama): the order of GPTQ's true-sequential quantization."""
        calls: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps them distinct
        modules = self.linears()
        hooks = [
            module.register_forward_pre_hook(
                lambda mod, args, name=name: calls.append((name, args[0])))
            for name, module in modules.items()
        ]
        try:
            self.forward(0)
        finally:
            for hook in hooks:
                hook.remove()
        groups: list[list[str]] = []
        last_input = None
        for name, x in calls:
            if groups and x is last_input and name not in groups[-1]:
                groups[-1].append(name)
            elif not any(name in g for g in groups):
                groups.append([name])
            last_input = x
        return groups


class BlockAlgorithm:
    """What a calibrated pass plugs into the engine: one object per calibration run, which
    may keep what it found along the way for :meth:`layer_notes` and :meth:`facts`."""

    #: shown in progress output
    label: str = "calibrating"
    #: block-output reconstruction needs the float model's outputs as targets
    needs_float_targets: bool = False

    def process(self, job: BlockJob) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def layer_notes(self) -> dict[str, dict]:
        """Per-layer facts (by module path) for the record and report.json's layers."""
        return {}

    def facts(self) -> dict:
        """Facts about the whole run for report.json's calibration section."""
        return {}


@dataclasses.dataclass
class CalibrationResult:
    qweights: dict
    float_updates: dict
    seconds: float
    peak_activation_bytes: int


def _as_keywords(block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    """``(hidden states, every other argument by name)`` of a call to ``block`` (GPT-2 passes
    its attention mask positionally)."""
    signature = inspect.signature(type(block).forward)
    bound = signature.bind(block, *args, **kwargs).arguments
    named = {}
    for name, value in list(bound.items())[1:]:  # [0] is self
        kind = signature.parameters[name].kind
        named.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    first = "hidden_states" if "hidden_states" in named else next(iter(named))
    return named.pop(first), named


def _shared_copy(kwargs: dict, seen: list[tuple[dict, dict]]) -> dict:
    """``kwargs`` on the CPU, reusing an earlier block's copy when every value is the same
    object (the layers of one type share one mask and one rotary table)."""
    for raw, copied in seen:
        if raw.keys() == kwargs.keys() and all(raw[k] is v for k, v in kwargs.items()):
            return copied
    copied = {k: _to(v, "cpu") for k, v in kwargs.items()}
    seen.append((kwargs, copied))
    return copied


@contextlib.contextmanager
def _recording_blocks(blocks, store: ActivationStore, block_kwargs: list[list[dict]]):
    """Within the block, every decoder block only records its arguments and hands its input
    on unchanged; the last one stops the forward. Each block's own keyword arguments are kept
    because they differ between layer types (Gemma 2/3, OLMo 3: a sliding-window or a global
    mask, Gemma 3: rotary tables of another base), at no cost: no block computes anything."""
    seen: list[tuple[dict, dict]] = []

    def stand_in(index: int, block: torch.nn.Module):
        def forward(*args, **kwargs):
            hidden, named = _as_keywords(block, args, kwargs)
            if index == 0:
                store.append(hidden)
                seen.clear()
            block_kwargs[index].append(_shared_copy(named, seen))
            if index == len(blocks) - 1:
                raise _StopForward
            return hidden
        return forward

    for index, block in enumerate(blocks):
        block.forward = stand_in(index, block)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def _capture_first_inputs(model, blocks, samples, batch_size, store, block_kwargs):
    """Block 0's inputs into ``store`` and every block's keyword arguments per batch into
    ``block_kwargs[block]``."""
    with _recording_blocks(blocks, store, block_kwargs), torch.no_grad():
        for start in range(0, samples.shape[0], batch_size):
            try:
                model(input_ids=samples[start: start + batch_size], use_cache=False)
            except _StopForward:
                pass


def _outputs(block, inputs: ActivationStore, kwargs, device, spill_dir, tag) -> ActivationStore:
    out = ActivationStore(spill_dir, tag)
    with torch.no_grad():
        for i in range(len(inputs)):
            x = inputs[i].to(device)
            out.append(_block_output(block(x, **_to(kwargs[i], device))).to("cpu"))
    return out


def _log_block(label: str, done: int, total: int, start: float) -> None:
    """One line per block where the live bar cannot redraw (logs, CI)."""
    if console.is_terminal:
        return
    elapsed = time.perf_counter() - start
    left = elapsed / done * (total - done)
    console.print(f"  {label}: block {done}/{total} done, {elapsed:.0f} s elapsed, "
                  f"about {left:.0f} s left")


def _record_float_changes(job: BlockJob, before: dict[str, torch.Tensor]) -> None:
    """Float parameters the algorithm changed (AWQ's folded scales), by full name; the
    weights of quantized linears are reported as integer weights instead."""
    quantized = {f"{path}.weight" for path in job.qweights}
    for name, param in job.block.named_parameters():
        full = job.path(name)
        if full in quantized or full in job.float_updates:
            continue
        value = param.detach().to("cpu")
        if not torch.equal(value, before[name].detach().to("cpu", torch.float32)):
            job.float_updates[full] = value.clone()


def _updates_by_block(updates: dict, prefix: str, count: int) -> list[dict]:
    """``updates`` split by decoder block, names relative to the block; an update outside
    every block is refused (no float-only stage writes one)."""
    by_block: list[dict] = [{} for _ in range(count)]
    for name, value in updates.items():
        index, _, relative = name.removeprefix(f"{prefix}.").partition(".")
        if not name.startswith(f"{prefix}.") or not index.isdigit() or int(index) >= count:
            raise QcompileError(f"an earlier calibrated stage changed {name}, outside the "
                                "decoder blocks", "put that pass after the calibrated one")
        by_block[int(index)][relative] = value
    return by_block


def _take_updates(block: torch.nn.Module, before: dict, updates: dict) -> None:
    """Write an earlier stage's values into the block copy; they become the "before" this
    stage's own changes are measured against."""
    params = dict(block.named_parameters())
    for name, value in updates.items():
        params[name].data = value.to(params[name].device, torch.float32).clone()
        before[name] = value


def _store_bytes(*stores) -> int:
    return sum(s[i].numel() * s[i].element_size() for s in stores if s is not None
               for i in range(len(s)) if not isinstance(s._items[i], pathlib.Path))


def run_block_calibration(
    model: torch.nn.Module,
    samples: torch.Tensor,
    algorithm: BlockAlgorithm,
    batch_size: int = 8,
    spill: bool = False,
    device: str | torch.device = "cpu",
    prior_updates: dict[str, torch.Tensor] | None = None,
) -> CalibrationResult:
    """Run ``algorithm`` over every decoder block of ``model`` (which is left unchanged).

    ``prior_updates`` (full parameter name -> value) are an earlier float-only stage's
    results (SmoothQuant's folded scales): each block's copy takes them before the algorithm
    sees it, and only what changes beyond them is reported."""
    start = time.perf_counter()
    device = torch.device(device)
    prefix, blocks = decoder_blocks(model)
    prior = _updates_by_block(prior_updates or {}, prefix, len(blocks))
    with tempfile.TemporaryDirectory(prefix="qcompile-spill-") as tmp:
        spill_dir = pathlib.Path(tmp) if spill else None
        inputs, block_kwargs = ActivationStore(spill_dir, "in"), [[] for _ in blocks]
        with real_outside_blocks(model, blocks):
            _capture_first_inputs(model, blocks, samples, batch_size, inputs, block_kwargs)
        float_inputs = inputs if algorithm.needs_float_targets else None
        qweights, float_updates, peak = {}, {}, 0
        bar, task = progress_bar(f"{algorithm.label}: block 1/{len(blocks)}", len(blocks))
        with bar:
            for index, original in enumerate(blocks):
                kwargs = block_kwargs[index]
                block, before = float_copy(original, device)
                _take_updates(block, before, prior[index])
                targets = None
                if float_inputs is not None:
                    targets = _outputs(block, float_inputs, kwargs, device, spill_dir,
                                       f"target{index}")
                job = BlockJob(index, f"{prefix}.{index}", block, inputs, kwargs, targets, device)
                job.progress = lambda text, i=index: bar.update(
                    task, description=f"{algorithm.label}: block {i + 1}/{len(blocks)} {text}")
                job.progress("")
                algorithm.process(job)
                _record_float_changes(job, before)
                qweights.update(kept_results(job.qweights))
                float_updates.update(job.float_updates)
                peak = max(peak, _store_bytes(inputs, targets, float_inputs))
                next_inputs = _outputs(block, inputs, kwargs, device, spill_dir, f"in{index}")
                if float_inputs is not None:
                    # the next block's float inputs are this block's float outputs
                    if float_inputs is not inputs:
                        float_inputs.clear()
                    float_inputs = targets
                if inputs is not float_inputs:
                    inputs.clear()
                inputs = next_inputs
                del block, job
                bar.advance(task)
                _log_block(algorithm.label, index + 1, len(blocks), start)
    seconds = time.perf_counter() - start
    console.print(f"  {algorithm.label}: {len(qweights)} weights over {len(blocks)} blocks in "
                  f"{seconds:.1f} s")
    return CalibrationResult(qweights, float_updates, round(seconds, 3), peak)
