"""The weight-only peers side by side: NVIDIA ModelOpt's INT4 AWQ and llm-compressor's GPTQ
W4A16 against our calibrated methods, on the same calibration tokens and evaluation windows.

    .venv/bin/python samples/peer_weight_only.py [--out out/peers] [--resume] [--only ID ...]

Settings (rows of the table):

* ``g128 sym``: int4, groups of 128, symmetric, embedding and lm_head in float32, 32 x 512
  calibration tokens. ModelOpt ``INT4_AWQ_CFG`` (``awq_lite``; its config disables the
  ``*lm_head*`` and ``nn.Embedding`` quantizers) against our ``awq``, ``gptq`` and
  ``flexround`` (``samples/recipes/peer-g128-sym-<method>.yaml``).
* ``g64 asym``: int4, groups of 64, asymmetric, embedding and lm_head in float32, 32 x 512.
  llm-compressor ``GPTQModifier`` (group 64 asymmetric, ``ignore=["lm_head"]``; it targets
  ``Linear`` only, so the embedding stays float; llm-compressor refuses groups of 128 on
  SmolLM2, K = 576) against our ``gptq`` and ``flexround`` (``peer-g64-asym-<method>.yaml``).

How a peer row is made:

1. The calibration tokens come from *our* code: ``calibration_samples`` with the calibration
   options of our recipes (all must agree; 32 windows of 512 consecutive tokens from the start
   of the calibration half of the default text), saved as ``OUT/calibration_tokens.pt``.
2. The peer runs in its own venv (``/work/peers/modelopt``, ``/work/peers/llmc``; this same
   file with ``--peer-side TOOL``, which imports no qcompile) on the Hugging Face directory our
   loader converts the default GGUF model into. It quantizes with the peer's own API on those
   tokens and saves a float32 Hugging Face directory whose weights are the peer's *effective*
   weights: ModelOpt's fake-quantized weight with its AWQ ``pre_quant_scale`` folded into the
   input columns (:func:`fold_pre_quant_scale`), llm-compressor's weight passed through
   compressed-tensors' ``forward_quantize`` with the scales and zero points GPTQ chose. The
   peer side then checks the logits of the saved model against the peer's quantized model and
   fails if they differ by more than float32 rounding.
3. That directory is compiled ``qcompile compile DIR -r fp32 -t ort`` and scored with
   ``qcompile eval --no-source`` like our bundles; ours also pass ``qcompile verify``.

Every figure goes to ``OUT/peers.json``; the table to ``OUT/peers.md`` and stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
RECIPES = REPO / "samples" / "recipes"
PEER_VENVS = {"modelopt": pathlib.Path("/work/peers/modelopt"),
              "llmc": pathlib.Path("/work/peers/llmc")}
TEXTS = ("default", "python-code", "release-notes")
#: model files a peer directory gets from the peer; everything else (tokenizer) is copied
_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors",
                "model.safetensors.index.json"}
#: saved-vs-peer logits must agree to this fraction of the largest logit (float32 rounding)
LOGITS_REL_BOUND = 1e-4


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    setting: str
    tool: str
    kind: str  # "fp32", "ours" or a key of PEER_VENVS
    recipe: str | None = None


ROWS = (
    Row("fp32", "fp32", "fp32 (reference)", "fp32", "fp32"),
    Row("g128-sym-modelopt-awq", "g128 sym", "ModelOpt INT4_AWQ_CFG (awq_lite)", "modelopt"),
    Row("g128-sym-awq", "g128 sym", "qcompile awq", "ours", "peer-g128-sym-awq.yaml"),
    Row("g128-sym-gptq", "g128 sym", "qcompile gptq", "ours", "peer-g128-sym-gptq.yaml"),
    Row("g128-sym-flexround", "g128 sym", "qcompile flexround", "ours",
        "peer-g128-sym-flexround.yaml"),
    Row("g64-asym-llmc-gptq", "g64 asym", "llm-compressor GPTQModifier W4A16", "llmc"),
    Row("g64-asym-gptq", "g64 asym", "qcompile gptq", "ours", "peer-g64-asym-gptq.yaml"),
    Row("g64-asym-flexround", "g64 asym", "qcompile flexround", "ours",
        "peer-g64-asym-flexround.yaml"),
)


# --- pure torch, shared by both sides (no qcompile, no peer imports) ------------------------

def fold_pre_quant_scale(weight, pre_quant_scale):
    """The weight ``W_eff`` with ``x @ W_eff.T == (x * s) @ W.T`` for ``s = pre_quant_scale``.

    ModelOpt's AWQ multiplies a linear's *input* by ``s`` (one factor per input channel) before
    the fake-quantized weight ``W``; folded, ``s`` scales ``W``'s input columns.
    """
    if pre_quant_scale is None:
        return weight
    scale = pre_quant_scale.reshape(-1)
    if scale.numel() != weight.shape[1]:
        raise ValueError(f"pre_quant_scale has {scale.numel()} factors for a weight with "
                         f"{weight.shape[1]} input columns")
    return weight * scale.to(weight.dtype)[None, :]


# --- our side (qcompile's venv) -------------------------------------------------------------

def recipe_paths() -> list[pathlib.Path]:
    return [RECIPES / r.recipe for r in ROWS if r.kind == "ours"]


def calibration_options_of(recipes):
    """The one calibration setting all ``recipes`` use (the peers get exactly those tokens)."""
    from qcompile.recipes import load_recipe

    found = {str(p): load_recipe(str(p)).weight_options().calibration for p in recipes}
    options = set(found.values())
    if len(options) != 1:
        raise SystemExit(f"the recipes calibrate differently: {found}")
    return options.pop()


def calibration_tokens(options, tokenizer, vocab_size: int, path: pathlib.Path):
    """Our calibration samples under ``options``, saved to ``path`` for the peers."""
    import torch
    from qcompile.calibration.data import calibration_samples

    ids = calibration_samples(options, tokenizer, vocab_size).to(torch.int64).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ids, path)
    return ids


def _run(command: list[str], log: pathlib.Path) -> tuple[int, float]:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                              cwd=REPO).returncode
    return code, round(time.perf_counter() - start, 1)


def _qcompile(args: list[str], log: pathlib.Path, ok=(0,)) -> tuple[int, float]:
    code, seconds = _run([sys.executable, "-m", "qcompile", *args], log)
    if code not in ok:
        raise SystemExit(f"failed ({code}): qcompile {' '.join(args)}; see {log}")
    return code, seconds


def _evaluate(bundle: pathlib.Path, logs: pathlib.Path, windows: int) -> dict:
    scores = {}
    for text in TEXTS:
        extra = [] if text == "default" else ["--text", text]
        _, seconds = _qcompile(["eval", str(bundle), "--no-source", "--windows", str(windows),
                                *extra], logs / f"eval-{text}.log")
        ppl = json.loads((bundle / "report.json").read_text())["perplexity"]
        scores[text] = {"perplexity": ppl["bundle_ort"]["perplexity"],
                        "windows": ppl["windows"], "eval_s": seconds}
    return scores


def _run_peer(row: Row, model_dir: pathlib.Path, tokens: pathlib.Path, out: pathlib.Path,
              venvs: dict) -> dict:
    python = venvs[row.kind] / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{row.tool} needs its venv {venvs[row.kind]} "
                         "(see reference/peers.md)")
    target = out / f"{row.id}-hf"
    code, seconds = _run([str(python), str(pathlib.Path(__file__).resolve()), "--peer-side",
                          row.kind, "--model", str(model_dir), "--tokens", str(tokens),
                          "--out", str(target)], out / "logs" / row.id / "peer.log")
    if code:
        raise SystemExit(f"{row.tool} failed; see {out / 'logs' / row.id / 'peer.log'}")
    return json.loads((target / "peer.json").read_text()) | {"peer_wall_s": seconds,
                                                              "hf_dir": str(target)}


def measure_row(row: Row, out: pathlib.Path, model_dir, tokens, venvs, windows) -> dict:
    logs = out / "logs" / row.id
    bundle = out / f"{row.id}-bundle"
    result: dict = {"id": row.id, "setting": row.setting, "tool": row.tool, "kind": row.kind}
    if row.kind in PEER_VENVS:
        result["peer"] = _run_peer(row, model_dir, tokens, out, venvs)
        source, recipe = [result["peer"]["hf_dir"]], "fp32"
    else:
        source, recipe = [], row.recipe if row.kind == "fp32" else str(RECIPES / row.recipe)
        result["recipe"] = row.recipe
    _, result["compile_s"] = _qcompile(["compile", *source, "-r", recipe, "-t", "ort", "-o",
                                        str(bundle), "--force"], logs / "compile.log")
    if row.kind == "ours":
        code, result["verify_s"] = _qcompile(["verify", str(bundle)], logs / "verify.log",
                                             ok=(0, 1))
        result["verify"] = code == 0
    result["perplexity"] = _evaluate(bundle, logs, windows)
    report = json.loads((bundle / "report.json").read_text())
    result["model_bytes"] = report["sizes"]["model_bytes"]
    result["calibration"] = report.get("calibration")
    return result


def _seconds(r: dict):
    """Quantization time alone: the peer's own call, or our calibrated pass."""
    if "peer" in r:
        return r["peer"]["quantize_s"]
    return (r.get("calibration") or {}).get("seconds")


