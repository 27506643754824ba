"""Every supported architecture captures, compiles for both targets and passes ``verify``,
onnxruntime-genai generates from the bundle what qcompile's own loop does, and the features
some families bring (sliding windows, ``1 + w`` norms, soft-capping; mixture-of-experts and
recurrent layers, refused) are checked where they act.

Tiny random models: the parity ladder runs every stage (``onnx.reference`` where the graph
holds no fused ORT ops), the integer codes in the ONNX file must equal the torch ones exactly,
and 32 greedy tokens through the cache equal the torch reference's.
"""

from __future__ import annotations

import json

import pytest
import torch

from qcompile.compiler import compile_bundle
from qcompile.errors import QcompileError
from qcompile.runtimes.ladder import verify_bundle

from conftest import (ARCHITECTURES, ORT_DEFAULT, QDQ_DEFAULT, SLIDING_WINDOW, _configs,
                      extended)

#: the architectures whose tiny configs alternate sliding-window and global layers
SLIDING = ("gemma2", "gemma3_text", "olmo3")
PROMPT = [3, 17, 42, 5, 99, 12]


def _tiny(arch: str, **overrides):
    from transformers import AutoModelForCausalLM

    config = _configs()[arch]
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _genai_and_own_tokens(bundle, prompt=PROMPT, new_tokens=12):
    """Greedy tokens of onnxruntime-genai and of qcompile's own ONNX Runtime loop; both stop
    at eos (genai's "no eos" mode suppresses the eos logit, the own loop does not)."""
    from qcompile.runtimes.genai_session import GenaiSession
    from qcompile.runtimes.generation import OrtGenerator

    genai_tokens = GenaiSession(bundle, require_tokenizer=False).generate(prompt, new_tokens)
    own = OrtGenerator(bundle, require_tokenizer=False).generate(prompt, new_tokens)
    return genai_tokens, own


@pytest.mark.parametrize("arch, target", [
    *((arch, "ort") if arch in ORT_DEFAULT else extended(arch, "ort") for arch in ARCHITECTURES),
    *((arch, "onnx-qdq") if arch in QDQ_DEFAULT else extended(arch, "onnx-qdq")
      for arch in ARCHITECTURES)])
def test_compile_and_verify(arch, target, tiny_model_dir, tmp_path):
    """...and, for the ``ort`` bundle, genai's greedy tokens equal the own loop's (no compile
    of its own: the check costs a fraction of a second)."""
    out = tmp_path / "bundle"
    recipe = "w4a16-rtn-g32" if target == "ort" else "w4a16-rtn-sym"
    report = compile_bundle(str(tiny_model_dir(arch)), recipe, target, out, accuracy_level=0)
    assert report["source"]["model_type"] == arch
    summary = verify_bundle(out)
    stages = {s["stage"]: s for s in summary["stages"]}
    assert summary["passed"], json.dumps(summary, indent=1)
    skipped = {s["stage"] for s in summary["skipped_stages"]}
    assert set(stages) | skipped == {"exported", "fake-quant", "lowered", "onnx-reference",
                                     "ort-unfused", "ort-fused"}
    assert target == "ort" or not skipped  # onnx-qdq is standard ONNX: the spec runs it
    assert summary["decode"]["tokens_equal"] and summary["decode"]["new_tokens"] == 32
    assert summary["integer_codes"]["weights_checked"] >= 2 * 4
    assert summary["integer_codes"]["mismatched"] == []
    assert json.loads((out / "report.json").read_text())["parity"]["passed"]
    if target == "ort":
        genai_tokens, own = _genai_and_own_tokens(out)
        assert genai_tokens and genai_tokens == own


# every weight format on a few architectures (the recipe changes the MatMul kind, not the
# decoder I/O, which test_compile_and_verify already runs through genai for every one)
_GENAI_CASES = [("llama", "w4a16-rtn-g32"), ("qwen2", "fp32"), extended("mistral", "w8a16-rtn"),
                ("phi3", "w4a16-rtn-g32"), ("gpt2", "w8a16-rtn"), extended("opt", "fp32")]


