"""Attention captured as ``qcompile::group_query_attention`` and lowered to ORT's
``com.microsoft::GroupQueryAttention``.

The reference op is checked twice, independently: against Hugging Face's eager attention
(whole tiny Llama, each row of a padded batch against the same row run alone and unpadded),
and against ONNX Runtime's own kernel on a one-node graph. Then a tiny Llama bundle for the
``ort`` target must hold GroupQueryAttention (and no MultiHeadAttention), pass ``verify``, and
generate the same greedy tokens with onnxruntime-genai as with qcompile's own loop.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from qcompile.attention_capture import unsupported_reason
from qcompile.capture import CausalLMWithCache, prepare_for_capture
from qcompile.compiler import attention_lowering, compile_bundle
from qcompile.hf_adapter import output_cache
from qcompile.targets import get_target
from qcompile.recipes import load_recipe

from conftest import _configs

#: one worker builds this module's shared bundles (pytest-xdist would build them in each)
pytestmark = pytest.mark.xdist_group("test_gqa_lowering")

HEADS, KV_HEADS, HEAD = 4, 2, 16


@pytest.fixture(scope="module")
def tiny_llama():
    """A tiny Llama with weights large enough that tokens depend on the context."""
    from transformers import AutoModelForCausalLM

    config = _configs()["llama"]
    config.initializer_range = 0.2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return prepare_for_capture(model)


def _hf_logits_and_keys(model, ids: list[int]):
    """Eager HF, one unpadded row: logits [S, V] and layer 0's cached keys [Hkv, S, D]."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    return out.logits[0], output_cache(out).layers[0].keys[0]


def _gqa_step(model, ids, mask, past):
    logits, presents = CausalLMWithCache(model, group_query_attention=True)(
        torch.tensor(ids), torch.tensor(mask), past)
    return logits, presents


