"""The ``qcompile`` command line: compile, verify, eval, generate, bench, recipes.

Bad input (a :class:`~qcompile.errors.QcompileError`) prints the problem and its fix and exits
with status 2; a failed ``verify`` exits with status 1.
"""

from __future__ import annotations

import atexit
import os
import pathlib
import sys

import click
from rich.table import Table

from qcompile.console import console
from qcompile.errors import QcompileError
from qcompile.recipes import DEFAULT_RECIPES
from qcompile.streaming import STREAM_MODES
from qcompile.targets import target_names

__all__ = ["main", "cli"]


def _default_output(source: str | None, recipe: str, target: str) -> pathlib.Path:
    model = pathlib.Path(source).stem if source else "smollm2-135m"
    return pathlib.Path("out") / f"{model}-{pathlib.Path(recipe).stem}-{target}"


@click.group()
def cli() -> None:
    """Quantize a Hugging Face causal LM and export it as a verified ONNX bundle."""


@cli.command()
@click.argument("source", required=False)
@click.option("-r", "--recipe", help="built-in recipe name or a .yaml/.json recipe file "
              "[default: " + ", ".join(f"{recipe} for {target}"
                                       for target, recipe in DEFAULT_RECIPES.items()) + "]")
@click.option("-t", "--target", default=target_names()[0], show_default=True,
              type=click.Choice(target_names()), help="lowering target")
@click.option("-o", "--output", type=click.Path(path_type=pathlib.Path),
              help="bundle directory [default: out/<model>-<recipe>-<target>]")
@click.option("--force", is_flag=True, help="replace an existing bundle")
@click.option("--accuracy-level", type=click.IntRange(0, 4),
              help="MatMulNBits compute type: 0 float32 (matches the torch reference), 4 int8 "
              "activations (faster) [default: the recipe's, else 0]")
@click.option("--stream", type=click.Choice(STREAM_MODES), default="auto",
              show_default=True, help="read weights from the checkpoint one at a time as the "
              "bundle is written (auto: where the recipe and target allow) instead of loading "
              "the whole model")
@click.option("--replay", type=click.Path(path_type=pathlib.Path),
              help="a bundle compiled from the same source and recipe: replay its calibration "
              "record (calibration.safetensors) instead of calibrating again, to lower it for "
              "another target or a newer qcompile in minutes")
def compile(source, recipe, target, output, force, accuracy_level, stream, replay) -> None:
    """Compile SOURCE (hub id, HF directory or .gguf; default: SmolLM2-135M) to a bundle."""
    from qcompile.compiler import compile_bundle

    recipe = recipe or DEFAULT_RECIPES[target]
    output = output or _default_output(source, recipe, target)
    report = compile_bundle(source, recipe, target, output, force, accuracy_level, stream,
                            _replayed_record(replay))
    _print_compile_summary(report, output)


def _replayed_record(bundle: pathlib.Path | None):
    if bundle is None:
        return None
    from qcompile.calibration.record import RECORD_FILE, load_record

    record = load_record(bundle)
    if record is None:
        raise QcompileError(f"--replay {bundle}: no {RECORD_FILE} there",
                            "give a bundle compiled with a calibrated recipe, or leave --replay "
                            "out to calibrate")
    return record


def _print_compile_summary(report: dict, output: pathlib.Path) -> None:
    formats: dict[str, int] = {}
    for layer in report["layers"].values():
        formats[f"{layer['role']}: {layer['format']}"] = formats.get(
            f"{layer['role']}: {layer['format']}", 0) + 1
    table = Table(title=f"bundle {output}")
    table.add_column("layers")
    table.add_column("count", justify="right")
    for name, count in sorted(formats.items()):
        table.add_row(name, str(count))
    table.add_row("model bytes", f"{report['sizes']['model_bytes']:,}")
    table.add_row("compile seconds", f"{report['timings']['compile_s']:.1f}")
    console.print(table)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=pathlib.Path))
@click.option("--source", help="override the source model path recorded in report.json")
@click.option("--ladder", type=click.Choice(["auto", "whole", "blockwise"]), default="auto",
              show_default=True,
              help="whole: every stage on the whole model; blockwise: codes, each decoder block "
                   "on real activations, logits and decode against the last torch stage, "
                   "holding about twice the bundle (large models); auto: whole where it fits "
                   "in memory")
