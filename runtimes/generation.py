"""Token generation over a bundle with plain ONNX Runtime: prefill, then decode with a KV cache.

onnxruntime-genai runs the builder's bundles, but not bundles whose cache is quantized (uint8 /
int8 codes plus scales), and it hides the step logits the parity harness wants to compare. This
loop needs nothing but an ``InferenceSession`` and one rule: every graph input named
``past_key_values.X`` is fed, on the next step, from the output ``present.X`` (so quantized
caches with extra scale tensors work unchanged). The past-sequence axis of a cache tensor is
the one whose symbolic name mentions "past" (or "total" on outputs), else axis 2.

Usage::

    gen = OrtGenerator("out/bundle")
    for token in gen.stream([1, 504, 3458], max_new_tokens=32):
        ...
    logprobs = gen.score_continuation(context_ids, continuation_ids)
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from qcompile.bundle.files import (GENAI_CONFIG_FILE, REPORT_FILE, TOKENIZER_FILES,
                                   check_bundle_files, model_file)
from qcompile.errors import QcompileError
from qcompile.runtimes.cache_layout import (PAST_PREFIX, PRESENT_PREFIX, CacheSlot, GraphOutput,
                                            cache_bytes_per_token, cache_slots, graph_outputs)
from qcompile.runtimes.ort_runner import session_options

__all__ = [
    "PAST_PREFIX",
    "PRESENT_PREFIX",
    "CacheSlot",
    "OrtGenerator",
    "Sampling",
    "Step",
    "GraphOutput",
    "bundle_accuracy_level",
    "bundle_cache_bytes_per_token",
    "cache_slots",
    "cache_bytes_per_token",
    "generate",
    "graph_outputs",
    "load_genai_config",
    "load_tokenizer",
    "matches_format",
    "select_tokens",
]


# --------------------------------------------------------------------------- bundle files


def load_genai_config(bundle) -> dict:
    """``genai_config.json`` of ``bundle`` as a dict (a clear error when absent or invalid)."""
    path = pathlib.Path(bundle) / GENAI_CONFIG_FILE
    if not path.is_file():
        raise QcompileError(f"bundle {bundle} has no {GENAI_CONFIG_FILE}",
                            "re-create the bundle, or write its genai_config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise QcompileError(f"{path} is not valid JSON: {exc}", "re-create the bundle") from exc
    if not isinstance(config.get("model"), dict) or not isinstance(
            config["model"].get("decoder"), dict):
        raise QcompileError(f"{path} has no model.decoder section",
                            "re-create the bundle's genai_config.json")
    return config


def load_tokenizer(bundle):
    """The bundle's Hugging Face tokenizer (``AutoTokenizer`` from the bundle directory)."""
    from transformers import AutoTokenizer

    bundle = pathlib.Path(bundle)
    for name in TOKENIZER_FILES:
        if not (bundle / name).is_file():
            raise QcompileError(f"bundle {bundle} has no {name}",
                                f"copy the source model's {name} into the bundle")
    try:
        return AutoTokenizer.from_pretrained(str(bundle))
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable tokenizer
        raise QcompileError(f"cannot load the tokenizer of {bundle}: {exc}",
                            "re-save the tokenizer with save_pretrained") from exc


