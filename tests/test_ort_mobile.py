"""The ``ort-mobile`` target: an ORT-format bundle that computes what the ``ort`` bundle does.

Checked on a tiny random Llama: the bundle ships ``model.ort`` and ``required_operators.config``
and no ONNX files; its logits and greedy tokens equal the ``ort`` bundle's (same recipe, same
seed); ``verify`` reads the shipped codes back out of the flatbuffer and catches a flipped
byte; onnxruntime-genai and ``bench`` run it; an op without a CPU kernel is refused.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from test_generation import save_tiny_tokenizer

from qcompile.bundle import read_report
from qcompile.compiler import compile_bundle
from qcompile.errors import QcompileError
from qcompile.runtimes.generation import OrtGenerator
from qcompile.runtimes.ladder import verify_bundle
from qcompile.runtimes.ort_runner import OrtRunner
from qcompile.targets.ort_mobile.ort_file import read_tensors
from qcompile.targets.ort_mobile.package import OPERATORS_CONFIG, write_ort_format

#: one worker builds this module's shared bundles (pytest-xdist would build them in each)
pytestmark = pytest.mark.xdist_group("test_ort_mobile")

RECIPE = "w4a16-rtn+kv8-gqa"
PROMPT = np.array([[1, 40, 71, 78, 78, 81, 12, 89]], dtype=np.int64)


@pytest.fixture(scope="module")
def bundles(tiny_model_dir, tmp_path_factory):
    """``(ort bundle, ort-mobile bundle)`` of the same tiny model and recipe."""
    root = tmp_path_factory.mktemp("ort-mobile")
    source = shutil.copytree(tiny_model_dir("llama"), root / "source")
    save_tiny_tokenizer(source)  # bench and genai read prompts through it
    compile_bundle(str(source), RECIPE, "ort", root / "ort")
    compile_bundle(str(source), RECIPE, "ort-mobile", root / "mobile")
    return root / "ort", root / "mobile"


def test_bundle_ships_the_ort_format_model_and_its_operator_list(bundles):
    _, mobile = bundles
    names = {p.name for p in mobile.iterdir()}
    assert {"model.ort", OPERATORS_CONFIG, "genai_config.json", "report.json"} <= names
    assert not {"model.onnx", "model.onnx.data"} & names
    config = (mobile / OPERATORS_CONFIG).read_text()
    assert "com.microsoft;1;" in config and "MatMulNBits" in config
    assert "GroupQueryAttention" in config and str(mobile) not in config  # no build paths
    genai = json.loads((mobile / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["filename"] == "model.ort"
    report = read_report(mobile)
    assert report["target"]["name"] == "ort-mobile"
    assert report["package"]["model_file"] == "model.ort"
    assert report["sizes"]["model_bytes"] == (mobile / "model.ort").stat().st_size


def test_logits_and_tokens_equal_the_ort_bundle(bundles):
    ort_bundle, mobile = bundles
    mask = np.ones_like(PROMPT)
    ours = OrtRunner(mobile / "model.ort").run(PROMPT, mask)
    theirs = OrtRunner(ort_bundle / "model.onnx").run(PROMPT, mask)
    assert len(ours) == len(theirs) > 1  # logits and every present key / value
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    tokens = [OrtGenerator(b, require_tokenizer=False).generate(PROMPT[0].tolist(), 12,
                                                                     stop_at_eos=False)
              for b in (mobile, ort_bundle)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 12


def test_verify_reads_the_codes_from_the_flatbuffer(bundles, tmp_path):
    _, mobile = bundles
    summary = verify_bundle(mobile)
    assert summary["passed"], summary
    assert summary["integer_codes"]["weights_checked"] >= 14
    assert not summary["integer_codes"]["mismatched"]
    assert any(s["stage"] == "onnx-reference" for s in summary["skipped_stages"])
    broken = shutil.copytree(mobile, tmp_path / "broken")
    _flip_a_code(broken / "model.ort", "model.layers.1.mlp.gate_proj")
    codes = verify_bundle(broken)["integer_codes"]
    assert codes["mismatched"] == ["model.layers.1.mlp.gate_proj"]


def _flip_a_code(path, layer: str) -> None:
    """Flip the low bit of one byte of ``layer``'s codes inside the flatbuffer."""
    tensors, _ = read_tensors(path)
    name = next(n for n in tensors if n.startswith(layer) and tensors[n].dtype == np.uint8
                and tensors[n].ndim == 3)
    data = bytearray(path.read_bytes())
    raw = tensors[name].tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0
    data[at] ^= 1
    path.write_bytes(bytes(data))


def test_genai_and_bench_run_it(bundles):
    og = pytest.importorskip("onnxruntime_genai")
    from qcompile.runtimes.bench import bench

    ort_bundle, mobile = bundles
    sequences = []
    for bundle in (mobile, ort_bundle):
        model = og.Model(str(bundle))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=PROMPT.shape[1] + 8, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(PROMPT.astype(np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        sequences.append(list(generator.get_sequence(0)))
    assert sequences[0] == sequences[1]
    result = bench(mobile, ort_bundle, runs=1, prompt_tokens=8, new_tokens=4)
    assert result["engine"] == "genai"
    assert result["ratios"]["cache_bytes_per_token_ours_over_theirs"] == 1.0
    assert result["bundles"]["ours"]["decode_tok_s"] > 0


def test_an_op_without_a_cpu_kernel_is_refused(tmp_path):
    """An FP8 GEMM (CUDA-only in ONNX Runtime) cannot go to a phone."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    node = helper.make_node("GemmFloat8", ["a", "a"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [a], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, tmp_path / "model.onnx")
    with pytest.raises(QcompileError) as error:
        write_ort_format(tmp_path, 0)
    assert "com.microsoft::GemmFloat8" in str(error.value) and "--target ort" in error.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