def test_first_prompt_right_padded_batch_matches_hf_rows(tiny_llama):
    rows = [[5, 9, 17, 33, 2, 80], [7, 11, 64]]
    ids = [rows[0], rows[1] + [0, 0, 0]]
    mask = [[1] * 6, [1, 1, 1, 0, 0, 0]]
    empty = [torch.zeros(2, KV_HEADS, 0, HEAD) for _ in range(4)]
    with torch.no_grad():
        logits, presents = _gqa_step(tiny_llama, ids, mask, empty)
        for b, row in enumerate(rows):
            expected, keys = _hf_logits_and_keys(tiny_llama, row)
            torch.testing.assert_close(logits[b, :len(row)], expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(presents[0][b, :, :len(row)], keys)


def test_decode_after_ragged_pasts_matches_hf_rows(tiny_llama):
    """Row 1 has 4 cached positions in a 7-position buffer (the rest garbage): its new token
    sits at position 4, is written at cache index 4 and sees only the valid positions."""
    rows, new = [[5, 9, 17, 33, 2, 80, 3], [7, 11, 64, 20]], [41, 8]
    generator = torch.Generator().manual_seed(1)
    past = [100 * torch.randn(2, KV_HEADS, 7, HEAD, generator=generator) for _ in range(4)]
    with torch.no_grad():
        for b, row in enumerate(rows):
            cache = output_cache(tiny_llama(input_ids=torch.tensor([row]), use_cache=True))
            for i, layer in enumerate(cache.layers):
                past[2 * i][b, :, :len(row)] = layer.keys[0]
                past[2 * i + 1][b, :, :len(row)] = layer.values[0]
        mask = [[1] * 8, [1] * 5 + [0] * 3]
        logits, presents = _gqa_step(tiny_llama, [[new[0]], [new[1]]], mask, past)
        for b, row in enumerate(rows):
            expected, keys = _hf_logits_and_keys(tiny_llama, row + [new[b]])
            torch.testing.assert_close(logits[b, 0], expected[-1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(presents[0][b, :, :len(row) + 1], keys)
    assert torch.all(presents[0][1, :, 5:] == 0)  # ORT zeroes a present past the valid length


def _ort_gqa_session(scale: float) -> ort.InferenceSession:
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k",
             "total_sequence_length", "cos_cache", "sin_cache"]
    types = [TensorProto.INT32 if n in ("seqlens_k", "total_sequence_length")
             else TensorProto.FLOAT for n in names]
    inputs = [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types)]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
               for n in ("output", "present_key", "present_value")]
    node = helper.make_node("GroupQueryAttention", names, [o.name for o in outputs],
                            domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS,
                            do_rotary=1, rotary_interleaved=0, scale=scale)
    model = helper.make_model(helper.make_graph([node], "gqa", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 21),
                                             helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch,seq,past,seqlens", [
    (2, 6, 0, [5, 5]),   # first prompt
    (2, 6, 0, [5, 2]),   # first prompt, row 1 right-padded
    (2, 1, 7, [7, 4]),   # decode, ragged valid lengths in one past buffer
    (1, 4, 5, [8]),      # a chunk on top of a cache (scoring through the cache)
])
def test_reference_matches_onnxruntime_kernel(batch, seq, past, seqlens):
    generator = torch.Generator().manual_seed(0)
    scale = HEAD ** -0.5
    angles = torch.arange(64.0)[:, None] * torch.rand(HEAD // 2, generator=generator)[None]
    args = [torch.randn(batch, seq, HEADS * HEAD, generator=generator),
            torch.randn(batch, seq, KV_HEADS * HEAD, generator=generator),
            torch.randn(batch, seq, KV_HEADS * HEAD, generator=generator),
            torch.randn(batch, KV_HEADS, past, HEAD, generator=generator),
            torch.randn(batch, KV_HEADS, past, HEAD, generator=generator),
            torch.tensor(seqlens, dtype=torch.int32),
            torch.tensor(past + seq, dtype=torch.int32), angles.cos(), angles.sin()]
    ours = torch.ops.qcompile.group_query_attention(*args, HEADS, KV_HEADS, scale)
    names = [i.name for i in _ort_gqa_session(scale).get_inputs()]
    theirs = _ort_gqa_session(scale).run(None, dict(zip(names, (a.numpy() for a in args))))
    for b, total in enumerate(s + 1 for s in seqlens):
        rows = total if past == 0 else seq  # a first prompt's padding rows are unspecified
        np.testing.assert_allclose(ours[0][b, :rows], theirs[0][b, :rows], atol=2e-6)
        for mine, ort_present in zip(ours[1:], theirs[1:]):
            assert ort_present.shape == tuple(mine.shape)
            np.testing.assert_allclose(mine[b, :, :total], ort_present[b, :, :total], atol=2e-6)


def test_op_opcheck():
    args = (torch.randn(1, 3, HEADS * HEAD), torch.randn(1, 3, KV_HEADS * HEAD),
            torch.randn(1, 3, KV_HEADS * HEAD), torch.randn(1, KV_HEADS, 2, HEAD),
            torch.randn(1, KV_HEADS, 2, HEAD), torch.tensor([4], dtype=torch.int32),
            torch.tensor(5, dtype=torch.int32), torch.rand(16, HEAD // 2),
            torch.rand(16, HEAD // 2), HEADS, KV_HEADS, 0.25)
    torch.library.opcheck(torch.ops.qcompile.group_query_attention.default, args)


def test_decomposed_where_the_op_does_not_apply(tiny_llama):
    ort_target, qdq = get_target("ort"), get_target("onnx-qdq")
    plain, kv8 = load_recipe("w4a16-rtn"), load_recipe("w4a16-rtn+kv8")
    assert attention_lowering(tiny_llama, plain, ort_target) == {"kind": "group_query_attention"}
    assert "standard ONNX" in attention_lowering(tiny_llama, plain, qdq)["reason"]
    assert "quantized" in attention_lowering(tiny_llama, kv8, ort_target)["reason"]
    from transformers import AutoModelForCausalLM

    for arch in ("phi3", "gpt2"):
        assert "model type" in unsupported_reason(AutoModelForCausalLM.from_config(
            _configs()[arch]))


@pytest.fixture(scope="module")
def gqa_bundle(tiny_llama, tmp_path_factory):
    source = tmp_path_factory.mktemp("tiny-llama-gqa") / "model"
    tiny_llama.save_pretrained(source)
    out = tmp_path_factory.mktemp("gqa") / "bundle"
    report = compile_bundle(str(source), "w4a16-rtn-g32", "ort", out, accuracy_level=0)
    return out, report


def test_bundle_has_group_query_attention_and_passes_verify(gqa_bundle):
    from qcompile.runtimes.ladder import verify_bundle

    out, report = gqa_bundle
    ops = report["graph"]["ops"]
    assert ops["com.microsoft::GroupQueryAttention"] == 2
    assert not any("MultiHeadAttention" in op or "Expand" == op for op in ops)
    assert report["graph"]["fusions"]["GroupQueryAttention"] == 2
    assert report["graph"]["attention"] == {"kind": "group_query_attention"}
    # per layer: q/k/v packed into one MatMulNBits feeding GQA, gate/up packed + Split, o, down
    assert ops["com.microsoft::MatMulNBits"] == 2 * 4 + 1 and ops["Split"] == 2
    assert report["graph"]["fusions"]["packed_matmul_nbits"] == 4
    node = next(n for n in onnx.load(str(out / "model.onnx")).graph.node
                if n.op_type == "GroupQueryAttention")
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attributes["do_rotary"] == 1 and attributes["kv_num_heads"] == KV_HEADS
    assert list(node.input[1:3]) == ["", ""]  # packed qkv in the query input
    norms = [n for n in onnx.load(str(out / "model.onnx")).graph.node
             if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert norms and not any(any(n.output[1:3]) for n in norms)  # no mean/inv_std
    summary = verify_bundle(out)
    assert summary["passed"], json.dumps(summary, indent=1)
    assert summary["decode"]["tokens_equal"]
    # hidden size 64: the 8-bit g64 embedding and the 8-bit per-channel lm_head are the same
    # integer weight of the tied table, stored (and checked) once, as the lm_head's
    assert report["layers"]["model.embed_tokens"]["shared_with"] == "lm_head"
    assert summary["integer_codes"] == {"weights_checked": 2 * 7 + 1, "mismatched": []}


def _matmul_nbits_pair_model() -> onnx.ModelProto:
    """``x -> MatMulNBits(Wa), MatMulNBits(Wb) -> outputs a, b`` (uint4, blocks of 16)."""
    rng = np.random.default_rng(0)
    k, rows = 32, {"a": 24, "b": 8}
    inits, nodes = [], []
    for name, n in rows.items():
        inits += [onnx.numpy_helper.from_array(rng.integers(0, 256, (n, 2, 8), dtype=np.uint8),
                                               f"{name}.qweight"),
                  onnx.numpy_helper.from_array(rng.random((n, 2), dtype=np.float32),
                                               f"{name}.scales"),
                  onnx.numpy_helper.from_array(rng.integers(0, 256, (n, 1), dtype=np.uint8),
                                               f"{name}.zero_points")]
        nodes.append(helper.make_node(
            "MatMulNBits", ["x", f"{name}.qweight", f"{name}.scales", f"{name}.zero_points"],
            [name], domain="com.microsoft", K=k, N=n, bits=4, block_size=16))
    graph = helper.make_graph(
        nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in rows], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)])


def test_packing_sibling_matmuls_keeps_outputs():
    import onnx_ir as ir

    from qcompile.lowering.pack_matmul_nbits import pack_sibling_matmuls, packed_members

    proto = _matmul_nbits_pair_model()
    packed, count = pack_sibling_matmuls(ir.from_proto(proto))
    packed_proto = ir.to_proto(packed)
    ops = [n.op_type for n in packed_proto.graph.node]
    assert count == 1 and ops == ["MatMulNBits", "Split"]
    assert packed_members(packed.metadata_props) == {"a+b.qweight": [["a", 24], ["b", 8]]}
    x = {"x": np.random.default_rng(1).random((1, 3, 32), dtype=np.float32)}
    before = ort.InferenceSession(proto.SerializeToString()).run(None, x)
    after = ort.InferenceSession(packed_proto.SerializeToString()).run(None, x)
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_genai_generates_the_own_loops_tokens(gqa_bundle):
    """genai shares one max-length buffer as past and present; the own loop feeds present
    -> past with growing shapes. The same graph serves both."""
    from qcompile.runtimes.genai_session import GenaiSession
    from qcompile.runtimes.generation import OrtGenerator

    out, _ = gqa_bundle
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True  # GQA writes in place
    prompt = [3, 17, 42, 5, 99, 12]
    own = OrtGenerator(out, require_tokenizer=False).generate(prompt, 16, stop_at_eos=False)
    genai = GenaiSession(out, require_tokenizer=False).generate(prompt, 16)
    assert len(set(own)) > 2  # the context matters: not one token repeated
    assert genai == own[:len(genai)] and len(genai) >= 8