def markdown(results: list[dict]) -> str:
    fp32 = next((r["perplexity"] for r in results if r["kind"] == "fp32"), None)
    lines = ["| setting | tool / method | " + " | ".join(TEXTS) +
             " | model bytes | quantize s | verify |", "|" + "---|" * (len(TEXTS) + 5)]
    for r in results:
        cells = []
        for text in TEXTS:
            ppl = r.get("perplexity", {}).get(text, {}).get("perplexity")
            delta = "" if ppl is None or fp32 is None or r["kind"] == "fp32" else \
                f" ({100 * (ppl / fp32[text]['perplexity'] - 1):+.1f} %)"
            cells.append("" if ppl is None else f"{ppl:.3f}{delta}")
        ours = r["kind"] in ("ours", "fp32") and "model_bytes" in r
        size = f"{r['model_bytes']:,}" if ours else "n/a (float export)"
        seconds = _seconds(r)
        verify = {True: "pass", False: "FAIL"}.get(r.get("verify"), "n/a")
        lines.append(f"| {r['setting']} | {r['tool']} | " + " | ".join(cells) + f" | {size} | "
                     f"{'' if seconds is None else f'{seconds:,.0f}'} | {verify} |")
    return "\n".join(lines) + "\n"


def _versions(venvs: dict) -> dict:
    """Package versions in each peer venv."""
    code = ("import importlib.metadata as m, json\nfound = {}\n"
            "for p in ('nvidia-modelopt', 'llmcompressor', 'compressed-tensors', 'torch', "
            "'transformers'):\n    try: found[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\nprint(json.dumps(found))")
    return {name: json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", code],
                                            text=True, capture_output=True, check=True).stdout)
            for name, venv in venvs.items() if (venv / "bin" / "python").exists()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "out" / "peers")
    parser.add_argument("--resume", action="store_true", help="keep rows already measured")
    parser.add_argument("--only", nargs="*", help="row ids to (re)measure")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--modelopt-venv", type=pathlib.Path, default=PEER_VENVS["modelopt"])
    parser.add_argument("--llmc-venv", type=pathlib.Path, default=PEER_VENVS["llmc"])
    args = parser.parse_args(argv)
    venvs = {"modelopt": args.modelopt_venv, "llmc": args.llmc_venv}

    from qcompile.models import gguf_as_directory, default_model_path, load_model

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = gguf_as_directory(default_model_path())
    loaded = load_model()  # the tokenizer our calibrated passes use
    options = calibration_options_of(recipe_paths())
    tokens_path = out / "calibration_tokens.pt"
    tokens = calibration_tokens(options, loaded.tokenizer, loaded.model.config.vocab_size,
                                tokens_path)
    del loaded
    json_path = out / "peers.json"
    state = json.loads(json_path.read_text()) if json_path.is_file() else {}
    done = {r["id"]: r for r in state.get("rows", [])} if args.resume or args.only else {}
    state.update({"model_dir": str(model_dir), "calibration": dataclasses.asdict(options),
                  "calibration_tokens": str(tokens_path), "tokens_shape": list(tokens.shape),
                  "versions": _versions(venvs), "windows": args.windows})
    for row in ROWS:
        wanted = row.id in args.only if args.only else row.id not in done
        if not wanted:
            continue
        print(f"== {row.id}", flush=True)
        done[row.id] = measure_row(row, out, model_dir, tokens_path, venvs, args.windows)
        state["rows"] = [done[r.id] for r in ROWS if r.id in done]
        json_path.write_text(json.dumps(state, indent=1))
        print(json.dumps({k: done[row.id].get(k) for k in ("id", "perplexity", "verify")}),
              flush=True)
    state["rows"] = [done[r.id] for r in ROWS if r.id in done]
    json_path.write_text(json.dumps(state, indent=1))
    table = markdown(state["rows"])
    (out / "peers.md").write_text(table)
    print(table)