def verify(bundle, source, ladder) -> None:
    """Run the parity ladder on BUNDLE; exit 1 if any stage diverges."""
    from qcompile.runtimes.verify import verify as verify_bundle

    summary = verify_bundle(bundle, source, ladder)
    console.print(f"ladder: {summary['ladder']['kind']} ({summary['ladder']['why']})")
    table = Table(title=f"parity ladder of {bundle}")
    for column in ("stage", "vs", "max abs", "mean abs", "rel max", "rel L2", "top-1",
                   "tolerance", "ok"):
        table.add_column(column)
    for s in summary["stages"]:
        ok = {True: "[green]pass", False: "[red]FAIL", None: "[dim]info"}[s["passed"]]
        table.add_row(s["stage"], s["compared_with"], f"{s['max_abs']:.3g}",
                      f"{s['mean_abs']:.3g}", f"{s['rel_max']:.3g}", f"{s['rel_l2']:.3g}",
                      f"{s['top1']:.3f}", s["tolerance"], ok)
    console.print(table)
    for skipped in summary.get("skipped_stages", []):
        console.print(f"[dim]skipped {skipped['stage']}: {skipped['reason']}")
    decode = summary["decode"]
    verdict = "[green]pass" if decode["passed"] else "[red]FAIL"
    console.print(f"decode: {decode['new_tokens']} greedy tokens after a "
                  f"{decode['prompt_tokens']}-token prompt, ORT vs torch reference: tokens "
                  f"{'equal' if decode['tokens_equal'] else 'differ from step ' + str(decode['first_different_step'])}"
                  f", step logits rel L2 {decode['rel_l2']:.3g} ({decode['tolerance']}"
                  f"{_decode_noise(decode.get('float_noise'))}) {verdict}")
    _print_blocks(summary.get("blocks"))
    codes = summary["integer_codes"]
    if codes:
        console.print(f"integer codes: {codes['weights_checked']} weights checked, "
                      f"{len(codes['mismatched'])} mismatched {codes['mismatched'][:5]}")
    if not summary["passed"]:
        first = next((s for s in summary["stages"] if s["passed"] is False), None)
        if first:
            layer = first.get("first_diverging_layer") or {}
            console.print(f"[red]first diverging stage: {first['stage']} (vs "
                          f"{first['compared_with']}), max {first['max_abs']:.4g}, mean "
                          f"{first['mean_abs']:.4g}; first diverging layer: "
                          f"{layer.get('layer', 'not localised')}")
        sys.exit(1)
    console.print("[bold green]verify passed")


def _decode_noise(noise: dict | None) -> str:
    """The decode stage's float-noise bound, where the fixed one failed."""
    if not noise:
        return ""
    return (f"; or vs float64 rel_l2 <= {noise['factor']:g}x torch fp32's "
            f"{noise['torch_fp32_vs_fp64_rel_l2']:.3g} = {noise['bound']:.3g}, got "
            f"{noise['runtime_vs_fp64_rel_l2']:.3g}")


def _print_blocks(blocks: list | None) -> None:
    """One line for the block-wise ladder's blocks: how many passed, the worst, any failure."""
    if not blocks:
        return
    worst = max(blocks, key=lambda b: b["rel_l2"])
    failed = [b["stage"] for b in blocks if not b["passed"]]
    verdict = "[green]pass" if not failed else f"[red]FAIL at {failed[0]}"
    console.print(f"blocks: {len(blocks) - len(failed)} of {len(blocks)} within "
                  f"{blocks[0]['tolerance']} on ORT's own activations; worst {worst['stage']}: "
                  f"rel max {worst['rel_max']:.3g}, rel L2 {worst['rel_l2']:.3g} {verdict}")


@cli.command(name="eval")
@click.argument("bundle", type=click.Path(path_type=pathlib.Path))
@click.option("--text", help="python-code, release-notes, a text file or "
              "hf:NAME:CONFIG:SPLIT:COLUMN [default: the evaluation half of the pydoc topics]")
