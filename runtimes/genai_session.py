"""onnxruntime-genai as a second engine: the runtime the model builder's bundles are made for.

It is the reference for "does our bundle decode like the builder's does" and the fair engine
for speed comparisons with the builder's bundles. It only understands float caches named by
genai_config.json, so :func:`genai_can_run` says when a bundle (e.g. one with a quantized cache)
must go through :class:`qcompile.runtimes.generation.OrtGenerator` instead.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np

from qcompile.errors import QcompileError
from qcompile.bundle.files import GENAI_CONFIG_FILE, MODEL_FILE, MODEL_FILES, check_bundle_files
from qcompile.runtimes.cache_layout import graph_inputs, value_info
from qcompile.runtimes.generation import (
    PAST_PREFIX,
    Sampling,
    load_genai_config,
    matches_format,
)

__all__ = ["ENGINES", "GenaiSession", "choose_engine", "genai_can_run"]

ENGINES = ("auto", "genai", "ort")

_FLOAT_TYPES = {"tensor(float)", "tensor(float16)"}


def genai_can_run(bundle) -> tuple[bool, str]:
    """Whether onnxruntime-genai can run ``bundle``, and why (not).

    Returns:
        ``(True, reason)`` or ``(False, reason)``; reasons name the blocking file or input.
    """
    bundle = pathlib.Path(bundle)
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False, "onnxruntime-genai is not installed"
    if not (bundle / GENAI_CONFIG_FILE).is_file():
        return False, f"the bundle has no {GENAI_CONFIG_FILE}"
    if not any((bundle / name).is_file() for name in MODEL_FILES):
        return False, f"the bundle has no {' or '.join(MODEL_FILES)}"
    return _graph_fits_genai(bundle)


def choose_engine(requested: str, bundles) -> tuple[str, str]:
    """Resolve ``auto|genai|ort`` for ``bundles`` (all must run on the chosen engine).

    Returns:
        ``(engine, reason)`` with engine ``"genai"`` or ``"ort"``.
    """
    if requested not in ENGINES:
        raise QcompileError(f"unknown engine {requested!r}", f"choose one of {ENGINES}")
    if requested == "ort":
        return "ort", "requested (--engine ort)"
    verdicts = [(pathlib.Path(b), *genai_can_run(b)) for b in bundles]
    blocked = [(b, why) for b, ok, why in verdicts if not ok]
    if requested == "genai":
        if blocked:
            bundle, why = blocked[0]
            raise QcompileError(f"onnxruntime-genai cannot run {bundle}: {why}",
                                "use --engine ort (qcompile's own generation loop)")
        return "genai", "requested (--engine genai)"
    if blocked:
        bundle, why = blocked[0]
        return "ort", f"onnxruntime-genai cannot run {bundle}: {why}"
    return "genai", "onnxruntime-genai can run " + (
        "every bundle" if len(verdicts) > 1 else "the bundle") + f" ({verdicts[0][2]})"


def _graph_fits_genai(bundle: pathlib.Path) -> tuple[bool, str]:
    import onnx
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    unreadable = (QcompileError, OSError, ValueError,
                  onnx.onnx_cpp2py_export.checker.ValidationError, ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidProtobuf,
                  ort_state.NoSuchFile, ort_state.RuntimeException)
    try:
        decoder = load_genai_config(bundle)["model"]["decoder"]
        inputs, in_attention = _cache_inputs(bundle / decoder.get("filename", MODEL_FILE))
    except unreadable as exc:
        return False, f"cannot read the bundle: {exc}"
    formats = [decoder.get("inputs", {}).get(k, "") for k in ("past_key_names",
                                                               "past_value_names")]
    for node in inputs:
        if not node.name.startswith(PAST_PREFIX):
            continue
        if node.type not in _FLOAT_TYPES and node.name not in in_attention:
            return False, (f"cache input {node.name} is "
                           f"{node.type.removeprefix('tensor(').rstrip(')')} (a quantized "
                           "cache outside GroupQueryAttention); onnxruntime-genai only feeds "
                           "float caches and the ones GroupQueryAttention quantizes")
        if not any(f and matches_format(f, node.name) for f in formats):
            return False, (f"cache input {node.name} is not one of genai_config's "
                           "past_key_names / past_value_names")
    kind = "quantized inside GroupQueryAttention" if in_attention else "float"
    return True, f"{kind} KV cache named by genai_config.json"


def _cache_inputs(model_path: pathlib.Path) -> tuple[list, set[str]]:
    """The graph's inputs and those a quantizing ``GroupQueryAttention`` reads as its past
    key / value (genai binds them like float caches, the op quantizes); an ONNX file is read
    once."""
    import onnx

    if model_path.suffix == ".ort":
        from qcompile.targets.ort_mobile.ort_file import quantized_attention_inputs

        return graph_inputs(model_path), quantized_attention_inputs(model_path)
    graph = onnx.load(str(model_path), load_external_data=False).graph
    names: set[str] = set()
    for node in graph.node:
        if node.op_type == "GroupQueryAttention" and any(
                a.name == "kv_cache_bit_width" and a.i for a in node.attribute):
            names.update(node.input[3:5])
    return [value_info(v) for v in graph.input], names


class GenaiSession:
    """An ``onnxruntime_genai.Model`` with its tokenizer; streams generated token ids.

    Args:
        bundle: bundle directory with genai_config.json.
        threads: intra-op threads (0 = the bundle's / ONNX Runtime's default).
        require_tokenizer: refuse a bundle without tokenizer files (generation from token
            ids does not need one).
    """

    def __init__(self, bundle, threads: int = 0, require_tokenizer: bool = True):
        import onnxruntime_genai as og

        self.og = og
        self.bundle = check_bundle_files(bundle, tokenizer=require_tokenizer)
        ok, reason = genai_can_run(self.bundle)
        if not ok:
            raise QcompileError(f"onnxruntime-genai cannot run {self.bundle}: {reason}",
                                "use --engine ort (qcompile's own generation loop)")
        self.genai_config = load_genai_config(self.bundle)
        config = og.Config(str(self.bundle))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self._tokenizer = None
        model = self.genai_config["model"]
        self.context_length = int(model.get("context_length") or 0) or None
        self.vocab_size = int(model.get("vocab_size") or 0)

    @property
    def tokenizer(self):
        """genai's tokenizer, loaded on first use (token-id generation does not need it)."""
        if self._tokenizer is None:
            try:
                self._tokenizer = self.og.Tokenizer(self.model)
            except RuntimeError as exc:
                raise QcompileError(f"onnxruntime-genai cannot load the tokenizer of "
                                    f"{self.bundle}: {exc}",
                                    "use --engine ort (Hugging Face tokenizer)") from exc
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with genai's tokenizer."""
        return [int(t) for t in self.tokenizer.encode(text)]

    def decoder_stream(self):
        """A genai ``TokenizerStream``: ``.decode(token)`` returns the new text piece."""
        return self.tokenizer.create_stream()

    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int = 64,
               sampling: Sampling | None = None, stop_at_eos: bool = True) -> Iterator[int]:
        """Yield new token ids for one prompt as genai produces them.

        Args:
            prompt_ids: the prompt's token ids.
            max_new_tokens: upper bound on generated tokens.
            sampling: token choice (default greedy).
            stop_at_eos: stop after an end-of-sequence token; when false, genai's
                ``min_length`` keeps it from choosing one (benchmarks use a fixed length).
        """
        generator = self._generator(prompt_ids, max_new_tokens, sampling or Sampling(),
                                    stop_at_eos)
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 64,
                 sampling: Sampling | None = None, stop_at_eos: bool = True) -> list[int]:
        """All new token ids for one prompt."""
        return list(self.stream(prompt_ids, max_new_tokens, sampling, stop_at_eos))

    def _generator(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Sampling,
                   stop_at_eos: bool = True):
        ids = np.asarray(prompt_ids, dtype=np.int32).reshape(-1)
        if ids.size == 0:
            raise QcompileError("the prompt is empty", "pass at least one token of prompt")
        total = ids.size + max_new_tokens
        if self.context_length and total > self.context_length:
            raise QcompileError(
                f"prompt of {ids.size} tokens + {max_new_tokens} new tokens = {total} exceeds "
                f"the model's context length of {self.context_length} "
                "(genai_config.json model.context_length)",
                "shorten the prompt or lower --max-new-tokens")
        params = self.og.GeneratorParams(self.model)
        options = {"max_length": total, "do_sample": not sampling.greedy}
        if not stop_at_eos:
            options["min_length"] = total
        if not sampling.greedy:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p,
                           top_k=sampling.top_k or self.vocab_size or 1 << 30)
            if sampling.seed is not None:
                options["random_seed"] = sampling.seed
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)
        return generator
