"""KV-cache quantization inside GroupQueryAttention (``+kv8-gqa`` / ``+kv4-gqa``).

The reference op ``qcompile::group_query_attention_quantized`` is checked against ONNX
Runtime's own kernel on a one-node graph (codes bit for bit, outputs to float rounding), for a
first prompt and for a decode step on a cache the kernel wrote. Then tiny Llama bundles must
hold int8 / packed-int4 cache inputs read by GroupQueryAttention, pass ``verify``, and
generate with onnxruntime-genai the tokens qcompile's own loop generates.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from qcompile import kv_codec
from qcompile.compiler import attention_lowering, compile_bundle, prepare_request
from qcompile.errors import QcompileError
from qcompile.targets import get_target
from qcompile.recipes import load_recipe

from conftest import _configs

#: one worker builds this module's shared bundles (pytest-xdist would build them in each)
pytestmark = pytest.mark.xdist_group("test_kv_cache_gqa")

HEADS, KV_HEADS, HEAD = 4, 2, 16
_NAMES = ["query", "key", "value", "past_key", "past_value", "seqlens_k",
          "total_sequence_length", "cos_cache", "sin_cache", "", "", "", "k_scale", "v_scale"]


def _ort_quantized_gqa(bits: int, scale: float) -> ort.InferenceSession:
    cache = TensorProto.INT8 if bits == 8 else TensorProto.UINT8
    types = {"past_key": cache, "past_value": cache, "seqlens_k": TensorProto.INT32,
             "total_sequence_length": TensorProto.INT32}
    inputs = [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None)
              for n in _NAMES if n]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)] + [
        helper.make_tensor_value_info(n, cache, None) for n in ("present_key", "present_value")]
    node = helper.make_node("GroupQueryAttention", _NAMES, [o.name for o in outputs],
                            domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS,
                            do_rotary=1, rotary_interleaved=0, scale=scale,
                            k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL",
                            kv_cache_bit_width=bits)
    model = helper.make_model(helper.make_graph([node], "gqa", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 21),
                                             helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _step_inputs(generator, seq: int, past_key, past_value, k_scale, v_scale, angles):
    past = past_key.shape[2]
    return [torch.randn(1, seq, HEADS * HEAD, generator=generator),
            torch.randn(1, seq, KV_HEADS * HEAD, generator=generator),
            torch.randn(1, seq, KV_HEADS * HEAD, generator=generator),
            past_key, past_value, torch.tensor([past + seq - 1], dtype=torch.int32),
            torch.tensor(past + seq, dtype=torch.int32), angles.cos(), angles.sin(),
            k_scale, v_scale]


@pytest.mark.parametrize("bits", [8, 4])
def test_reference_matches_onnxruntime_quantized_kernel(bits):
    """Prompt of 6, then one decode step on the kernel's own present; value scales are
    calibrated too small on purpose so that clamping is exercised."""
    generator = torch.Generator().manual_seed(0)
    scale = HEAD ** -0.5
    angles = torch.arange(64.0)[:, None] * torch.rand(HEAD // 2, generator=generator)[None]
    k_scale = kv_codec.symmetric_scale(torch.full((KV_HEADS * HEAD,), 3.0), bits)
    v_scale = kv_codec.symmetric_scale(torch.full((KV_HEADS * HEAD,), 1.2), bits)
    stored = kv_codec.packed_dim(HEAD, bits)
    dtype = torch.int8 if bits == 8 else torch.uint8
    empty = torch.zeros(1, KV_HEADS, 0, stored, dtype=dtype)
    session = _ort_quantized_gqa(bits, scale)
    feeds = [n for n in _NAMES if n]
    past = (empty, empty)
    for seq in (6, 1):
        args = _step_inputs(generator, seq, *past, k_scale, v_scale, angles)
        ours = torch.ops.qcompile.group_query_attention_quantized(
            *args, HEADS, KV_HEADS, scale, bits)
        theirs = session.run(None, dict(zip(feeds, (a.numpy() for a in args))))
        np.testing.assert_allclose(ours[0], theirs[0], atol=3e-6)
        for mine, kernel in zip(ours[1:], theirs[1:]):
            assert kernel.dtype == mine.numpy().dtype and kernel.shape == tuple(mine.shape)
            np.testing.assert_array_equal(mine.numpy(), kernel)
        clamped = kv_codec.dequantize_symmetric(ours[2], v_scale.reshape(1, KV_HEADS, 1, HEAD),
                                                bits)
        past = (torch.from_numpy(theirs[1]), torch.from_numpy(theirs[2]))
    codes = torch.round(clamped / v_scale.reshape(1, KV_HEADS, 1, HEAD))
    top = (1 << (bits - 1)) - 1  # values beyond the calibrated 1.2 clamp to the extreme codes
    assert codes.max() == top and codes.min() == -top - 1


@pytest.mark.parametrize("bits", [8, 4])
def test_symmetric_codes_round_trip_within_half_a_step(bits):
    x = torch.randn(2, KV_HEADS, 5, HEAD)
    scale = kv_codec.symmetric_scale(x.abs().amax(dim=(0, 2), keepdim=True), bits)
    back = kv_codec.dequantize_symmetric(kv_codec.quantize_symmetric(x, scale, bits), scale, bits)
    assert torch.all((back - x).abs() <= scale / 2 + 1e-6)
    assert torch.all((back - x).abs().amax(dim=(0, 2), keepdim=True) > 0)  # really quantized


def test_quantized_op_opcheck():
    args = (torch.randn(1, 3, HEADS * HEAD), torch.randn(1, 3, KV_HEADS * HEAD),
            torch.randn(1, 3, KV_HEADS * HEAD),
            torch.randint(-128, 128, (1, KV_HEADS, 2, HEAD), dtype=torch.int8),
            torch.randint(-128, 128, (1, KV_HEADS, 2, HEAD), dtype=torch.int8),
            torch.tensor([4], dtype=torch.int32), torch.tensor(5, dtype=torch.int32),
            torch.rand(16, HEAD // 2), torch.rand(16, HEAD // 2),
            torch.full((KV_HEADS * HEAD,), 0.02), torch.full((KV_HEADS * HEAD,), 0.01),
            HEADS, KV_HEADS, 0.25, 8)
    torch.library.opcheck(torch.ops.qcompile.group_query_attention_quantized.default, args)


def test_in_attention_cache_needs_group_query_attention():
    from transformers import AutoModelForCausalLM

    recipe = load_recipe("w4a16-rtn+kv8-gqa")
    with pytest.raises(QcompileError, match="cannot use: model type phi3"):
        attention_lowering(AutoModelForCausalLM.from_config(_configs()["phi3"]), recipe,
                           get_target("ort"))
    with pytest.raises(QcompileError, match="standard ONNX"):
        prepare_request("w4a16-rtn+kv8-gqa", "onnx-qdq")



@pytest.mark.parametrize("options", [{"key": "symmetric-channel"},
                                     {"key": "symmetric-channel", "value": "symmetric-channel",
                                      "group_size": 32}])
def test_in_attention_scaling_covers_keys_and_values_without_groups(options):
    from qcompile.passes.quantize_kv_cache import KVOptions

    with pytest.raises(QcompileError, match="keys and values together"):
        KVOptions(**options).validate("test")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A tiny Llama with weights large enough that tokens depend on the context."""
    from transformers import AutoModelForCausalLM

    config = _configs()["llama"]
    config.initializer_range = 0.2
    torch.manual_seed(0)
    source = tmp_path_factory.mktemp("tiny-llama-context") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    return source


