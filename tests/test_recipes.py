"""Recipes: built-ins load, user files validate with messages that name the problem."""

from __future__ import annotations

import json

import pytest

from qcompile.errors import QcompileError
from qcompile.targets import get_target
from qcompile.recipes import BUILTIN_RECIPES, load_recipe


@pytest.mark.parametrize("name", list(BUILTIN_RECIPES))
def test_builtin_recipes_load(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    names = [s.name for s in recipe.steps]
    if "a8" in name:  # [a float-only stage,] the weight step, [activations,] packing
        weights = "gptq" if "gptq" in name else "quantize_weights_rtn"
        smoothing = [p for p in ("smoothquant", "outliertune") if p in name]
        activations = ["quantize_activations"] if name.startswith("w8a8") else []
        assert names == [*smoothing, weights, *activations, "pack_weights"], names
        assert recipe.weight_options().bits == int(name[1])
        if name.startswith("w4a8"):  # int8 activations inside MatMulNBits
            assert recipe.accuracy_level == 4
        return
    assert names == [] or names[1:2] == ["pack_weights"]
    assert names[2:] in ([], ["quantize_kv_cache"])
    assert names[:1] in ([], ["quantize_weights_rtn"]) or names[0] in name.replace("-", "_")
    if names:  # every weight step has the RTN options the targets check
        assert recipe.weight_options().bits == int(name[1])


def test_user_yaml_recipe(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\npasses:\n  - quantize_weights_rtn: {bits: 3, group_size: 64,"
                    " lm_head: null, embedding: {bits: 4, group_size: 32}}\n  - pack_weights\n")
    options = load_recipe(str(path)).weight_options()
    assert (options.bits, options.group_size, options.lm_head) == (3, 64, None)
    assert options.embedding.bits == 4


def test_user_json_recipe(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"passes": [{"quantize_weights_rtn": {"symmetric": True}},
                                           "pack_weights"]}))
    assert load_recipe(str(path)).weight_options().symmetric is True


@pytest.mark.parametrize("text,message", [
    ("passes: [{quantize_weights_rtn: {bitz: 4}}]", "unknown option(s) bitz"),
    ("passes: [{quantize_weights_rtn: {bits: 5}}]", "bits = 5 is not supported"),
    ("passes: [{quantize_weights_rtn: {group_size: 100}}]", "group_size = 100"),
    ("passes: [{quantize_weights_rtn: {bits: four}}]", "must be int"),
    ("passes: [{quantize_weights_rtn: {lm_head: {bits: 1}}}]", "lm_head.bits = 1"),
    ("passes: [no_such_pass]", "unknown pass 'no_such_pass'"),
    ("passes: {a: 1}", "needs a 'passes' list"),
    ("pases: []", "unknown recipe field(s) pases"),
    ("passes: [: bad", "cannot parse recipe file"),
])
def test_invalid_recipe_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(QcompileError) as info:
        load_recipe(str(path))
    assert message in str(info.value)


def test_unknown_recipe_lists_builtins():
    with pytest.raises(QcompileError, match="unknown recipe 'w5'") as info:
        load_recipe("w5")
    assert "w4a16-rtn" in info.value.hint


def test_missing_recipe_file():
    with pytest.raises(QcompileError, match="does not exist"):
        load_recipe("/nonexistent/recipe.yaml")


def test_target_refuses_bits_it_cannot_express():
    with pytest.raises(QcompileError, match="cannot export 2-bit linear weights"):
        get_target("onnx-qdq").check(load_recipe("w2a16-rtn"))
    get_target("ort").check(load_recipe("w2a16-rtn"))


def test_target_refuses_4bit_embedding_for_qdq(tmp_path):
    path = tmp_path / "e4.yaml"
    path.write_text("passes: [{quantize_weights_rtn: {embedding: {bits: 4}}}, pack_weights]")
    with pytest.raises(QcompileError, match="4-bit embedding"):
        get_target("onnx-qdq").check(load_recipe(str(path)))


def test_default_recipe_is_the_builder_format_gptq_with_an_int8_gqa_cache():
    from qcompile.recipes import DEFAULT_RECIPE

    recipe = load_recipe(DEFAULT_RECIPE)
    weights, kv = recipe.weight_options(), recipe.kv_cache_options()
    assert recipe.steps[0].name == "gptq" and recipe.accuracy_level == 4
    assert (weights.bits, weights.group_size, weights.symmetric) == (4, 32, True)
    assert weights.lm_head == weights.embedding  # stored once, as the builder does
    assert (kv.bits, kv.in_attention, kv.fallback) == (8, True, "float")
    assert "kv_cache" not in [s.name for s in recipe.without_kv_cache().steps]
    assert load_recipe(f"{DEFAULT_RECIPE.removesuffix('-kv8')}+kv8-gqa").accuracy_level == 4


@pytest.mark.parametrize("level,message", [(5, "integer 0-4"), ("4", "integer 0-4"),
                                           (True, "integer 0-4")])
def test_recipe_accuracy_level_is_validated(tmp_path, level, message):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"accuracy_level": level, "passes": ["pack_weights"]}))
    with pytest.raises(QcompileError, match=message):
        load_recipe(str(path))


def test_recipe_accuracy_level_round_trips_through_the_report(tmp_path):
    from qcompile.recipes import recipe_of_report

    path = tmp_path / "mine.yaml"
    path.write_text("accuracy_level: 4\npasses:\n  - quantize_weights_rtn: {bits: 4}\n"
                    "  - pack_weights\n")
    recipe = load_recipe(str(path))
    assert recipe_of_report({"recipe": recipe.to_dict()}).accuracy_level == 4


@pytest.mark.parametrize("kv,message", [
    ({"key": "symmetric-channel", "value": "symmetric-channel", "fallback": "skip"},
     "fallback must be one of"),
    ({"fallback": "float"}, "applies to the symmetric-channel cache only"),
])
def test_kv_fallback_is_validated(tmp_path, kv, message):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"passes": [{"quantize_kv_cache": kv}]}))
    with pytest.raises(QcompileError, match=message):
        load_recipe(str(path))