# --- peer side (the peer's venv; must not import qcompile) ----------------------------------

def _load_float_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _save_effective(model_dir: str, effective: dict, out: pathlib.Path) -> dict:
    """A copy of ``model_dir`` with ``effective`` weights, float32, tokenizer files alongside;
    returns how far the weights moved (mean ``||W_eff - W|| / ||W||``)."""
    import torch

    plain = _load_float_model(model_dir)
    state = plain.state_dict()
    changes = []
    with torch.no_grad():
        for name, weight in effective.items():
            if state[name].shape != weight.shape:
                raise RuntimeError(f"{name}: {tuple(weight.shape)} != "
                                   f"{tuple(state[name].shape)}")
            changes.append(((weight - state[name]).norm() / state[name].norm()).item())
            state[name].copy_(weight)
    if out.exists():
        shutil.rmtree(out)
    plain.save_pretrained(out)
    for path in pathlib.Path(model_dir).iterdir():
        if path.is_file() and path.name not in _MODEL_FILES:
            shutil.copy2(path, out / path.name)
    return {"weights_replaced": len(changes),
            "mean_relative_weight_change": sum(changes) / max(len(changes), 1)}


def _check_saved(peer_model, out: pathlib.Path, tokens) -> dict:
    """Logits of the saved float model against the peer's own quantized model."""
    import torch

    saved = _load_float_model(str(out))
    probe = tokens[:2]
    with torch.no_grad():
        expected = peer_model(probe, use_cache=False).logits.float()
        got = saved(probe, use_cache=False).logits.float()
    diff = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    print(f"saved vs peer model logits: max|diff| = {diff:.3e}, max|logit| = {scale:.2f}",
          flush=True)
    if not diff <= LOGITS_REL_BOUND * scale:
        raise SystemExit(f"the saved model does not compute what the peer's model computes: "
                         f"max|diff| {diff:.3e} > {LOGITS_REL_BOUND} x {scale:.2f}")
    return {"logits_max_abs_diff": diff, "logits_max_abs": scale,
            "probe_tokens": list(probe.shape)}