@pytest.fixture(scope="module", params=["kv8-gqa", "kv4-gqa"])
def gqa_cache_bundle(request, tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "bundle"
    report = compile_bundle(str(tiny_llama_dir), f"w4a16-rtn-g32+{request.param}", "ort", out)
    return out, report, 8 if request.param == "kv8-gqa" else 4


def test_bundle_cache_is_codes_read_by_group_query_attention(gqa_cache_bundle):
    out, report, bits = gqa_cache_bundle
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    caches = {i.name: i for i in graph.input if i.name.startswith("past_key_values")}
    expected = TensorProto.INT8 if bits == 8 else TensorProto.UINT8
    assert len(caches) == 4 and {c.type.tensor_type.elem_type for c in caches.values()} == {
        expected}
    assert {c.type.tensor_type.shape.dim[3].dim_value for c in caches.values()} == {
        HEAD if bits == 8 else HEAD // 2}
    attentions = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attentions) == 2
    for node in attentions:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["kv_cache_bit_width"] == bits
        assert attributes["k_quant_type"] == attributes["v_quant_type"] == b"PER_CHANNEL"
        assert node.input[12] and node.input[13] and set(node.input[3:5]) <= set(caches)
    kv = report["layers"]["kv_cache"]
    assert kv["bytes_per_token"] * (32 // bits) == kv["float_bytes_per_token"]
    assert report["graph"]["attention"] == {"kind": "group_query_attention"}


def test_bundle_passes_verify(gqa_cache_bundle):
    from qcompile.runtimes.ladder import verify_bundle

    out, _, _ = gqa_cache_bundle
    summary = verify_bundle(out)
    assert summary["passed"], json.dumps(summary, indent=1)
    assert summary["decode"]["tokens_equal"]


def test_genai_runs_the_bundle_and_generates_the_own_loops_tokens(gqa_cache_bundle):
    from qcompile.runtimes.genai_session import GenaiSession, genai_can_run
    from qcompile.runtimes.generation import OrtGenerator

    out, _, _ = gqa_cache_bundle
    ok, reason = genai_can_run(out)
    assert ok and "inside GroupQueryAttention" in reason
    prompt = [3, 17, 42, 5, 99, 12]
    own = OrtGenerator(out, require_tokenizer=False).generate(prompt, 16, stop_at_eos=False)
    genai = GenaiSession(out, require_tokenizer=False).generate(prompt, 16)
    assert len(set(own)) > 2
    assert genai == own[:len(genai)] and len(genai) >= 8


@pytest.mark.extended
def test_explicit_quantized_cache_is_still_refused_by_genai(tiny_llama_dir, tmp_path):
    from qcompile.runtimes.genai_session import genai_can_run

    out = tmp_path / "kv8"
    compile_bundle(str(tiny_llama_dir), "w4a16-rtn-g32+kv8", "ort", out)
    ok, reason = genai_can_run(out)
    assert not ok and "outside GroupQueryAttention" in reason
