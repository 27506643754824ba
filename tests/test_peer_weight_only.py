"""samples/peer_weight_only.py: the parts that make the ModelOpt / llm-compressor rows fair.

Without the peer venvs: the AWQ ``pre_quant_scale`` folding, the calibration tokens handed to
the peers (our calibration windows, nothing else), and the recipes' settings. With a peer venv
(skipped otherwise): its peer side on a tiny Llama saves a float model that computes what the
peer's quantized model computes.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLE = REPO / "samples" / "peer_weight_only.py"
MODELOPT = pathlib.Path("/work/peers/modelopt/bin/python")
LLMC = pathlib.Path("/work/peers/llmc/bin/python")


@functools.cache
def _sample():
    spec = importlib.util.spec_from_file_location("peer_weight_only", SAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class _CharTokenizer:
    """Duck-typed tokenizer: one id per character (``ord % 128``), no special tokens."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": torch.tensor([[ord(c) % 128 for c in text]])}


def test_folded_pre_quant_scale_computes_what_modelopt_computes():
    fold = _sample().fold_pre_quant_scale
    torch.manual_seed(0)
    weight, x = torch.randn(8, 16), torch.randn(4, 16)
    scale = torch.rand(16) + 0.5
    fake_quant = torch.round(weight * 2) / 2  # any fixed weight the quantizer produced
    peer = (x * scale) @ fake_quant.T  # ModelOpt: input * pre_quant_scale, then the weight
    assert torch.allclose(x @ fold(fake_quant, scale).T, peer, atol=1e-6)
    assert not torch.allclose(x @ (fake_quant / scale).T, peer, atol=1e-3)  # the test can fail
    assert fold(fake_quant, None) is fake_quant
    with pytest.raises(ValueError, match="input columns"):
        fold(fake_quant, torch.ones(8))  # one factor per output row is the wrong axis


def test_peers_get_exactly_our_calibration_windows(tmp_path):
    from qcompile.text_data import default_text

    sample = _sample()
    options = sample.calibration_options_of(sample.recipe_paths())
    assert (options.samples, options.seq_len, options.seed, options.data) == (32, 512, 0,
                                                                                "default")
    path = tmp_path / "tokens.pt"
    tokens = sample.calibration_tokens(options, _CharTokenizer(), 128, path)
    # derived independently: 32 consecutive windows from the start of the first half
    ids = torch.tensor([ord(c) % 128 for c in default_text()])
    calibration_half = ids[: ids.numel() // 2]
    expected = calibration_half[: 32 * 512].reshape(32, 512)
    assert tokens.dtype == torch.int64 and torch.equal(tokens, expected)
    assert torch.equal(torch.load(path), expected)


def test_recipes_that_calibrate_differently_are_refused(tmp_path):
    sample = _sample()
    other = tmp_path / "other.yaml"
    other.write_text("name: other\npasses:\n  - gptq: {calibration: {samples: 16}}\n"
                     "  - pack_weights\n")
    with pytest.raises(SystemExit, match="calibrate differently"):
        sample.calibration_options_of([*sample.recipe_paths(), other])


@pytest.mark.parametrize("name, group, symmetric", [
    ("peer-g128-sym-awq", 128, True), ("peer-g128-sym-gptq", 128, True),
    ("peer-g128-sym-flexround", 128, True), ("peer-g64-asym-gptq", 64, False),
    ("peer-g64-asym-flexround", 64, False)])
def test_peer_recipes_match_the_peers_setting(name, group, symmetric):
    from qcompile.recipes import load_recipe

    options = load_recipe(str(REPO / "samples" / "recipes" / f"{name}.yaml")).weight_options()
    assert (options.bits, options.group_size, options.symmetric) == (4, group, symmetric)
    assert options.lm_head is None and options.embedding is None  # both peers keep them float
    assert (options.calibration.samples, options.calibration.seq_len) == (32, 512)


def _tiny_llama(directory: pathlib.Path) -> pathlib.Path:
    """Hidden 192 (a partial group of 128, like SmolLM2's 576), tied head, a tokenizer."""
    from test_generation import save_tiny_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=192, intermediate_size=384,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    save_tiny_tokenizer(directory)
    return directory


def _run_peer(python: pathlib.Path, tool: str, tmp_path: pathlib.Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    model = _tiny_llama(tmp_path / "model")
    torch.save(torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(1)),
               tmp_path / "tokens.pt")
    out = tmp_path / "out"
    subprocess.run([str(python), str(SAMPLE), "--peer-side", tool, "--model", str(model),
                    "--tokens", str(tmp_path / "tokens.pt"), "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    facts = json.loads((out / "peer.json").read_text())
    before, after = load_file(model / "model.safetensors"), load_file(out / "model.safetensors")
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not facts["qcompile_imported"] and facts["calibration_tokens_match"]
    assert facts["quantized_linears"] == 14 and facts["weights_replaced"] == 14
    assert facts["mean_relative_weight_change"] > 0.01  # 4-bit weights, not the float ones
    assert facts["logits_max_abs_diff"] <= 1e-4 * facts["logits_max_abs"]
    return facts, after


@pytest.mark.skipif(not MODELOPT.exists(), reason="needs the ModelOpt venv /work/peers/modelopt")
def test_modelopt_peer_side_saves_what_its_awq_model_computes(tmp_path):
    facts, _ = _run_peer(MODELOPT, "modelopt", tmp_path)
    assert facts["with_pre_quant_scale"] == 14
    assert facts["float_linears"] == ["model.embed_tokens", "lm_head"]


@pytest.mark.skipif(not LLMC.exists(), reason="needs the llm-compressor venv /work/peers/llmc")
def test_llmc_peer_side_saves_its_gptq_weights(tmp_path):
    facts, weights = _run_peer(LLMC, "llmc", tmp_path)
    assert not facts["lm_head_quantized"] and facts["weight_off_grid_max"] == 0.0
    # groups of 64, asymmetric: at most 16 distinct values per group of a row
    q = weights["model.layers.0.mlp.up_proj.weight"].reshape(-1, 64)
    assert max(len(torch.unique(row)) for row in q) <= 16