@click.option("--windows", default=16, show_default=True, type=click.IntRange(1))
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(2))
@click.option("--source/--no-source", default=True, help="also score the fp32 source (torch)")
@click.option("--reference", is_flag=True,
              help="also score the bundle's quantized torch reference (parity of perplexity)")
def eval_(bundle, text, windows, seq_len, source, reference) -> None:
    """Perplexity of BUNDLE (ONNX Runtime) and of its fp32 source (torch)."""
    from qcompile.runtimes.evaluation import evaluate_bundle

    results = evaluate_bundle(bundle, text, windows, seq_len, source, reference)
    table = Table(title=f"perplexity ({results['windows']} x {seq_len} tokens)")
    table.add_column("model")
    table.add_column("perplexity", justify="right")
    table.add_column("vs fp32", justify="right")
    base = results.get("fp32_source")
    for name in ("fp32_source", "bundle_ort", "bundle_torch_reference"):
        if name in results:
            ppl = results[name]["perplexity"]
            delta = f"{100 * (ppl / base['perplexity'] - 1):+.1f} %" if base else ""
            table.add_row(name, f"{ppl:.3f}", delta)
    cached = results["bundle_ort_through_cache"]
    table.add_row(f"bundle_ort_through_cache (2nd half of each window, from a "
                  f"{cached['context_tokens']}-token cache)", f"{cached['perplexity']:.3f}", "")
    console.print(table)


@cli.command()
@click.argument("fp32_bundle", type=click.Path(path_type=pathlib.Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=pathlib.Path))
@click.option("--algo", default="rtn", show_default=True,
              type=click.Choice(["rtn", "hqq", "gptq"]))
@click.option("--bits", default="4", show_default=True, type=click.Choice(["2", "3", "4", "8"]))
@click.option("--block-size", default=128, show_default=True, type=int)
@click.option("--symmetric", is_flag=True)
@click.option("--lm-head-bits", default="8", show_default=True, type=click.Choice(["8", "4",
              "float"]), help="how the lm_head is quantized (ours: 8-bit per channel)")
@click.option("--samples", type=click.IntRange(1),
              help="gptq / static: calibration windows of the default text, as ours  "
              "[default: 128 for gptq, 16 for static]")
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(8))
@click.option("--method", default="matmul-nbits", show_default=True,
              type=click.Choice(["matmul-nbits", "static", "static-smoothquant", "dynamic"]),
              help="ORT's weight-only matmul_nbits_quantizer, or its W8A8 quantize_static "
              "(QDQ, MinMax), with SmoothQuant, or quantize_dynamic")
@click.option("--activation-type", type=click.Choice(["u8", "s8"]),
              help="static: activation type  [default: u8]")
@click.option("--reduce-range/--full-range", default=None,
              help="W8A8: 7-bit weights (ORT's advice for x86 without VNNI)  [default: reduce]")
@click.option("--smoothquant-alpha", type=float, help="static-smoothquant  [default: 0.5]")
@click.option("--force", is_flag=True)
@click.pass_context
def peer(ctx, fp32_bundle, output, algo, bits, block_size, symmetric, lm_head_bits, samples,
         seq_len, method, activation_type, reduce_range, smoothquant_alpha, force) -> None:
    """Quantize an fp32 bundle with ONNX Runtime's own quantizers (peer baseline)."""
    head = None if lm_head_bits == "float" else int(lm_head_bits)
    given = {name for name in ("algo", "bits", "block_size", "symmetric", "activation_type",
                               "reduce_range", "smoothquant_alpha")
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    wrong = given & ({"activation_type", "reduce_range", "smoothquant_alpha"}
                     if method == "matmul-nbits" else {"algo", "bits", "block_size", "symmetric"})
    if wrong:
        options = ", ".join("--" + name.replace("_", "-") for name in sorted(wrong))
        raise click.UsageError(f"{options} {'does' if len(wrong) == 1 else 'do'} not apply "
                               f"to --method {method}")
    if method == "matmul-nbits":
        from qcompile.runtimes.peer_ort_quantizer import quantize_with_ort

        report = quantize_with_ort(fp32_bundle, output, algo, int(bits), block_size, symmetric,
                                   head, force, samples or 128, seq_len)
    else:
        from qcompile.runtimes.peer_ort_activation import quantize_activations_with_ort

        report = quantize_activations_with_ort(
            fp32_bundle, output, method, activation_type or "u8",
            True if reduce_range is None else reduce_range, smoothquant_alpha, head, force,
            samples or 16, seq_len)
    console.print(f"[bold green]peer bundle[/bold green] {output}: "
                  f"{report['sizes']['model_bytes']:,} model bytes ({report['recipe']['name']})")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=pathlib.Path))