def _record_inputs(model):
    """Token ids the model's embedding sees while calibrating (proof the peer used ours)."""
    seen = []
    handle = model.get_input_embeddings().register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].detach().clone())
        if inputs[0].device.type != "meta" else None)  # llm-compressor traces on meta
    return seen, handle


def _same_rows(seen: list, tokens) -> bool:
    """Whether the windows the model saw are exactly our calibration windows (each at least
    once; a method may run its forward loop more than once)."""
    import torch

    if not seen:
        return False
    rows = torch.cat([s.reshape(-1, tokens.shape[1]) for s in seen])
    return set(map(tuple, rows.tolist())) == set(map(tuple, tokens.tolist()))


def _peer_modelopt(args) -> dict:
    import copy

    import modelopt
    import modelopt.torch.quantization as mtq
    import torch

    tokens = torch.load(args.tokens)
    model = _load_float_model(args.model)
    seen, handle = _record_inputs(model)

    def forward_loop(m):
        with torch.no_grad():
            for start in range(0, len(tokens), args.batch):
                m(tokens[start:start + args.batch], use_cache=False)

    config = copy.deepcopy(mtq.INT4_AWQ_CFG)
    start = time.perf_counter()
    model = mtq.quantize(model, config, forward_loop)
    seconds = time.perf_counter() - start
    handle.remove()
    from modelopt.torch.quantization.nn import TensorQuantizer

    enabled = [n for n, m in model.named_modules()
               if isinstance(m, TensorQuantizer) and m.is_enabled]
    if not enabled or any(not n.endswith(".weight_quantizer") for n in enabled):
        raise SystemExit(f"INT4_AWQ_CFG should enable weight quantizers only: {enabled}")
    effective, facts = {}, {"quantized": [], "pre_quant_scale": 0, "float": []}
    with torch.no_grad():
        for name, module in model.named_modules():
            quantizer = getattr(module, "weight_quantizer", None)
            if quantizer is None or not hasattr(module, "input_quantizer"):
                continue
            output = getattr(module, "output_quantizer", None)
            if module.input_quantizer.is_enabled or (output is not None and output.is_enabled):
                raise SystemExit(f"{name}: INT4_AWQ_CFG should quantize weights only")
            scale = module.input_quantizer.pre_quant_scale
            if not quantizer.is_enabled and scale is None:
                facts["float"].append(name)
                continue
            facts["quantized" if quantizer.is_enabled else "float"].append(name)
            facts["pre_quant_scale"] += scale is not None
            effective[f"{name}.weight"] = fold_pre_quant_scale(
                quantizer(module.weight).float(), None if scale is None else scale.float())
    out = pathlib.Path(args.out)
    saved = _save_effective(args.model, effective, out)
    return {"tool": "nvidia-modelopt", "version": modelopt.__version__,
            "config": "INT4_AWQ_CFG", "algorithm": config["algorithm"],
            "weight_quantizer_cfg": [e for e in config["quant_cfg"]
                                     if e.get("quantizer_name") == "*weight_quantizer"],
            "quantize_s": round(seconds, 1),
            "calibration_tokens_match": _same_rows(seen, tokens),
            "quantized_linears": len(facts["quantized"]),
            "with_pre_quant_scale": facts["pre_quant_scale"], "float_linears": facts["float"],
            **saved, **_check_saved(model, out, tokens)}