@pytest.mark.parametrize("arch,recipe", _GENAI_CASES)
def test_onnxruntime_genai_generates_from_the_bundle(arch, recipe, tiny_model_dir, tmp_path):
    """genai loads the bundle unchanged and its greedy tokens equal qcompile's own loop's."""
    out = tmp_path / "bundle"
    compile_bundle(str(tiny_model_dir(arch)), recipe, "ort", out, accuracy_level=0)
    genai_tokens, own = _genai_and_own_tokens(out)
    assert genai_tokens and genai_tokens == own


@pytest.mark.parametrize("arch", SLIDING)
def test_sliding_window_decoding_through_the_cache_matches_eager(arch):
    """The captured decoder keeps the whole past and transformers' masks do the windowing: its
    greedy tokens through the cache equal the eager model's without a cache, from a prompt
    shorter than the window (the window starts cutting while decoding) and from one longer
    (it cuts from the first step). verify checks ONNX against this captured graph."""
    from qcompile.capture import capture, decoder_signature, unlift
    from qcompile.runtimes.decoder_parity import torch_greedy
    from qcompile.runtimes.torch_runner import TorchRunner

    model = _tiny(arch)
    runner = TorchRunner(unlift(capture(model, decoder_signature(model))))
    for prompt in (PROMPT[: SLIDING_WINDOW // 2], PROMPT):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(3 * SLIDING_WINDOW):
                step = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
                ids = torch.cat([ids, step[:, None]], dim=1)
        cached, _ = torch_greedy(runner, prompt, 3 * SLIDING_WINDOW)
        assert cached == ids[0, len(prompt):].tolist(), prompt


def _alternating(arch: str):
    """``arch`` with 4 layers; sliding-window architectures alternate sliding and global."""
    if arch in SLIDING:
        return _tiny(arch, num_hidden_layers=4,
                     layer_types=["sliding_attention", "full_attention"] * 2)
    return _tiny(arch, **({"n_layer": 4} if arch == "gpt2" else {"num_hidden_layers": 4}))


@pytest.mark.parametrize("arch", [*SLIDING, "gpt2"])
def test_calibration_engine_gives_each_block_its_own_inputs(arch):
    """Block by block, the engine's inputs equal the model's own hidden states: each block gets
    the mask and rotary tables of its layer type (a global block run with a sliding block's
    mask, as when block 0's were reused, drifts from block 2 on), and GPT-2 its positional
    attention mask."""
    from qcompile.calibration.engine import BlockAlgorithm, run_block_calibration
    from qcompile.capture import prepare_for_capture

    class RecordInputs(BlockAlgorithm):
        def __init__(self):
            self.inputs = []

        def process(self, job):
            self.inputs.append(torch.cat(list(job.inputs)))

    model = prepare_for_capture(_alternating(arch))
    samples = torch.randint(0, 128, (4, 3 * SLIDING_WINDOW), generator=torch.Generator()
                            .manual_seed(0))
    recorded = RecordInputs()
    run_block_calibration(model, samples, recorded, batch_size=2)
    with torch.no_grad():
        hidden = model(input_ids=samples, output_hidden_states=True, use_cache=False)
    for index, inputs in enumerate(recorded.inputs):
        torch.testing.assert_close(inputs, hidden.hidden_states[index], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_awq_scales_fold_exactly(arch):
    """Every scaling group of the architecture's layout is found in every block, and folding
    random scales into all of them leaves the model's logits unchanged (Gemma's and Nemotron's
    ``1 + w`` norms included; a name in the wrong place would change them)."""
    from qcompile.algorithms.scale_folding import apply_scale, scaling_groups, scaling_layout
    from qcompile.capture import prepare_for_capture
    from qcompile.hf_adapter import decoder_layers

    model = prepare_for_capture(_tiny(arch))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    generator = torch.Generator().manual_seed(1)
    for block in decoder_layers(model)[1]:
        modules = dict(block.named_modules())
        groups = scaling_groups(block, model.config)
        assert len(groups) == len(scaling_layout(model.config))
        for group in groups:
            channels = modules[group.producer].weight.shape[0]
            scale = torch.rand(channels, generator=generator) * 4 + 0.1
            apply_scale(modules[group.producer], [modules[n] for n in group.linears], scale,
                        group)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-5)


def test_awq_refuses_a_model_type_without_a_layout():
    from types import SimpleNamespace

    from qcompile.algorithms.scale_folding import scaling_layout

    with pytest.raises(QcompileError, match="no scaling layout for model type 'exotic'"):
        scaling_layout(SimpleNamespace(model_type="exotic"))


@pytest.mark.extended
def test_gptq_gemma3_bundle_passes_verify(tiny_model_dir, tmp_path):
    """GPTQ through Gemma 3's sliding and global blocks, each with its own mask and rotary
    base. (AWQ's folding into Gemma's ``1 + w`` norms is checked above without a compile: the
    graph takes the folded weights by name whatever the architecture.)"""
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text("passes:\n  - gptq: {bits: 4, group_size: 32, calibration: "
                      "{data: random, samples: 4, seq_len: 32, batch_size: 2}}\n"
                      "  - pack_weights\n")
    out = tmp_path / "bundle"
    report = compile_bundle(str(tiny_model_dir("gemma3_text")), str(recipe), "ort", out)
    assert report["calibration"]["algorithm"] == "gptq"
    summary = verify_bundle(out)
    assert summary["passed"], json.dumps(summary, indent=1)
    assert summary["integer_codes"]["mismatched"] == []


def _config_dir(tmp_path, **config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
                                        "granitemoe", "phimoe", "deepseek_v3", "gpt_oss"])
def test_mixture_of_experts_is_refused_by_name_before_loading(model_type, tmp_path):
    from qcompile.models import load_model

    with pytest.raises(QcompileError) as info:
        load_model(_config_dir(tmp_path, model_type=model_type))  # no weights: refused first
    assert "mixture-of-experts" in info.value.problem
    assert "unsupported architecture" not in info.value.problem
    assert "gemma2" in info.value.hint


def test_experts_in_the_config_are_refused_whatever_the_model_type(tmp_path):
    from qcompile.models import load_model

    with pytest.raises(QcompileError, match=r"mixture-of-experts layers \(num_local_exp"):
        load_model(_config_dir(tmp_path, model_type="llama", num_local_experts=8))


@pytest.mark.parametrize("config,feature", [
    ({"model_type": "mamba"}, "hybrid state-space layers"),
    ({"model_type": "lfm2"}, "hybrid state-space layers"),
    ({"model_type": "qwen3_next"}, "mixture-of-experts layers (its model type) and hybrid"),
    ({"model_type": "exotic", "layer_types": ["linear_attention", "full_attention"]},
     "hybrid state-space layers (layer_types linear_attention)"),
])
def test_recurrent_layers_are_refused_by_name(config, feature, tmp_path):
    from qcompile.models import load_model

    with pytest.raises(QcompileError) as info:
        load_model(_config_dir(tmp_path, **config))
    assert feature in info.value.problem


def test_internlm2_is_refused_with_what_to_do_instead(tmp_path):
    from qcompile.models import load_model

    with pytest.raises(QcompileError) as info:
        load_model(_config_dir(tmp_path, model_type="internlm2"))
    problem, hint = info.value.problem, info.value.hint
    assert "not part of transformers" in problem and "trust_remote_code" in problem
    assert "internlm3" in hint and "supported" in hint


@pytest.mark.parametrize("arch", ["qwen2", "gemma", "olmo"])
def test_a_directory_without_tokenizer_files_has_no_tokenizer(arch, tiny_model_dir):
    """transformers 5 builds an empty tokenizer of these models' classes from nothing; the
    bundle would ship it and calibration (``+kv8-gqa`` scales) would find zero tokens."""
    from qcompile.models import load_model

    assert load_model(str(tiny_model_dir(arch))).tokenizer is None
