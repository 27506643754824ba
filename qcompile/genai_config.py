"""``genai_config.json``: what onnxruntime-genai needs to load a bundle as a decoder.

Written from the source model's config and the export signature, in the form the model
builder writes (``model.decoder.inputs/outputs`` name patterns, head counts, context length,
search defaults). A float cache is genai's own layout, and so is a cache that
GroupQueryAttention quantizes itself (``+kv8-gqa``: past/present are codes, nothing else); the
explicit quantized caches of the KV-quant pass are not (their cache inputs are codes plus
scales, described in ``report.json``), so those bundles run with qcompile's own loop.
genai rejects unknown keys, so nothing qcompile-specific goes in this file.
"""

from __future__ import annotations

import json
import pathlib

from qcompile.capture import ExportSignature
from qcompile.bundle.files import GENAI_CONFIG_FILE, MODEL_FILE

__all__ = ["GENAI_CONFIG_FILE", "GENAI_MODEL_TYPES", "genai_config", "write_genai_config"]

#: model types onnxruntime-genai 0.18 knows by name (its model builder writes them; each is
#: also the Hugging Face ``model_type``). Every one was run with qcompile's I/O and generates
#: the own loop's tokens; for these bundles the name changes nothing, since attention, sliding
#: windows, soft-capping and embedding scales are all inside the graph. genai refuses a name
#: it does not know ("Unsupported model_type"), so the rest (OLMo-2/3, StableLM, InternLM3,
#: OPT, and GPT-2, whose genai class wants other inputs) load as its generic "decoder".
GENAI_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "granite", "llama", "mistral",
                     "nemotron", "olmo", "phi", "phi3", "qwen2", "qwen3", "smollm3")


def _token_id(config, tokenizer, name: str, fallback: int) -> int | list[int]:
    value = getattr(config, name, None)
    if value is None and tokenizer is not None:
        value = getattr(tokenizer, name, None)
    return fallback if value is None else value


def _context_length(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return 2048


def genai_config(config, model_type: str, signature: ExportSignature, tokenizer=None,
                 share_buffer: bool = False, model_file: str = MODEL_FILE) -> dict:
    """The ``genai_config.json`` content for a bundle exported with ``signature``.

    ``share_buffer`` (graphs whose attention is ``GroupQueryAttention``): genai binds one
    max-length buffer per cache tensor as both past and present, and the op writes the new
    positions in place instead of copying the whole cache every step. Graphs that concatenate
    past and new keys need separate buffers. qcompile's own loop feeds present -> past either
    way (the op accepts both forms). ``model_file`` is the file the decoder loads
    (``model.ort`` for ``ort-mobile``).
    """
    cache = signature.cache
    eos = _token_id(config, tokenizer, "eos_token_id", 0)
    context = _context_length(config)
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": model_file,
        "head_size": cache.head_dim,
        "hidden_size": int(config.hidden_size),
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "past_key_names": "past_key_values.%d.key",
                   "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": int(config.num_attention_heads),
        "num_hidden_layers": cache.num_layers,
        "num_key_value_heads": cache.kv_heads,
    }
    return {
        "model": {
            "bos_token_id": _token_id(config, tokenizer, "bos_token_id", eos),
            "context_length": context,
            "decoder": decoder,
            "eos_token_id": eos,
            "pad_token_id": _token_id(config, tokenizer, "pad_token_id",
                                      eos[0] if isinstance(eos, list) else eos),
            "type": model_type if model_type in GENAI_MODEL_TYPES else "decoder",
            "vocab_size": int(config.vocab_size),
        },
        "search": {
            "do_sample": False, "early_stopping": True, "max_length": context,
            "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
            "past_present_share_buffer": share_buffer,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write_genai_config(bundle: pathlib.Path, config, model_type: str,
                       signature: ExportSignature, tokenizer=None,
                       share_buffer: bool = False, model_file: str = MODEL_FILE) -> pathlib.Path:
    path = pathlib.Path(bundle) / GENAI_CONFIG_FILE
    content = genai_config(config, model_type, signature, tokenizer, share_buffer, model_file)
    path.write_text(json.dumps(content, indent=4) + "\n")
    return path
