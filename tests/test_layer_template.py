"""The streamed compile's layer template (qcompile.layer_template): a decoder of alike layers
is captured, lowered and fused as three and grown to its depth in ONNX. The bundle must compute what the whole
capture's computes (same weights file byte for byte, same ops, same outputs), and any decoder
whose layers differ must keep the whole capture, with the reason in report.json."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnxruntime as ort
import pytest

from qcompile.compiler import compile_bundle
from qcompile import compiler, layer_template

from conftest import _configs, extended
from test_streaming import _checkpoint

LAYERS = 6


#: every matrix's K a multiple of w4a16-rtn's group of 128, so each linear is a MatMulNBits
#: (narrower ones are padded per-channel DequantizeLinear, which keeps the whole capture)
_WIDE = {"gpt2": {"n_embd": 128}}


def _deep(arch: str, layers: int = LAYERS, **changes):
    config = _configs()[arch]
    values = {k: v for k, v in config.to_dict().items() if k != "layer_types"}
    values["n_layer" if arch == "gpt2" else "num_hidden_layers"] = layers
    values.update(_WIDE.get(arch, {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}))
    return type(config)(**{**values, **changes})


def _outputs(bundle: pathlib.Path) -> list[np.ndarray]:
    """A 6-token prompt then one cached step, every output of both."""
    session = ort.InferenceSession(str(bundle / "model.onnx"))
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 128, (2, 6)).astype(np.int64),
             "attention_mask": np.ones((2, 6), np.int64)}
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    for past in pasts:
        shape = [2 if d == "batch_size" else 0 if isinstance(d, str) else d for d in past.shape]
        feeds[past.name] = np.zeros(shape, np.float32)
    first = session.run(None, feeds)
    names = [o.name for o in session.get_outputs()]
    step = {"input_ids": np.array([[3], [5]], np.int64), "attention_mask": np.ones((2, 7), np.int64)}
    step.update({p.name: first[names.index(p.name.replace("past_key_values", "present"))]
                 for p in pasts})
    return first + session.run(None, step)


def _streamed(tmp_path, config, recipe="w4a16-rtn") -> tuple[dict, pathlib.Path]:
    source = _checkpoint(tmp_path / "model", config, shard_bytes=60_000)
    return compile_bundle(str(source), recipe, "ort", tmp_path / "streamed",
                          stream="always"), source


def _compile_both(tmp_path, config, recipe="w4a16-rtn"):
    streamed, source = _streamed(tmp_path, config, recipe)
    whole = compile_bundle(str(source), recipe, "ort", tmp_path / "whole", stream="never")
    return streamed, whole


@pytest.mark.parametrize("arch", ["llama", extended("qwen2"), extended("gpt2")])  # tied,
# untied + biases, Conv1D
def test_instantiated_layers_compute_what_the_whole_capture_computes(arch, tmp_path,
                                                                     monkeypatch):
    from qcompile.passes import quantize_weights_rtn

    calls = {"n": 0}
    quantize = quantize_weights_rtn.quantize_weight

    def counted(*args, **kwargs):
        calls["n"] += 1
        return quantize(*args, **kwargs)

    monkeypatch.setattr(quantize_weights_rtn, "quantize_weight", counted)
    streamed, source = _streamed(tmp_path, _deep(arch))
    streamed_calls, calls["n"] = calls["n"], 0
    with monkeypatch.context() as patch:  # the same streamed compile, capturing every layer
        patch.setattr(compiler, "plan_template",
                      lambda *args: layer_template.LayerTemplate("off for the test"))
        compile_bundle(str(source), "w4a16-rtn", "ort", tmp_path / "all", stream="always")
    # an instantiated linear is quantized once, not once per packed tensor it writes
    assert streamed_calls <= calls["n"], (streamed_calls, calls["n"])
    whole = compile_bundle(str(source), "w4a16-rtn", "ort", tmp_path / "whole", stream="never")
    assert streamed["graph"]["capture"] == {"kind": "template", "layers_captured": 3,
                                            "layers": LAYERS}
    assert whole["graph"]["capture"]["kind"] == "whole"
    data = "model.onnx.data"
    assert (tmp_path / "streamed" / data).read_bytes() == (tmp_path / "whole" / data).read_bytes()
    for key in ("layers", "signature"):
        assert streamed[key] == whole[key]
    assert streamed["graph"]["ops"] == whole["graph"]["ops"]
    # onnxscript's fusions ran on the three captured layers; what is counted on the written
    # graph is the whole capture's
    assert streamed["graph"]["fusions_counted_on_layers"] == 3
    ours, theirs = streamed["graph"]["fusions"], whole["graph"]["fusions"]
    assert set(ours) == set(theirs)
    for key in {"GroupQueryAttention", "packed_matmul_nbits"} & set(theirs):
        assert ours[key] == theirs[key]
    # every layer's output is tapped where the whole capture's is (block-wise verify)
    assert len(streamed["graph"]["layer_outputs"]) == LAYERS
    assert [n is None for n in streamed["graph"]["layer_outputs"]] == \
        [n is None for n in whole["graph"]["layer_outputs"]]
    assert json.loads((tmp_path / "streamed" / "genai_config.json").read_text()) == \
        json.loads((tmp_path / "whole" / "genai_config.json").read_text())
    ours, theirs = _outputs(tmp_path / "streamed"), _outputs(tmp_path / "whole")
    assert len(ours) == len(theirs) == 2 * (1 + 2 * LAYERS)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.extended
def test_a_recipe_that_names_one_layer_keeps_the_whole_capture(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("passes:\n  - quantize_weights_rtn: {bits: 4, group_size: 32, "
                      "keep_float: ['model.layers.2.*']}\n  - pack_weights\n")
    streamed, _ = _streamed(tmp_path, _deep("llama"), str(recipe))
    reason = streamed["graph"]["capture"]["reason"]
    assert "quantize_weights_rtn" in reason and "model.layers.2" in reason
    assert streamed["layers"]["model.layers.2.mlp.up_proj"]["format"] == "float32"
    assert streamed["layers"]["model.layers.3.mlp.up_proj"]["format"] != "float32"


@pytest.mark.extended
def test_layers_of_two_kinds_keep_the_whole_capture(tmp_path):
    kinds = ["sliding_attention", "full_attention"] * (LAYERS // 2)
    streamed, _ = _streamed(tmp_path, _deep("qwen2", layer_types=kinds, sliding_window=4,
                                            use_sliding_window=True))
    assert "2 kinds" in streamed["graph"]["capture"]["reason"]


@pytest.mark.extended
def test_layers_the_modules_call_alike_but_export_differently_are_caught(tmp_path, monkeypatch):
    """Hide the sliding / global difference from the module checks: the ONNX comparison of
    layer 1 with layer 2 still finds it, and the compile falls back to the whole capture."""
    monkeypatch.setattr(layer_template, "_config_reason", lambda model: None)
    monkeypatch.setattr(layer_template, "_layers_reason", lambda layers: None)
    kinds = ["sliding_attention", "full_attention"] * (LAYERS // 2)
    streamed, whole = _compile_both(tmp_path, _deep("qwen2", layer_types=kinds, sliding_window=4,
                                                    use_sliding_window=True))
    assert streamed["graph"]["capture"]["reason"].startswith("the captured layers differ")
    for a, b in zip(_outputs(tmp_path / "streamed"), _outputs(tmp_path / "whole")):
        np.testing.assert_array_equal(a, b)


def test_two_layer_decoders_are_captured_whole(tiny_model_dir, tmp_path):
    report = compile_bundle(str(tiny_model_dir()), "w4a16-rtn", "ort", tmp_path / "b",
                            stream="always")
    assert report["graph"]["capture"] == {"kind": "whole", "reason": "the decoder has 2 layers"}


@pytest.mark.extended
def test_a_lowered_node_that_belongs_to_no_layer_keeps_the_whole_capture(tmp_path, monkeypatch):
    """A rewrite that made a layer's nodes without module scopes (here: the SiLU's Sigmoid and
    Mul stripped after packing): the copies could not include them, so the compile falls back
    to the whole capture, which computes the same outputs."""
    from qcompile.lowering import export_onnx

    pack = export_onnx.pack_sibling_matmuls

    def pack_and_strip(model):
        model, packs = pack(model)
        for node in model.graph:
            if node.op_type in ("Sigmoid", "Mul"):
                node.metadata_props.pop("pkg.torch.onnx.name_scopes", None)
        return model, packs

    monkeypatch.setattr(export_onnx, "pack_sibling_matmuls", pack_and_strip)
    streamed, whole = _compile_both(tmp_path, _deep("llama"))
    assert "belongs to none" in streamed["graph"]["capture"]["reason"], streamed["graph"]
    for a, b in zip(_outputs(tmp_path / "streamed"), _outputs(tmp_path / "whole")):
        np.testing.assert_array_equal(a, b)


def test_grown_layer_outputs_follow_the_value_the_fusions_moved():
    from qcompile.lowering.layer_outputs import grown_layer_outputs

    # fused: layer 1's output is computed by the template's first node, so copy i computes
    # layer i - 1's and the last layer's stays the final norm's
    assert grown_layer_outputs(["a", "b", "c"], {"b": ["b3", "b4"]}, 5) == \
        ["a", "b", "b3", "b4", "c"]
    # unfused: copy i computes layer i's
    assert grown_layer_outputs(["a", "b", "c"], {"c": ["c3", "c4"]}, 5) == \
        ["a", "b", "c", "c3", "c4"]
    assert grown_layer_outputs([], {}, 5) == []
