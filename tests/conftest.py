"""Shared fixtures: tiny randomly initialised models of every supported architecture.

Each is saved with ``save_pretrained`` to a temporary directory, so tests go through the same
loading path users do. Sizes are tiny (hidden 64, 2 layers) but keep the real structure:
grouped-query attention, tied and untied heads, biases (Qwen2, GPT-2, OPT), fused projections
(Phi-3), GPT-2's Conv1D.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256)


def _configs():
    from transformers import (GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Phi3Config,
                              Qwen2Config)

    llama_like = dict(TINY, intermediate_size=128, num_key_value_heads=2)
    return {
        "llama": LlamaConfig(**llama_like, tie_word_embeddings=True),
        "qwen2": Qwen2Config(**llama_like, tie_word_embeddings=False),
        "mistral": MistralConfig(**llama_like, sliding_window=None),
        "phi3": Phi3Config(**llama_like, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "gpt2": GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                           bos_token_id=0, eos_token_id=0),
        "opt": OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, ffn_dim=128, max_position_embeddings=256,
                         word_embed_proj_dim=64, pad_token_id=1),
    }


ARCHITECTURES = ("llama", "qwen2", "mistral", "phi3", "gpt2", "opt")


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
