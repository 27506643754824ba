"""Recipes: named, declarative pipelines of passes with options.

A recipe is plain data, the same for built-ins and for users' YAML/JSON files::

    name: my-w4
    description: int4 g128 asymmetric, MSE clipping, lm_head kept at 8 bits
    passes:
      - quantize_weights_rtn: {bits: 4, group_size: 128, mse_clip: true}
      - pack_weights

Each pass entry is a pass name or a one-key mapping ``{name: options}``. An optional
``accuracy_level`` (0-4) is the ORT ``MatMulNBits`` compute type the recipe was tuned for
(the ``--accuracy-level`` option overrides it; 0 when neither says). Loading validates
everything up front (unknown passes, unknown or mistyped options, unsupported values) so that
a bad recipe fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import yaml

from qcompile.errors import QcompileError
from qcompile.pass_infra import PassContext, QPass, build_options
from qcompile.passes import get_pass
from qcompile.passes.weight_steps import role_specs
from qcompile.targets import TARGETS

__all__ = [
    "Recipe",
    "PassStep",
    "BUILTIN_RECIPES",
    "DEFAULT_RECIPE",
    "DEFAULT_RECIPES",
    "load_recipe",
    "recipe_from_dict",
    "recipe_of_report",
]


@dataclasses.dataclass(frozen=True)
class PassStep:
    name: str
    options: object


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    steps: tuple[PassStep, ...]
    source: str = "built-in"
    #: ORT MatMulNBits compute type the recipe is meant for (None: the target's default, 0)
    accuracy_level: int | None = None

    def instantiate(self, context: PassContext) -> list[QPass]:
        return [get_pass(step.name)(step.options, context) for step in self.steps]

    def weight_options(self):
        """Options of the weight-quantization step, if any (for capability checks)."""
        for step in self.steps:
            if get_pass(step.name).quantizes == "weights":
                return step.options
        return None

    def weight_formats(self) -> dict:
        """``{role: WeightQuantSpec or None}`` of the weight step ("linear", "embedding",
        "lm_head"); empty without weight quantization."""
        options = self.weight_options()
        return {} if options is None else role_specs(options)

    def kv_cache_options(self):
        """Options of the KV-cache quantization step, if any (for capability checks)."""
        for step in self.steps:
            if step.name == KV_CACHE_PASS:
                return step.options
        return None

    def without_kv_cache(self) -> "Recipe":
        """The same recipe with its KV-cache step dropped (a float cache)."""
        steps = tuple(s for s in self.steps if s.name != KV_CACHE_PASS)
        return dataclasses.replace(self, steps=steps)

    def to_dict(self) -> dict:
        data = {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "passes": [{s.name: dataclasses.asdict(s.options)} for s in self.steps],
        }
        if self.accuracy_level is not None:
            data["accuracy_level"] = self.accuracy_level
        return data


def _rtn(description: str, **options) -> dict:
    return {
        "description": description,
        "passes": [{"quantize_weights_rtn": options}, "pack_weights"],
    }


BUILTIN_RECIPES: dict[str, dict] = {
    "fp32": {"description": "no quantization: the float32 export, the baseline", "passes": []},
    "w8a16-rtn": _rtn("int8 weights per output channel, asymmetric, RTN", bits=8, group_size=0),
    "w4a16-rtn": _rtn("int4 weights, groups of 128 along K, asymmetric, RTN", bits=4),
    "w4a16-rtn-sym": _rtn(
        "int4 weights, groups of 128, symmetric (no zero points), RTN", bits=4, symmetric=True
    ),
    "w4a16-rtn-mse": _rtn(
        "int4 weights, groups of 128, asymmetric, RTN with MSE-optimal clipping",
        bits=4,
        mse_clip=True,
    ),
    "w4a16-rtn-g32": _rtn("int4 weights, groups of 32, asymmetric, RTN", bits=4, group_size=32),
    "w3a16-rtn": _rtn("int3 codes (stored in 4 bits), groups of 128, asymmetric, RTN", bits=3),
    "w2a16-rtn": _rtn(
        "int2 weights, groups of 64, asymmetric, RTN with MSE clipping (ort target only)",
        bits=2,
        group_size=64,
        mse_clip=True,
    ),
}


#: the calibrated methods' built-in recipes: ``w{4,3,2}a16-<method>`` at the settings of the
#: quality table (w4/w3 groups of 128, w2 groups of 64; asymmetric)
CALIBRATED_METHODS: dict[str, tuple[str, str]] = {
    "gptq": ("gptq", "GPTQ (act-order, static groups, true-sequential)"),
    "awq": ("awq", "AWQ (activation-aware scales folded into norms, clipping search)"),
    "flexround": ("flexround", "FlexRound (learned element-wise rounding, block reconstruction)"),
    "lrq": ("lrq", "LRQ (low-rank learned rounding scales, block reconstruction)"),
    "adadim-rtn": ("adadim_rtn", "AdaDim: per-layer choice of per-IC or per-OC groups, RTN"),
    "adadim-gptq": ("adadim_gptq", "AdaDim: per-layer choice of per-IC or per-OC groups, GPTQ"),
}
_CALIBRATED_SETTINGS = {"w4a16": (4, 128), "w3a16": (3, 128), "w2a16": (2, 64)}


def _calibrated(prefix: str, method: str) -> dict:
    pass_name, description = CALIBRATED_METHODS[method]
    bits, group = _CALIBRATED_SETTINGS[prefix]
    return {
        "description": f"int{bits} weights, groups of {group}, asymmetric, {description}",
        "passes": [{pass_name: {"bits": bits, "group_size": group}}, "pack_weights"],
    }


BUILTIN_RECIPES.update({
    f"{prefix}-{method}": _calibrated(prefix, method)
    for method in CALIBRATED_METHODS for prefix in _CALIBRATED_SETTINGS
})

#: onnxruntime-genai's int4 format (symmetric groups of 32, MatMulNBits at accuracy level 4,
#: the tied embedding stored once as the int4 lm_head) with GPTQ instead of round-to-nearest
_BUILDER_FORMAT_INT4 = {"bits": 4, "group_size": 32, "symmetric": True}
BUILTIN_RECIPES["w4a16-gptq-g32"] = {
    "description": "int4 GPTQ, symmetric groups of 32, int4 lm_head and embedding stored "
                   "once (onnxruntime-genai's int4 layout), 32 x 512 calibration tokens",
    "accuracy_level": 4,
    "passes": [{"gptq": {**_BUILDER_FORMAT_INT4, "lm_head": _BUILDER_FORMAT_INT4,
                         "embedding": _BUILDER_FORMAT_INT4,
                         "calibration": {"samples": 32, "seq_len": 512}}},
               "pack_weights"],
}
#: what `qcompile compile` builds with no options: the best CPU bundle that compiles within
#: 10 minutes on two cores (README, "The default"); the int8 cache lives inside ORT's
#: GroupQueryAttention where the decoder has it, and is a float cache where it has not
BUILTIN_RECIPES["w4a16-gptq-g32-kv8"] = {
    **BUILTIN_RECIPES["w4a16-gptq-g32"],
    "description": BUILTIN_RECIPES["w4a16-gptq-g32"]["description"] + "; int8 KV cache "
                   "inside GroupQueryAttention (a float cache where the decoder has none)",
    "passes": [*BUILTIN_RECIPES["w4a16-gptq-g32"]["passes"],
               {"quantize_kv_cache": {"bits": 8, "key": "symmetric-channel",
                                      "value": "symmetric-channel", "fallback": "float"}}],
}
#: standard ONNX has no GroupQueryAttention and onnx-qdq no int4 Gather: the same GPTQ body
#: and lm_head with the default 8-bit embedding and a float cache
BUILTIN_RECIPES["w4a16-gptq-g32-qdq"] = {
    "description": "int4 GPTQ, symmetric groups of 32, int4 lm_head, 8-bit embedding, 32 x 512 "
                   "calibration tokens (the onnx-qdq default)",
    "passes": [{"gptq": {**_BUILDER_FORMAT_INT4, "lm_head": _BUILDER_FORMAT_INT4,
                         "calibration": {"samples": 32, "seq_len": 512}}},
               "pack_weights"],
}
#: W8A8: int8 weights per output channel (symmetric: uint8 codes around 128), int8 inputs of
#: every decoder linear (qcompile::linear_w8a8, MatMulInteger u8 x u8); the lm_head and the
#: embedding stay 8-bit weight-only
_W8_PER_CHANNEL = {"quantize_weights_rtn": {"bits": 8, "group_size": 0, "symmetric": True}}
_SMOOTHING = {"smoothquant": {"calibration": {"samples": 32, "seq_len": 512}}}


def _w8a8(description: str, scaling: str, smooth: bool) -> dict:
    # a static range gets a zero point (free: MatMulInteger takes one per tensor); per token
    # the codes are symmetric (one zero point for every row)
    activations = {"scaling": scaling, "symmetric": scaling != "static-tensor"}
    smoothing = {"smoothquant": {**_SMOOTHING["smoothquant"], "search_scaling": scaling}}
    return {"description": description,
            "passes": [*([smoothing] if smooth else []), _W8_PER_CHANNEL,
                       {"quantize_activations": activations}, "pack_weights"]}


BUILTIN_RECIPES.update({
    "w8a8-static": _w8a8("int8 weights per channel, int8 activations per tensor (static, "
                         "calibrated, asymmetric), integer MatMul", "static-tensor", False),
    "w8a8-dynamic": _w8a8("int8 weights per channel, int8 activations per token (dynamic), "
                          "integer MatMul", "dynamic-token", False),
    "w8a8-smoothquant": _w8a8("SmoothQuant (alpha searched per layer group), int8 weights per "
                              "channel, int8 activations per tensor (static, asymmetric)", "static-tensor",
                              True),
    "w8a8-smoothquant-dynamic": _w8a8("SmoothQuant (alpha searched per layer group for "
                                      "per-token activations), int8 weights per channel, int8 "
                                      "activations per token",
                                      "dynamic-token", True),
})
#: SmoothQuant then GPTQ in one recipe: GPTQ calibrates on the smoothed blocks (the same
#: chain as llm-compressor's W8A8 recipe), int8 weights per channel, int8 per-token inputs
BUILTIN_RECIPES["w8a8-smoothquant-gptq-dynamic"] = {
    "description": "SmoothQuant (alpha searched for per-token activations), then GPTQ int8 "
                   "weights per channel on the smoothed model, int8 activations per token",
    "passes": [{"smoothquant": {**_SMOOTHING["smoothquant"], "search_scaling": "dynamic-token"}},
               {"gptq": {**_W8_PER_CHANNEL["quantize_weights_rtn"],
                         **_SMOOTHING["smoothquant"]}},
               {"quantize_activations": {"scaling": "dynamic-token", "symmetric": True}},
               "pack_weights"],
}
#: OutlierTune: per-channel static inputs where a norm feeds the linears (the scales folded
#: into the norms and weights, each channel centred on its own zero point), per token where a
#: linear does (attention output, MLP down projection), as in the paper
_LINEAR_FED = ["*.o_proj", "*.down_proj", "*.out_proj", "*.fc2", "*.dense"]
BUILTIN_RECIPES["w8a8-outliertune"] = {
    "description": "OutlierTune: int8 inputs static per channel (q/k/v, gate/up: pre-executed "
                   "dequantization, per-channel zero points) and per token (o, down), int8 "
                   "weights per channel",
    "passes": [{"outliertune": _SMOOTHING["smoothquant"]}, _W8_PER_CHANNEL,
               {"quantize_activations": {"scaling": "static-channel", "symmetric": False,
                                         "per_token": _LINEAR_FED}},
               "pack_weights"],
}
#: W4A8 on ONNX Runtime's CPU kernels: MatMulNBits at accuracy level 4 quantizes its input to
#: int8 per token and block of 32 (the weights' groups) and multiplies in integers; SmoothQuant
#: searched for that error (int4 groups, per-block int8 inputs), then GPTQ on the smoothed
#: model; 8-bit lm_head and embedding (the defaults)
_W4_G32 = {"bits": 4, "group_size": 32, "symmetric": False}
BUILTIN_RECIPES["w4a8-smoothquant-gptq"] = {
    "description": "SmoothQuant (alpha searched for int4 groups of 32 and int8 inputs per "
                   "block), then GPTQ int4 groups of 32; MatMulNBits accuracy level 4 "
                   "(int8 activations per block of 32)",
    "accuracy_level": 4,
    "passes": [{"smoothquant": {**_SMOOTHING["smoothquant"], "search_scaling": "dynamic-block",
                                "search_weights": _W4_G32}},
               {"gptq": {**_W4_G32, **_SMOOTHING["smoothquant"]}},
               "pack_weights"],
}
#: the recipe each target compiles without ``-r`` (each target names its own)
DEFAULT_RECIPES = {name: target.default_recipe for name, target in TARGETS.items()}
DEFAULT_RECIPE = DEFAULT_RECIPES["ort"]


#: the pass a ``+kv...`` modifier appends
KV_CACHE_PASS = "quantize_kv_cache"
#: ``<recipe>+<modifier>`` appends a KV-cache quantization step to any recipe
KV_MODIFIERS: dict[str, dict] = {
    "kv8": {"bits": 8},
    # int4: a static per-channel key range wastes the 16 levels on RoPE-rotated channels
    # (SmolLM2 +9 % perplexity); normalising channels first, then scaling each token's groups
    # of 32, costs +1.7 % in the torch check for 33 % more bytes than per-channel keys
    "kv4": {"bits": 4, "key": "normalized-token", "group_size": 32},
    "kv4-channel": {"bits": 4},
    "kv8-token": {"bits": 8, "key": "per-token"},
    "kv4-token": {"bits": 4, "key": "per-token"},
    # ONNX Runtime's GroupQueryAttention quantizes the cache itself (static symmetric scales
    # per channel for keys and values); the one form onnxruntime-genai runs
    "kv8-gqa": {"bits": 8, "key": "symmetric-channel", "value": "symmetric-channel"},
    "kv4-gqa": {"bits": 4, "key": "symmetric-channel", "value": "symmetric-channel"},
}


def _parse_step(entry, where: str) -> PassStep:
    if isinstance(entry, str):
        name, raw = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        name, raw = next(iter(entry.items()))
        raw = raw or {}
    else:
        raise QcompileError(
            f"{where} must be a pass name or a one-key mapping {{pass_name: options}}",
            "for example: - quantize_weights_rtn: {bits: 4}",
        )
    pass_cls = get_pass(name)
    if not isinstance(raw, dict):
        raise QcompileError(f"options of {where} ({name}) must be a mapping", "use key: value")
    return PassStep(name, build_options(pass_cls.Options, raw, f"{where} ({name})"))


def recipe_from_dict(data, name: str, source: str) -> Recipe:
    """Validate and build a recipe from plain data."""
    if not isinstance(data, dict):
        raise QcompileError(f"recipe {source} must be a mapping", "see `qcompile recipes`")
    unknown = sorted(set(data) - {"name", "description", "passes", "accuracy_level"})
    if unknown:
        raise QcompileError(
            f"unknown recipe field(s) {', '.join(unknown)} in {source}",
            "a recipe has: name, description, passes, and optionally accuracy_level",
        )
    level = data.get("accuracy_level")
    if level is not None and (not isinstance(level, int) or isinstance(level, bool)
                              or not 0 <= level <= 4):
        raise QcompileError(f"accuracy_level of {source} must be an integer 0-4, got {level!r}",
                            "use 0 (float32 compute) or 4 (int8 activations)")
    passes = data.get("passes")
    if not isinstance(passes, list):
        raise QcompileError(f"recipe {source} needs a 'passes' list", "add passes: [...]")
    steps = tuple(_parse_step(e, f"{source}: passes[{i}]") for i, e in enumerate(passes))
    return Recipe(str(data.get("name", name)), str(data.get("description", "")), steps, source,
                  level)


def _read_file(path: pathlib.Path):
    try:
        text = path.read_text()
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise QcompileError(f"cannot parse recipe file {path}: {exc}", "fix its syntax") from exc


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a user's ``.yaml``/``.yml``/``.json`` file, optionally
    with a KV-cache modifier: ``w4a16-rtn+kv8``, ``my.yaml+kv4``."""
    base, plus, modifier = name_or_path.rpartition("+")
    if plus and base:
        return _with_kv_modifier(load_recipe(base), modifier)
    if name_or_path in BUILTIN_RECIPES:
        return recipe_from_dict(BUILTIN_RECIPES[name_or_path], name_or_path, "built-in")
    path = pathlib.Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise QcompileError(f"recipe file {path} does not exist", "check the path")
        return recipe_from_dict(_read_file(path), path.stem, str(path))
    raise QcompileError(
        f"unknown recipe {name_or_path!r}",
        f"built-in recipes: {', '.join(BUILTIN_RECIPES)}; or pass a .yaml/.json file",
    )


def _with_kv_modifier(recipe: Recipe, modifier: str) -> Recipe:
    if modifier not in KV_MODIFIERS:
        raise QcompileError(f"unknown recipe modifier +{modifier}",
                            f"KV-cache modifiers: {', '.join('+' + m for m in KV_MODIFIERS)}")
    if recipe.kv_cache_options() is not None:
        raise QcompileError(f"recipe {recipe.name} already quantizes the KV cache",
                            f"drop +{modifier}")
    step = _parse_step({KV_CACHE_PASS: KV_MODIFIERS[modifier]}, f"+{modifier}")
    description = f"{recipe.description}; {step.options.bits}-bit KV cache"
    return dataclasses.replace(recipe, name=f"{recipe.name}+{modifier}", description=description,
                               steps=(*recipe.steps, step))


def recipe_of_report(report: dict) -> Recipe:
    """The recipe a bundle was compiled with, from its ``report.json`` (verify and eval)."""
    data = {k: v for k, v in report["recipe"].items() if k != "source"}
    return recipe_from_dict(data, data["name"], report["recipe"].get("source", "report.json"))