@click.argument("prompt")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--greedy/--sample", default=True, show_default=True,
              help="argmax, or sample with --temperature / --top-k / --top-p")
@click.option("--temperature", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int, help="0 = all tokens")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", type=int, help="seed for sampling (reproducible output)")
@click.option("--engine", default="auto", show_default=True,
              type=click.Choice(["auto", "genai", "ort"]),
              help="auto: onnxruntime-genai when it can run the bundle, else qcompile's loop")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0))
def generate(bundle, prompt, max_new_tokens, greedy, temperature, top_k, top_p, seed, engine,
             threads) -> None:
    """Continue PROMPT (plain text, no chat template) with BUNDLE, streaming to stdout."""
    import time

    from qcompile.runtimes.genai_session import choose_engine
    from qcompile.bundle.files import check_bundle_files
    from qcompile.runtimes.generation import Sampling

    check_bundle_files(bundle)
    sampling = Sampling(greedy, temperature, top_k, top_p, seed)
    chosen, reason = choose_engine(engine, [bundle])
    console.print(f"[bold]engine:[/bold] {chosen} ({reason})")
    prompt_ids, tokens, decode = _text_engine(bundle, chosen, prompt, threads)
    start = time.perf_counter()
    first = None
    count = 0
    for token in tokens(prompt_ids, max_new_tokens, sampling):
        first = first or time.perf_counter()
        count += 1
        click.echo(decode(token), nl=False)
    click.echo()
    _print_speed(len(prompt_ids), count, start, first, time.perf_counter())


def _text_engine(bundle: pathlib.Path, engine: str, prompt: str, threads: int):
    """``(prompt_ids, stream(ids, n, sampling), decode(token) -> new text)`` for ``engine``."""
    if engine == "genai":
        from qcompile.runtimes.genai_session import GenaiSession

        session = GenaiSession(bundle, threads)
        stream = session.decoder_stream()
        return session.encode(prompt), session.stream, stream.decode
    from qcompile.runtimes.generation import OrtGenerator, load_tokenizer

    tokenizer = load_tokenizer(bundle)
    generator = OrtGenerator(bundle, threads)
    seen: list[int] = []
    printed = [""]

    def decode(token: int) -> str:
        seen.append(token)
        text = tokenizer.decode(seen, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more tokens
            return ""
        piece, printed[0] = text[len(printed[0]):], text
        return piece

    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids, generator.stream, decode


def _print_speed(prompt_len: int, count: int, start: float, first, end: float) -> None:
    if not count:
        return
    decode = f", decode {(count - 1) / (end - first):.1f} tokens/s" if count > 1 else ""
    console.print(f"{prompt_len} prompt tokens, {count} new tokens in {end - start:.2f} s "
                  f"({count / (end - start):.1f} tokens/s; prefill "
                  f"{1000 * (first - start):.0f} ms{decode})")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=pathlib.Path))
@click.option("--vs", "vs", type=click.Path(path_type=pathlib.Path),
              help="a second bundle measured in the same run (runs interleaved), for ratios")
@click.option("--engine", default="auto", show_default=True,
              type=click.Choice(["auto", "genai", "ort"]),
              help="auto: onnxruntime-genai when every bundle allows it, else qcompile's loop")
@click.option("--runs", default=5, show_default=True, type=click.IntRange(1),
              help="timed runs per bundle after a warm-up; medians are reported")
@click.option("--prompt-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--new-tokens", default=128, show_default=True, type=click.IntRange(2))
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="intra-op threads for both bundles (0 = ONNX Runtime's default)")
@click.option("--json", "json_path", type=click.Path(path_type=pathlib.Path),
              help="also write the results to this JSON file")
