"""Shared fixtures: tiny randomly initialised models of every supported architecture.

Each is saved with ``save_pretrained`` to a temporary directory, so tests go through the same
loading path users do. Sizes are tiny (hidden 64, 2 layers) but keep the real structure:
grouped-query attention, tied and untied heads, biases (Qwen2, GPT-2, OPT, StableLM), fused
projections (Phi-3), GPT-2's Conv1D, partial rotary (Phi, StableLM, Nemotron), q/k norms
(Qwen3, OLMo-2, Gemma 3), Granite's four multipliers, OLMo's clipped q/k/v, SmolLM3's layers
without rotary, Nemotron's ``1 + w`` LayerNorm and squared-ReLU MLP, and Gemma's scaled
embedding, ``1 + w`` RMSNorm, sandwich norms and tied head.

Gemma 2, Gemma 3 and OLMo 3 alternate sliding-window and global layers with a window of 4
positions, shorter than every test prompt, so the window really cuts. Soft-capping is on:
attention (Gemma 2; Gemma 3's config field is ignored by transformers, so it stays unset) and
final logits (both), with caps sized to the tiny model's scores (attention ~0.07, logits ~0.6)
so that ``tanh`` is far from linear where it is applied.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256)
#: Gemma 2 / Gemma 3 / OLMo 3 sliding-window layers see 4 positions: less than any test prompt
SLIDING_WINDOW = 4


def _configs():
    import transformers as hf

    llama_like = dict(TINY, intermediate_size=128, num_key_value_heads=2)
    return {
        "llama": hf.LlamaConfig(**llama_like, tie_word_embeddings=True),
        "qwen2": hf.Qwen2Config(**llama_like, tie_word_embeddings=False),
        "mistral": hf.MistralConfig(**llama_like, sliding_window=None),
        "phi3": hf.Phi3Config(**llama_like, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "gpt2": hf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                              bos_token_id=0, eos_token_id=0),
        "opt": hf.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, ffn_dim=128, max_position_embeddings=256,
                            word_embed_proj_dim=64, pad_token_id=1),
        **_newer_configs(hf, llama_like),
    }


def _sliding_and_global(hf_config, llama_like, **extra):
    """A config whose layer 0 is sliding-window (window 4) and layer 1 global."""
    return hf_config(**llama_like, sliding_window=SLIDING_WINDOW,
                     layer_types=["sliding_attention", "full_attention"], **extra)


def _newer_configs(hf, llama_like):
    """The architectures beyond the first six (see the module docstring for what each adds)."""
    heads16 = dict(llama_like, head_dim=16)
    gemma = dict(heads16, query_pre_attn_scalar=16, attn_logit_softcapping=0.05,
                 final_logit_softcapping=0.5)
    return {
        "qwen3": hf.Qwen3Config(**heads16),
        # 2 heads of 32, half rotated: ORT's GroupQueryAttention takes 8-wide rotary tables
        "phi": hf.PhiConfig(**dict(llama_like, num_attention_heads=2, num_key_value_heads=1)),
        "gemma": hf.GemmaConfig(**heads16),
        "gemma2": _sliding_and_global(hf.Gemma2Config, gemma),
        "gemma3_text": _sliding_and_global(hf.Gemma3TextConfig,
                                           dict(gemma, attn_logit_softcapping=None)),
        "granite": hf.GraniteConfig(**llama_like, embedding_multiplier=12.0,
                                    logits_scaling=8.0, residual_multiplier=0.22,
                                    attention_multiplier=0.015625),
        "olmo": hf.OlmoConfig(**llama_like, clip_qkv=0.3, pad_token_id=1, eos_token_id=0),
        "olmo2": hf.Olmo2Config(**llama_like, pad_token_id=1, eos_token_id=0),
        "olmo3": _sliding_and_global(hf.Olmo3Config, dict(llama_like, pad_token_id=1,
                                                         eos_token_id=0)),
        "nemotron": hf.NemotronConfig(**llama_like),
        "smollm3": hf.SmolLM3Config(**llama_like, no_rope_layer_interval=2, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2),
        "stablelm": hf.StableLmConfig(**llama_like, use_qkv_bias=True),
        "internlm3": hf.InternLM3Config(**heads16),
    }


ARCHITECTURES = ("llama", "qwen2", "mistral", "phi3", "gpt2", "opt", "qwen3", "phi", "gemma",
                 "gemma2", "gemma3_text", "granite", "olmo", "olmo2", "olmo3", "nemotron",
                 "smollm3", "stablelm", "internlm3")


def extended(*values):
    """A parameter set that repeats a default test's path (another architecture, recipe or
    fallback): marked ``extended``, so the default suite stays short and ``--all`` runs it."""
    return pytest.param(*values, marks=pytest.mark.extended)


#: the architectures the default suite compiles and verifies for ``ort`` (the rest: extended,
#: and samples/check_latest.sh runs every one): tied and untied heads with biases, Conv1D,
#: fused projections, sliding windows with q/k norms and ``1 + w`` norms, squared ReLU
ORT_DEFAULT = ("llama", "qwen2", "gpt2", "phi3", "gemma3_text", "nemotron")
#: the same for ``onnx-qdq``
QDQ_DEFAULT = ("llama", "gpt2")


def save_tiny_model(arch: str, directory: pathlib.Path) -> pathlib.Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[arch])
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(arch)`` -> a saved tiny model directory (made once per session)."""
    made: dict[str, pathlib.Path] = {}

    def make(arch: str = "llama") -> pathlib.Path:
        if arch not in made:
            made[arch] = save_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return made[arch]

    return make


def pytest_collection_modifyitems(items):
    """The end-to-end tests on the real default model (``slow``, ~15 minutes) go first, so
    under pytest-xdist one worker starts them at once while the other takes the rest, instead
    of one of them running them alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
