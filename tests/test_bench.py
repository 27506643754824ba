"""``qcompile bench``: structure of the result, ratios of a bundle against itself, bad input.

Timings of a tiny model are noise, so only their presence is checked; the static figures
(cache bytes per token, model bytes) and the memory of two identical workers are compared.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
from test_generation import TINY_CACHE_BYTES_PER_TOKEN, tiny_bundle  # noqa: F401  (fixture)

from qcompile.runtimes.bench import bench_prompt

BUNDLE_FIELDS = {"path", "prefill_ms", "decode_tok_s", "prefill_ms_runs", "decode_tok_s_runs",
                 "peak_rss_bytes", "baseline_rss_bytes", "cache_bytes_per_token",
                 "model_bytes"}
RATIOS = {"decode_tok_s_ours_over_theirs", "prefill_latency_theirs_over_ours",
          "peak_rss_ours_over_theirs", "cache_bytes_per_token_ours_over_theirs",
          "model_bytes_ours_over_theirs"}


def _cli(capsys, *args) -> tuple[int, str]:
    from qcompile.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_bench_vs_itself(tiny_bundle, tmp_path, capsys):  # noqa: F811
    bundle = shutil.copytree(tiny_bundle, tmp_path / "ours")
    (bundle / "report.json").write_text(json.dumps({"target": {"accuracy_level": 0}}))
    out = tmp_path / "bench.json"
    code, err = _cli(capsys, "bench", str(bundle), "--vs", str(tiny_bundle), "--engine", "ort",
                     "--runs", "3", "--prompt-tokens", "12", "--new-tokens", "6",
                     "--threads", "1", "--json", str(out))
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["engine"] == "ort" and result["threads"] == 1 and result["runs"] == 3
    assert (result["prompt_tokens"], result["new_tokens"]) == (12, 6)
    for role in ("ours", "theirs"):
        data = result["bundles"][role]
        assert set(data) == BUNDLE_FIELDS
        assert len(data["prefill_ms_runs"]) == 3 and len(data["decode_tok_s_runs"]) == 3
        assert data["prefill_ms"] > 0 and data["decode_tok_s"] > 0
        assert data["cache_bytes_per_token"] == TINY_CACHE_BYTES_PER_TOKEN
        assert data["peak_rss_bytes"] > data["baseline_rss_bytes"] > 0
    assert set(result["ratios"]) == RATIOS
    ratios = result["ratios"]
    assert ratios["cache_bytes_per_token_ours_over_theirs"] == 1.0
    assert ratios["model_bytes_ours_over_theirs"] == 1.0
    assert 0.8 < ratios["peak_rss_ours_over_theirs"] < 1.25  # same model, same engine
    assert all(math.isfinite(ratios[k]) and ratios[k] > 0 for k in RATIOS)
    for key in ("decode_tok_s_ours_over_theirs", "prefill_latency_theirs_over_ours"):
        paired = result["paired"][key]
        assert paired["rounds"] == 3 and paired["low"] <= paired["ratio"] <= paired["high"]
    assert json.loads((bundle / "report.json").read_text())["bench"] == result
    assert "decode tokens/s" in err and "cache bytes/token" in err


def test_bench_auto_engine_is_genai_for_builder_bundles(tiny_bundle, tmp_path, capsys):  # noqa: F811
    from qcompile.runtimes.bench import bench

    result = bench(tiny_bundle, runs=1, prompt_tokens=8, new_tokens=4)
    assert result["engine"] == "genai" and "ratios" not in result
    assert set(result["bundles"]) == {"ours"}
    assert result["bundles"]["ours"]["cache_bytes_per_token"] == TINY_CACHE_BYTES_PER_TOKEN


def test_bench_prompt_is_fixed(tiny_bundle):  # noqa: F811
    first = bench_prompt(tiny_bundle, 40)
    assert len(first) == 40 and first == bench_prompt(tiny_bundle, 40)


def test_bench_bad_input_exits_2(tiny_bundle, tmp_path, capsys):  # noqa: F811
    code, err = _cli(capsys, "bench", str(tiny_bundle), "--prompt-tokens", "200",
                     "--new-tokens", "100")
    assert code == 2 and "exceeds the context length 256" in err
    other = shutil.copytree(tiny_bundle, tmp_path / "other")
    config = json.loads((other / "genai_config.json").read_text())
    config["model"]["vocab_size"] = 256
    (other / "genai_config.json").write_text(json.dumps(config))
    code, err = _cli(capsys, "bench", str(tiny_bundle), "--vs", str(other))
    assert code == 2 and "different vocabularies" in err
    (other / "model.onnx").unlink()
    code, err = _cli(capsys, "bench", str(tiny_bundle), "--vs", str(other))
    assert code == 2 and "has no model.onnx" in err


@pytest.mark.parametrize("engine", ["ort", "genai"])
def test_bench_worker_reports_engine_errors(tmp_path, engine):
    from qcompile.errors import QcompileError
    from qcompile.runtimes.bench import BenchWorker

    with pytest.raises(QcompileError, match="no such bundle directory|cannot run"):
        BenchWorker(tmp_path / "missing", engine, 0, [1, 2], 2)