def bundle_accuracy_level(bundle) -> int:
    """``target.accuracy_level`` from the bundle's report.json, 0 when there is none."""
    path = pathlib.Path(bundle) / REPORT_FILE
    try:
        return int(json.loads(path.read_text())["target"]["accuracy_level"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


# --------------------------------------------------------------------------- cache layout


def bundle_cache_bytes_per_token(bundle) -> int:
    """:func:`cache_bytes_per_token` of a bundle, without creating a session."""
    bundle = check_bundle_files(bundle, tokenizer=False)
    decoder = load_genai_config(bundle)["model"]["decoder"]
    outputs = graph_outputs(bundle / decoder.get("filename", model_file(bundle).name))
    return cache_bytes_per_token(outputs, decoder.get("head_size"))


# --------------------------------------------------------------------------- config checks


def _check_config(config: dict, session: ort.InferenceSession, path: pathlib.Path) -> None:
    """Refuse a genai_config.json that names inputs, outputs or shapes the graph lacks."""
    decoder = config["model"]["decoder"]
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    where = f"{path} disagrees with the model"
    fix = "re-create genai_config.json from the model, or re-build the bundle"
    layers = decoder.get("num_hidden_layers")
    key_format = decoder.get("inputs", {}).get("past_key_names")
    if layers is not None and key_format:
        found = sum(1 for n in inputs if matches_format(key_format, n))
        if found != layers:
            raise QcompileError(f"{where}: model.decoder.num_hidden_layers is {layers}, the "
                                f"graph has {found} inputs named {key_format}", fix)
    for section, names in (("inputs", inputs), ("outputs", outputs)):
        for field, value in decoder.get(section, {}).items():
            for name in _expand(value, layers or 0):
                if name not in names:
                    raise QcompileError(f"{where}: model.decoder.{section}.{field} names "
                                        f"{name!r}, which is not a graph {section[:-1]}", fix)
    if key_format and layers:
        _check_cache_dims(decoder, inputs[key_format % 0], where, fix)


def _packs_head_dim(type_name: str) -> bool:
    """A uint8 cache holds quantized codes; int4 packs two per byte, so its last axis is not
    head_size (qcompile's KV-quant layout, described in report.json)."""
    return type_name == "tensor(uint8)"


def _check_cache_dims(decoder: dict, key_input, where: str, fix: str) -> None:
    shape = list(key_input.shape)
    checks = [("num_key_value_heads", 1)]
    if not _packs_head_dim(key_input.type):
        checks.append(("head_size", len(shape) - 1))
    for field, axis in checks:
        want, have = decoder.get(field), shape[axis] if axis < len(shape) else None
        if want is not None and isinstance(have, int) and have != want:
            raise QcompileError(f"{where}: model.decoder.{field} is {want}, the graph's "
                                f"{key_input.name} has {have} at axis {axis}", fix)


def _check_present_dims(decoder: dict, presents: dict[str, np.ndarray], key_format: str,
                        path: pathlib.Path) -> None:
    """Check head counts and head size against a present output actually computed."""
    name = key_format.replace("past_key_values.", "present.") % 0 if key_format else None
    array = presents.get(name)
    if array is None or array.ndim != 4:
        return
    checks = (("num_key_value_heads", 1),) if array.dtype == np.uint8 else (
        ("num_key_value_heads", 1), ("head_size", 3))
    for field, axis in checks:
        want = decoder.get(field)
        if want is not None and array.shape[axis] != want:
            raise QcompileError(
                f"{path} disagrees with the model: model.decoder.{field} is {want}, the graph "
                f"computes {name} with {array.shape[axis]} at axis {axis}",
                "re-create genai_config.json from the model, or re-build the bundle")


def matches_format(format_: str, name: str) -> bool:
    """Whether ``name`` is ``format_`` (e.g. ``past_key_values.%d.key``) for some integer."""
    head, _, tail = format_.partition("%d")
    middle = name[len(head):len(name) - len(tail)] if tail else name[len(head):]
    return name.startswith(head) and name.endswith(tail) and middle.isdigit()


def _expand(value, layers: int) -> list[str]:
    if not isinstance(value, str):
        return []
    return [value % i for i in range(layers)] if "%d" in value else [value]


# --------------------------------------------------------------------------- sampling


@dataclasses.dataclass
class Sampling:
    """How the next token is chosen: greedy (argmax) or sampled.

    Attributes:
        greedy: argmax when true; the other fields are then ignored.
        temperature: logits are divided by it before the softmax (> 0).
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set whose probability reaches top_p (1.0 = all).
        seed: seed of the ``numpy.random.Generator`` (None = fresh entropy).
    """

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise QcompileError(f"temperature must be > 0, got {self.temperature}",
                                "pass a positive --temperature, or use --greedy")
        if self.top_k < 0:
            raise QcompileError(f"top_k must be >= 0, got {self.top_k}", "0 keeps all tokens")
        if not 0 < self.top_p <= 1:
            raise QcompileError(f"top_p must be in (0, 1], got {self.top_p}",
                                "1.0 keeps all tokens")


def select_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """Next token per row of ``logits`` [batch, vocab] (greedy or sampled)."""
    if sampling.greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)
    return np.array([_sample_row(row, sampling, rng) for row in logits], dtype=np.int64)


def _sample_row(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    scaled = logits.astype(np.float64) / sampling.temperature
    order = np.argsort(-scaled, kind="stable")
    if sampling.top_k:
        order = order[: sampling.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])


# --------------------------------------------------------------------------- the generator


@dataclasses.dataclass
class Step:
    """One generated position: the chosen tokens [batch] and the logits they came from."""

    tokens: np.ndarray
    logits: np.ndarray


class OrtGenerator:
    """Prefill + cached decode over a bundle's ``model.onnx`` on the ONNX Runtime CPU EP.

    Args:
        bundle: bundle directory (model.onnx, genai_config.json, tokenizer files).
        threads: intra-op threads (0 = ONNX Runtime's default).
        accuracy_level: MatMulNBits compute type; None = report.json's, else 0.
        require_tokenizer: refuse a bundle without tokenizer files.
        spin: let idle intra-op threads busy-wait. Off by default: per-token steps are short
            and, on the 2-core machine, spinning threads halved decode speed (SmolLM2 int4:
            24 ms/step spinning, 12.5 ms/step not).
    """

    def __init__(self, bundle, threads: int = 0, accuracy_level: int | None = None,
                 require_tokenizer: bool = True, spin: bool = False):
        self.bundle = check_bundle_files(bundle, require_tokenizer)
        self.config = load_genai_config(self.bundle)
        model = self.config["model"]
        self.decoder = model["decoder"]
        level = bundle_accuracy_level(self.bundle) if accuracy_level is None else accuracy_level
        options = session_options(True, level, threads)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.session = ort.InferenceSession(
            str(self.bundle / self.decoder.get("filename", model_file(self.bundle).name)), options,
            providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        _check_config(self.config, self.session, self.bundle / GENAI_CONFIG_FILE)
        self.slots = cache_slots(self.session)
        self.head_size = self.decoder.get("head_size")
        self.context_length = int(model.get("context_length") or 0) or None
        eos = model.get("eos_token_id", [])
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        names = self.decoder.get("inputs", {})
        self.ids_name = names.get("input_ids", "input_ids")
        self.mask_name = names.get("attention_mask", "attention_mask")
        self.positions_name = names.get("position_ids", "position_ids")
        self.logits_name = self.decoder.get("outputs", {}).get("logits", "logits")
        self._probe()

    # ----------------------------------------------------------------- low level

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zero-length cache inputs for a first step."""
        return {s.past: s.empty(batch, self.head_size) for s in self.slots}

    def forward(self, ids: np.ndarray, cache: dict[str, np.ndarray], past_len: int,
                run_options: ort.RunOptions | None = None
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run ``ids`` [batch, seq] after ``past_len`` cached positions.

        Returns:
            The logits [batch, seq, vocab] and the next step's cache inputs.
        """
        ids = np.asarray(ids, dtype=np.int64)
        batch, seq = ids.shape
        feeds = {self.ids_name: ids,
                 self.mask_name: np.ones((batch, past_len + seq), dtype=np.int64), **cache}
        if self.positions_name in self.input_names:
            feeds[self.positions_name] = np.broadcast_to(
                np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy()
        names = [self.logits_name] + [s.present for s in self.slots]
        results = self.session.run(names, feeds, run_options)
        next_cache = {s.past: r for s, r in zip(self.slots, results[1:])}
        return results[0], next_cache

    def forward_full(self, ids) -> np.ndarray:
        """Logits [batch, seq, vocab] of a full-sequence forward with no cache (reference)."""
        ids = _as_batch(ids, "ids")
        return self.forward(ids, self.empty_cache(len(ids)), 0)[0]

    def _probe(self) -> None:
        """One token through the graph: shape errors surface here, as a config mismatch."""
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4
        try:
            _, presents = self.forward(np.zeros((1, 1), dtype=np.int64), self.empty_cache(1), 0,
                                       quiet)
        except (ort_state.Fail, ort_state.InvalidArgument, ort_state.RuntimeException) as exc:
            raise QcompileError(
                f"{self.bundle / GENAI_CONFIG_FILE} does not fit the model: a first step with its "
                f"model.decoder.head_size {self.head_size} failed "
                f"({str(exc).splitlines()[0][-300:]})",
                "re-create genai_config.json from the model") from exc
        by_present = {s.present: presents[s.past] for s in self.slots}
        _check_present_dims(self.decoder, by_present,
                            self.decoder.get("inputs", {}).get("past_key_names", ""),
                            self.bundle / GENAI_CONFIG_FILE)

    def cache_bytes_per_token(self) -> int:
        """Cache bytes per position (batch 1); see :func:`cache_bytes_per_token`."""
        return cache_bytes_per_token(self.session.get_outputs(), self.head_size)

    def check_length(self, prompt_len: int, max_new_tokens: int = 0) -> None:
        """Refuse an empty prompt or one that (with the new tokens) exceeds the context."""
        if prompt_len == 0:
            raise QcompileError("the prompt is empty", "pass at least one token of prompt")
        if self.context_length and prompt_len + max_new_tokens > self.context_length:
            raise QcompileError(
                f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens = "
                f"{prompt_len + max_new_tokens} exceeds the model's context length of "
                f"{self.context_length} (genai_config.json model.context_length)",
                "shorten the prompt or lower --max-new-tokens")

    # ----------------------------------------------------------------- generation

    def steps(self, prompt_ids, max_new_tokens: int = 64, sampling: Sampling | None = None,
              stop_at_eos: bool = True) -> Iterator[Step]:
        """Generate position by position; rows of equal length are decoded as a batch.

        Args:
            prompt_ids: token ids, 1-D (one prompt) or 2-D [batch, seq].
            max_new_tokens: upper bound on generated positions.
            sampling: token choice (default greedy).
            stop_at_eos: stop once every row has produced an end-of-sequence token (rows that
                finished earlier are fed end-of-sequence tokens meanwhile). False ignores
                end-of-sequence tokens altogether: every row keeps its own greedy / sampled
                choice (what parity checks and benchmarks need).

        Yields:
            A :class:`Step` per generated position.
        """
        ids = _as_batch(prompt_ids, "prompt")
        self.check_length(ids.shape[1], max_new_tokens)
        sampling = sampling or Sampling()
        rng = np.random.default_rng(sampling.seed)
        done = np.zeros(len(ids), dtype=bool)
        cache, past_len = self.empty_cache(len(ids)), 0
        for _ in range(max_new_tokens):
            logits, cache = self.forward(ids, cache, past_len)
            past_len += ids.shape[1]
            last = logits[:, -1, :]
            tokens = select_tokens(last, sampling, rng)
            if stop_at_eos and done.any():
                tokens[done] = self._pad_token()
            yield Step(tokens, last)
            done |= np.isin(tokens, list(self.eos_token_ids))
            if stop_at_eos and done.all():
                return
            ids = tokens[:, None]

    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int = 64,
               sampling: Sampling | None = None, stop_at_eos: bool = True) -> Iterator[int]:
        """Yield the token ids of one prompt as they are produced (eos included)."""
        for step in self.steps(prompt_ids, max_new_tokens, sampling, stop_at_eos):
            yield int(step.tokens[0])

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 64,
                 sampling: Sampling | None = None, stop_at_eos: bool = True,
                 return_logits: bool = False):
        """All new token ids of one prompt, optionally with the step logits [steps, vocab]."""
        tokens, logits = [], []
        for step in self.steps(prompt_ids, max_new_tokens, sampling, stop_at_eos):
            tokens.append(int(step.tokens[0]))
            logits.append(step.logits[0])
        if return_logits:
            return tokens, np.stack(logits) if logits else np.zeros((0, 0), np.float32)
        return tokens

    def score_continuation(self, context_ids: Sequence[int],
                           continuation_ids: Sequence[int]) -> np.ndarray:
        """Log-probabilities of ``continuation_ids`` after ``context_ids``, through the cache.

        The context is prefilled; the continuation then runs as one chunk with the context's
        cache as past, so a quantized cache is exercised exactly as in decoding.

        Returns:
            float64 array, one log-probability per continuation token.
        """
        context = _as_batch(context_ids, "context")
        continuation = _as_batch(continuation_ids, "continuation")
        if continuation.shape[1] == 0:
            raise QcompileError("the continuation is empty", "pass at least one token to score")
        self.check_length(context.shape[1], continuation.shape[1])
        first, cache = self.forward(context, self.empty_cache(1), 0)
        rest, _ = self.forward(continuation, cache, context.shape[1])
        logits = np.concatenate([first[:, -1:], rest[:, :-1]], axis=1)[0].astype(np.float64)
        logprobs = logits - _logsumexp(logits)
        return logprobs[np.arange(continuation.shape[1]), continuation[0]]

    def _pad_token(self) -> int:
        pad = self.config["model"].get("pad_token_id")
        return int(pad if isinstance(pad, int) else min(self.eos_token_ids, default=0))


def _as_batch(ids, what: str) -> np.ndarray:
    array = np.asarray(ids, dtype=np.int64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise QcompileError(f"the {what} must be a list of token ids (or equal-length rows), "
                            f"got shape {array.shape}", "pass a flat list of ids")
    if array.shape[1] == 0:
        raise QcompileError(f"the {what} is empty", "pass at least one token")
    return array


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    peak = logits.max(axis=-1, keepdims=True)
    return peak + np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True))


def generate(bundle, prompt_ids: Sequence[int], max_new_tokens: int = 64,
             sampling: Sampling | None = None, threads: int = 0) -> list[int]:
    """Convenience: load ``bundle`` and return the new token ids for ``prompt_ids``."""
    return OrtGenerator(bundle, threads).generate(prompt_ids, max_new_tokens, sampling)