def bench(bundle, vs, engine, runs, prompt_tokens, new_tokens, threads, json_path) -> None:
    """Prefill latency, decode tokens/s, peak memory and cache size of BUNDLE (vs another)."""
    import json

    from qcompile.bundle import REPORT_FILE, update_report
    from qcompile.runtimes.bench import bench as run_bench

    result = run_bench(bundle, vs, engine, runs, prompt_tokens, new_tokens, threads)
    _print_bench(result)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    if (bundle / REPORT_FILE).is_file():
        update_report(bundle, "bench", result)


def _print_bench(result: dict) -> None:
    bundles, ratios = result["bundles"], result.get("ratios", {})
    table = Table(title=f"bench: engine {result['engine']}, {result['prompt_tokens']} prompt + "
                        f"{result['new_tokens']} new tokens, median of {result['runs']} runs, "
                        f"threads {result['threads'] or 'default'}")
    table.add_column("metric")
    for role, data in bundles.items():
        table.add_column(f"{role}: {data['path']}", justify="right")
    if ratios:
        table.add_column("ratio", justify="right")
    rows = (("prefill ms", "prefill_ms", "{:.1f}", "prefill_latency_theirs_over_ours"),
            ("decode tokens/s", "decode_tok_s", "{:.1f}", "decode_tok_s_ours_over_theirs"),
            ("peak RSS MiB", "peak_rss_bytes", "{:.0f}", "peak_rss_ours_over_theirs"),
            ("cache bytes/token", "cache_bytes_per_token", "{:,}",
             "cache_bytes_per_token_ours_over_theirs"),
            ("model bytes", "model_bytes", "{:,}", "model_bytes_ours_over_theirs"))
    for label, key, form, ratio in rows:
        cells = []
        for data in bundles.values():
            value = data[key]
            value = value / 2**20 if key == "peak_rss_bytes" else value
            cells.append("n/a" if value is None else form.format(value))
        if ratios:
            cells.append("n/a" if ratios[ratio] is None else f"{ratios[ratio]:.3f}")
        table.add_row(label, *cells)
    console.print(table)
    console.print(f"engine: {result['engine']} ({result['engine_reason']}); ratios: decode "
                  "ours/theirs, prefill latency theirs/ours (> 1: ours faster), memory, cache "
                  "and size ours/theirs")
    for label, key in (("decode", "decode_tok_s_ours_over_theirs"),
                       ("prefill", "prefill_latency_theirs_over_ours")):
        paired = result.get("paired", {}).get(key)
        if paired:
            console.print(f"{label}, paired by round: {paired['ratio']:.3f} (95 % interval "
                          f"{paired['low']:.3f}-{paired['high']:.3f} over {paired['rounds']} "
                          f"rounds): {paired['verdict']}")


@cli.command()
def recipes() -> None:
    """List the built-in recipes and the KV-cache modifiers any recipe takes."""
    from qcompile.passes.quantize_kv_cache import KVOptions, describe
    from qcompile.recipes import BUILTIN_RECIPES, KV_MODIFIERS

    for name, data in BUILTIN_RECIPES.items():
        click.echo(f"{name:16s} {data['description']}")
    click.echo("\nKV-cache modifiers, appended to any recipe (w4a16-rtn+kv8, my.yaml+kv4):")
    for name, options in KV_MODIFIERS.items():
        click.echo(f"+{name:15s} {describe(KVOptions(**options))}")


def main(argv=None) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        cli.main(args=argv, standalone_mode=False)
    except QcompileError as exc:
        console.print(f"[bold red]error:[/bold red] {exc.problem}")
        if exc.hint:
            console.print(f"  [bold]fix:[/bold] {exc.hint}")
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


def run() -> None:
    """The ``qcompile`` command: :func:`main`, then the process ends without tearing down
    its modules. At exit the interpreter frees every object of PyTorch, transformers and
    ONNX one by one, 1-2 s after a compile; the exit handlers (temporary files, the
    progress display) still run and the streams are flushed first."""
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
