"""KV-cache quantization: the codec, the pass, and bundles whose cache really is int8 / int4."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from qcompile import kv_codec
from qcompile.formats.integer import pack_int4, unpack_int4
from qcompile.compiler import compile_bundle
from qcompile.errors import QcompileError
from qcompile.recipes import load_recipe
from qcompile.runtimes.genai_session import genai_can_run
from qcompile.runtimes.generation import OrtGenerator
from qcompile.runtimes.ladder import verify_bundle

#: one worker builds this module's shared bundles (pytest-xdist would build them in each)
pytestmark = pytest.mark.xdist_group("test_kv_cache")


def test_int4_pack_roundtrip_low_nibble_first():
    codes = torch.randint(0, 16, (2, 3, 5, 8)).float()
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, 4)
    assert int(packed[0, 0, 0, 0]) == int(codes[0, 0, 0, 0] + 16 * codes[0, 0, 0, 1])
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("bits", [8, 4])
def test_per_token_error_is_at_most_half_a_step(bits):
    x = torch.randn(1, 2, 7, 16) * torch.linspace(0.1, 5, 7)[None, None, :, None]
    stored, scale, offset = kv_codec.quantize_per_token(x, bits)
    error = (kv_codec.dequantize_per_token(stored, scale, offset, bits) - x).abs()
    assert scale.shape == (1, 2, 7, 1)
    assert torch.all(error <= scale / 2 + 1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_grouped_per_token_scales_each_run_of_head_dim(bits):
    x = torch.randn(1, 2, 5, 16)
    x[..., 8:] *= 50  # the second half of head_dim is much larger
    stored, scale, offset = kv_codec.quantize_per_token(x, bits, groups=2)
    assert scale.shape == offset.shape == (1, 2, 5, 2)
    rebuilt = kv_codec.dequantize_per_token(stored, scale, offset, bits, groups=2)
    error = (rebuilt - x).abs()
    assert torch.all(error[..., :8] <= scale[..., :1] / 2 + 1e-6)
    assert torch.all(error[..., 8:] <= scale[..., 1:] / 2 + 1e-5)
    whole = kv_codec.dequantize_per_token(*kv_codec.quantize_per_token(x, bits), bits)
    assert (rebuilt - x)[..., :8].abs().mean() < (whole - x)[..., :8].abs().mean() / 4


def test_normalized_token_keys_beat_static_channel_ranges_on_rotating_channels():
    """RoPE turns each channel pair with position, so a static per-channel range must span the
    whole circle while one token uses part of it; per-token codes over normalised channels
    follow the token (the reason +kv4 uses them for keys)."""
    gen = torch.Generator().manual_seed(0)
    positions = torch.arange(256, dtype=torch.float32)[:, None]
    angle = positions * torch.logspace(0, -3, 8)[None, :]
    radius = torch.rand(8, generator=gen) * 10 + 1
    base = torch.randn(8, generator=gen) * 3
    keys = torch.cat((radius * torch.cos(angle) + base, radius * torch.sin(angle) - base), -1)
    keys = keys + 0.1 * torch.randn(keys.shape, generator=gen)
    keys = keys[None, None]  # [1, 1, T, 16]
    low, high = keys.amin(dim=(0, 2)), keys.amax(dim=(0, 2))
    scale, offset = kv_codec.channel_range_to_scale(low, high, 4)
    static = kv_codec.dequantize_per_channel(
        kv_codec.quantize_per_channel(keys, scale, offset, 4), scale, offset, 4)
    span, start = kv_codec.channel_span(low, high)
    normed = kv_codec.normalize_channels(keys, span, start)
    rebuilt = kv_codec.denormalize_channels(
        kv_codec.dequantize_per_token(*kv_codec.quantize_per_token(normed, 4, 2), 4, 2),
        span, start)
    static_error = (static - keys).square().mean()
    normalized_error = (rebuilt - keys).square().mean()
    assert normalized_error < 0.7 * static_error, (normalized_error, static_error)


def test_per_channel_static_scales_clamp_out_of_range_values():
    low, high = -torch.ones(2, 4), torch.ones(2, 4)
    scale, offset = kv_codec.channel_range_to_scale(low, high, 8)
    x = torch.tensor([-3.0, -1.0, 0.5, 1.0]).expand(1, 2, 1, 4)
    stored = kv_codec.quantize_per_channel(x, scale, offset, 8)
    assert stored.flatten()[:4].tolist() == [0, 0, 191, 255]  # -3 clamps to the calibrated min


@pytest.mark.parametrize("options, message", [
    ({"bits": 4, "group_size": 3}, "group_size must be 0 or a positive even number"),
    ({"bits": 4, "key": "per-head"}, "key must be one of per-channel, per-token"),
])
def test_kv_options_reject_bad_values(options, message):
    from qcompile.passes.quantize_kv_cache import KVOptions

    with pytest.raises(QcompileError, match=message):
        KVOptions(**options).validate("quantize_kv_cache")


def test_recipe_modifiers():
    recipe = load_recipe("w4a16-rtn+kv4")
    assert [s.name for s in recipe.steps][-1] == "quantize_kv_cache"
    assert recipe.steps[-1].options.bits == 4
    with pytest.raises(QcompileError, match=r"unknown recipe modifier \+kv3"):
        load_recipe("w4a16-rtn+kv3")
    with pytest.raises(QcompileError, match="already quantizes the KV cache"):
        load_recipe("w4a16-rtn+kv8+kv4")


@pytest.fixture(scope="module")
def bundles(tiny_model_dir, tmp_path_factory):
    """The tiny Llama (2 layers, 2 kv heads, head_dim 16) with fp32, int8 and int4 caches."""
    made = {}
    for name, recipe in (("fp32", "w4a16-rtn-g32"), ("kv8", "w4a16-rtn-g32+kv8"),
                         ("kv4", "w4a16-rtn-g32+kv4")):
        out = tmp_path_factory.mktemp(name) / "bundle"
        report = compile_bundle(str(tiny_model_dir("llama")), recipe, "ort", out)
        made[name] = (out, report)
    return made


def test_cache_inputs_are_codes_and_bytes_per_token_shrink(bundles):
    # per layer and position: 2 heads x 16 dims; fp32 keys+values 2*32*4 = 256 bytes;
    # int8: 32 + 32 + value scale and offset 2*2*4 = 80; int4: 16 + 16 + scale and offset
    # of keys and values (group 32 >= head_dim: one per head) 2*16 = 64
    expected = {"fp32": 2 * 256, "kv8": 2 * 80, "kv4": 2 * 64}
    for name, (out, report) in bundles.items():
        assert report["signature"]["cache"]["bytes_per_token"] == expected[name]
        assert OrtGenerator(out, require_tokenizer=False).cache_bytes_per_token() == \
            expected[name]
    session = ort.InferenceSession(str(bundles["kv4"][0] / "model.onnx"))
    inputs = {i.name: i for i in session.get_inputs()}
    assert inputs["past_key_values.0.key"].type == "tensor(uint8)"
    assert inputs["past_key_values.0.key"].shape[3] == 8  # two int4 codes per byte
    assert inputs["past_key_values.1.value_scale"].type == "tensor(float)"
    assert inputs["past_key_values.1.key_scale"].shape[3] == 1  # per token over normed channels
    kv8_inputs = {i.name for i in ort.InferenceSession(
        str(bundles["kv8"][0] / "model.onnx")).get_inputs()}
    assert "past_key_values.0.key_scale" not in kv8_inputs  # int8 keys: static per channel
    ok, reason = genai_can_run(bundles["kv4"][0])
    assert not ok and "uint8" in reason


@pytest.mark.parametrize("name", ["kv8", "kv4"])
def test_quantized_cache_bundles_pass_verify_with_decoder_parity(bundles, name):
    summary = verify_bundle(bundles[name][0])
    assert summary["passed"], summary
    assert "kv-quant" in {s["stage"] for s in summary["stages"]}
    assert summary["decode"]["tokens_equal"]
    # rounding inside the graph: outputs compared closely, decode teacher-forced
    fused = next(s for s in summary["stages"] if s["stage"] == "ort-fused")
    assert fused["tolerance"] == "rel_l2 <= 0.05, top1 >= 0.9"
    assert "teacher-forced" in summary["decode"]["compared_with"]


def test_teacher_forced_logits_are_the_free_running_ones_on_the_same_tokens(bundles):
    from qcompile.runtimes.decoder_parity import forced_logits

    generator = OrtGenerator(bundles["kv4"][0], require_tokenizer=False)
    prompt = np.array([5, 9, 33, 2, 71])
    tokens, logits = generator.generate(list(prompt), 6, stop_at_eos=False, return_logits=True)
    np.testing.assert_allclose(forced_logits(generator, prompt, tokens), logits, atol=1e-5)
    wrong = forced_logits(generator, prompt, [(t + 1) % 64 for t in tokens])
    assert not np.allclose(wrong[1:], logits[1:], atol=1e-3)  # other tokens, other logits


def test_chunked_scoring_equals_token_by_token_decoding(bundles):
    """Every position is quantized when written and read back dequantized, so scoring a
    continuation in one chunk computes what decoding it token by token computes."""
    generator = OrtGenerator(bundles["kv4"][0], require_tokenizer=False)
    context, continuation = [5, 9, 33, 2, 71, 18, 40], [12, 90, 3, 64]
    chunked = generator.score_continuation(context, continuation)
    logits, cache = generator.forward(np.array([context]), generator.empty_cache(), 0)
    stepwise = []
    for i, token in enumerate(continuation):
        row = logits[0, -1].astype(np.float64)
        stepwise.append(row[token] - np.log(np.exp(row - row.max()).sum()) - row.max())
        logits, cache = generator.forward(np.array([[token]]), cache, len(context) + i)
    np.testing.assert_allclose(chunked, stepwise, atol=1e-4)


def test_int8_cache_is_closer_to_float_than_int4(bundles):
    context, continuation = list(range(3, 40)), list(range(40, 70))
    scores = {name: OrtGenerator(out, require_tokenizer=False).score_continuation(
        context, continuation) for name, (out, _) in bundles.items()}
    error8 = np.abs(scores["kv8"] - scores["fp32"]).mean()
    error4 = np.abs(scores["kv4"] - scores["fp32"]).mean()
    assert 0 < error8 < error4