def _peer_llmc(args) -> dict:
    import compressed_tensors
    import llmcompressor
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoTokenizer

    tokens = torch.load(args.tokens)
    model = _load_float_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = Dataset.from_dict({"input_ids": tokens.tolist(),
                                 "attention_mask": torch.ones_like(tokens).tolist()})
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group",
                               group_size=args.group_size)
    recipe = GPTQModifier(ignore=["lm_head"], config_groups={
        "group_0": QuantizationScheme(targets=["Linear"], weights=weights)})
    seen, handle = _record_inputs(model)
    start = time.perf_counter()
    model = oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe,
                    num_calibration_samples=len(tokens), max_seq_length=tokens.shape[1],
                    shuffle_calibration_samples=False) or model
    seconds = time.perf_counter() - start
    handle.remove()
    effective, quantized, off_grid = {}, [], 0.0
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
                continue
            weight = forward_quantize(module, module.weight, "weight", scheme.weights).float()
            off_grid = max(off_grid, (weight - module.weight.float()).abs().max().item())
            effective[f"{name}.weight"] = weight
            quantized.append(name)
    out = pathlib.Path(args.out)
    saved = _save_effective(args.model, effective, out)
    head = getattr(model.get_output_embeddings(), "quantization_scheme", None)
    return {"tool": "llmcompressor", "version": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "recipe": {"GPTQModifier": {
                "ignore": ["lm_head"], "weights": weights.model_dump(mode="json"),
                "actorder": str(recipe.actorder), "block_size": recipe.block_size,
                "dampening_frac": recipe.dampening_frac}},
            "quantize_s": round(seconds, 1),
            "calibration_tokens_match": _same_rows(seen, tokens),
            "quantized_linears": len(quantized), "lm_head_quantized": head is not None,
            "weight_off_grid_max": off_grid, **saved, **_check_saved(model, out, tokens)}


def peer_side(argv) -> None:
    import torch
    import transformers

    parser = argparse.ArgumentParser()
    parser.add_argument("--peer-side", choices=sorted(PEER_VENVS), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=8, help="ModelOpt forward-loop batch")
    parser.add_argument("--group-size", type=int, default=64, help="llm-compressor group")
    args = parser.parse_args(argv)
    if "qcompile" in sys.modules:
        raise SystemExit("the peer side must not import qcompile")
    torch.manual_seed(0)
    facts = (_peer_modelopt if args.peer_side == "modelopt" else _peer_llmc)(args)
    facts |= {"torch": torch.__version__, "transformers": transformers.__version__,
              "qcompile_imported": "qcompile" in sys.modules}
    (pathlib.Path(args.out) / "peer.json").write_text(json.dumps(facts, indent=1, default=str))
    print(json.dumps(facts, default=str))


if __name__ == "__main__":
    if "--peer-side" in sys.argv:
        peer_side(sys.argv[1:])
    else:
        main()
