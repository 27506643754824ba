"""The own ONNX Runtime generation loop against onnxruntime-genai and a cache-free recompute.

The bundle is the model builder's fp32 export of a tiny random Llama (hidden 64, 2 layers, GQA)
with a 128-token byte-level tokenizer, so text works on both engines. Its weights are drawn
with a large init range so greedy decoding does not collapse into one repeated token (a loop
that fed the wrong cache would then still agree). A hand-built graph with a uint8 cache plus
float scales checks the ``past_key_values.X <- present.X`` rule on a quantized-cache layout.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from qcompile.errors import QcompileError
from qcompile.runtimes.generation import (
    OrtGenerator,
    Sampling,
    bundle_cache_bytes_per_token,
)

#: one worker builds this module's shared bundles (pytest-xdist would build them in each)
pytestmark = pytest.mark.xdist_group("test_generation")

PROMPT = [1, 40, 71, 78, 78, 81, 12, 89]
# 2 layers x (key + value) x 2 kv heads x head size 16 x 4 bytes (fp32)
TINY_CACHE_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4


def save_tiny_tokenizer(directory: pathlib.Path) -> None:
    """A 128-token byte-level BPE tokenizer that genai's tokenizer also reads.

    Every token decodes to ASCII (printable characters, and " a" ... " z" style pieces that
    encoding never produces without merges), so random ids still decode to the same text with
    both engines' detokenizers (invalid UTF-8 is rendered differently by the two).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "Ġ": 3}
    for code in range(33, 127):
        vocab[chr(code)] = len(vocab)
    for piece in [f"Ġ{c}" for c in "abcdefghijklmnopqrstuvwxyzTAIW"]:
        vocab[piece] = len(vocab)
    assert len(vocab) == 128
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def build_tiny_bundle(root: pathlib.Path) -> pathlib.Path:
    import torch
    from conftest import _configs
    from transformers import AutoModelForCausalLM

    source, bundle = root / "hf", root / "bundle"
    config = _configs()["llama"]
    config.initializer_range = 1.0
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    save_tiny_tokenizer(source)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source),
                    "-o", str(bundle), "-p", "fp32", "-e", "cpu", "-c", str(root / "cache")],
                   check=True, capture_output=True, timeout=300)
    return bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> pathlib.Path:
    """The builder's fp32 bundle of a tiny Llama (made once per session)."""
    return build_tiny_bundle(tmp_path_factory.mktemp("gen"))


@pytest.fixture(scope="session")
def generator(tiny_bundle) -> OrtGenerator:
    return OrtGenerator(tiny_bundle)


def test_greedy_matches_onnxruntime_genai(tiny_bundle, generator):
    from qcompile.runtimes.genai_session import GenaiSession

    ours = generator.generate(PROMPT, 24)
    theirs = GenaiSession(tiny_bundle).generate(PROMPT, 24)
    assert ours == theirs
    assert len(ours) >= 8 and len(set(ours)) >= 4  # a real sequence, not one repeated id


def test_without_stop_at_eos_an_end_token_changes_nothing_after_it(generator):
    """Parity compares free-running tokens with a reference that knows nothing of EOS: after
    an end token, the loop must keep choosing by the logits, not feed padding."""
    tokens, logits = generator.generate(PROMPT, 8, stop_at_eos=False, return_logits=True)
    saved = generator.eos_token_ids
    generator.eos_token_ids = {tokens[1]}  # the second token now ends the sequence
    try:
        again = generator.generate(PROMPT, 8, stop_at_eos=False)
        stopped = generator.generate(PROMPT, 8)
    finally:
        generator.eos_token_ids = saved
    assert again == tokens == [int(np.argmax(row)) for row in logits]
    assert stopped == tokens[:tokens.index(tokens[1]) + 1]


def test_greedy_matches_recompute_without_cache(generator):
    tokens, step_logits = generator.generate(PROMPT, 16, stop_at_eos=False, return_logits=True)
    sequence = list(PROMPT)
    for step, token in enumerate(tokens):
        full = generator.forward_full(sequence)[0, -1]
        assert int(np.argmax(full)) == token, f"step {step}"
        np.testing.assert_allclose(step_logits[step], full, rtol=1e-4, atol=1e-4)
        sequence.append(token)


def test_batch_rows_decode_like_single_prompts(generator):
    other = [1, 60, 61, 62, 63, 64, 65, 66]
    rows = [step.tokens for step in generator.steps([PROMPT, other], 6, stop_at_eos=False)]
    batch = np.stack(rows, axis=1)
    assert list(batch[0]) == generator.generate(PROMPT, 6, stop_at_eos=False)
    assert list(batch[1]) == generator.generate(other, 6, stop_at_eos=False)


def test_sampling_is_seeded_and_differs_from_greedy(generator):
    greedy = generator.generate(PROMPT, 16, stop_at_eos=False)
    hot = Sampling(greedy=False, temperature=5.0, seed=7)
    first = generator.generate(PROMPT, 16, Sampling(**vars(hot)), stop_at_eos=False)
    again = generator.generate(PROMPT, 16, Sampling(**vars(hot)), stop_at_eos=False)
    other_seed = generator.generate(PROMPT, 16, Sampling(False, 5.0, seed=8), stop_at_eos=False)
    assert first == again
    assert first != greedy and first != other_seed
    # top_k=1 and a tiny top_p leave only the argmax
    assert generator.generate(PROMPT, 8, Sampling(False, 5.0, top_k=1, seed=1),
                              stop_at_eos=False) == greedy[:8]
    assert generator.generate(PROMPT, 8, Sampling(False, 1.0, top_p=1e-6, seed=1),
                              stop_at_eos=False) == greedy[:8]


def test_genai_sampling_is_seeded(tiny_bundle):
    from qcompile.runtimes.genai_session import GenaiSession

    session = GenaiSession(tiny_bundle)
    hot = dict(greedy=False, temperature=5.0, seed=3)
    first = session.generate(PROMPT, 12, Sampling(**hot), stop_at_eos=False)
    assert first == session.generate(PROMPT, 12, Sampling(**hot), stop_at_eos=False)
    assert len(first) == 12 and first != session.generate(PROMPT, 12, stop_at_eos=False)


def test_score_continuation_equals_full_forward(generator):
    context, continuation = PROMPT, [50, 51, 7, 90, 3, 3, 120]
    scores = generator.score_continuation(context, continuation)
    logits = generator.forward_full(context + continuation)[0].astype(np.float64)
    peak = logits.max(-1, keepdims=True)
    logprobs = logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))
    expected = [logprobs[len(context) - 1 + i, t] for i, t in enumerate(continuation)]
    np.testing.assert_allclose(scores, expected, atol=1e-4)


def test_stops_at_eos(tiny_bundle, tmp_path, generator):
    greedy = generator.generate(PROMPT, 10, stop_at_eos=False)
    bundle = _copy(tiny_bundle, tmp_path)
    unused = next(i for i in range(128) if i not in greedy)
    _edit_config(bundle, lambda c: c["model"].update(eos_token_id=[unused, greedy[3]]))
    assert OrtGenerator(bundle).generate(PROMPT, 10) == greedy[: greedy.index(greedy[3]) + 1]


def test_cache_bytes_per_token(tiny_bundle, generator):
    assert generator.cache_bytes_per_token() == TINY_CACHE_BYTES_PER_TOKEN
    assert bundle_cache_bytes_per_token(tiny_bundle) == TINY_CACHE_BYTES_PER_TOKEN


# --------------------------------------------------------------------------- bad input


def _copy(bundle: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(bundle, tmp_path / "bundle"))


def _edit_config(bundle: pathlib.Path, edit) -> None:
    path = bundle / "genai_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_empty_and_too_long_prompts(generator):
    with pytest.raises(QcompileError, match="the prompt is empty"):
        generator.generate([], 4)
    with pytest.raises(QcompileError, match=r"250 tokens \+ 10 new tokens = 260 exceeds the "
                                            r"model's context length of 256"):
        generator.generate([5] * 250, 10)
    with pytest.raises(QcompileError, match="context length of 256"):
        generator.score_continuation([5] * 250, [6] * 7)


@pytest.mark.parametrize("missing", ["model.onnx", "genai_config.json", "tokenizer.json"])
def test_missing_bundle_file(tiny_bundle, tmp_path, missing):
    bundle = _copy(tiny_bundle, tmp_path)
    (bundle / missing).unlink()
    with pytest.raises(QcompileError, match=f"has no {missing}"):
        OrtGenerator(bundle)


@pytest.mark.parametrize("field,value,message", [
    ("num_hidden_layers", 3, "num_hidden_layers is 3, the graph has 2"),
    ("num_key_value_heads", 4, "num_key_value_heads is 4, the graph's past_key_values.0.key "
                               "has 2"),
    ("head_size", 32, "model.decoder.head_size 32 failed"),
    ("inputs.input_ids", "tokens", "inputs.input_ids names 'tokens', which is not a graph input"),
    ("outputs.logits", "scores", "outputs.logits names 'scores', which is not a graph output"),
])
def test_config_that_does_not_match_the_graph(tiny_bundle, tmp_path, field, value, message):
    bundle = _copy(tiny_bundle, tmp_path)

    def edit(config):
        decoder, (*path, key) = config["model"]["decoder"], field.split(".")
        for part in path:
            decoder = decoder[part]
        decoder[key] = value

    _edit_config(bundle, edit)
    with pytest.raises(QcompileError, match=message):
        OrtGenerator(bundle)


def test_bad_sampling_options():
    with pytest.raises(QcompileError, match="temperature must be > 0"):
        Sampling(greedy=False, temperature=0)
    with pytest.raises(QcompileError, match="top_p must be in"):
        Sampling(greedy=False, top_p=1.5)


# --------------------------------------------------------------------------- quantized cache


def build_uint8_cache_bundle(directory: pathlib.Path, vocab: int = 16) -> pathlib.Path:
    """A toy decoder whose cache is uint8 codes plus float scales (two cache tensors per key).

    Its next token is (sum of every token seen so far) mod ``vocab``, read back from the
    cache, so it only decodes correctly if each present is fed back as the matching past.
    """
    import onnx
    from onnx import TensorProto, helper

    ints = lambda name, values: helper.make_tensor(name, TensorProto.INT64, [len(values)],
                                                   values)
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_u8"], to=TensorProto.UINT8),
        helper.make_node("Unsqueeze", ["ids_u8", "axes_1_3"], ["ids_4d"]),  # [b,1,s,1]
        helper.make_node("Concat", ["ids_4d", "ids_4d"], ["new_key"], axis=3),  # [b,1,s,2]
        helper.make_node("Concat", ["past_key_values.0.key", "new_key"],
                         ["present.0.key"], axis=2),
        helper.make_node("Cast", ["ids_4d"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ids_f", "zero_f"], ["zeros_f"]),
        helper.make_node("Add", ["zeros_f", "one_f"], ["new_scale"]),  # [b,1,s,1] of 1.0
        helper.make_node("Concat", ["past_key_values.0.key_scale", "new_scale"],
                         ["present.0.key_scale"], axis=2),
        helper.make_node("Cast", ["present.0.key"], ["key_i64"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["key_i64", "axes_1_2_3"], ["twice_sum"], keepdims=0),
        helper.make_node("Div", ["twice_sum", "two"], ["sum"]),
        helper.make_node("Mod", ["sum", "vocab"], ["next"]),  # [b]
        helper.make_node("OneHot", ["next", "vocab", "one_hot_values"], ["hot"], axis=-1),
        helper.make_node("Unsqueeze", ["hot", "axes_1"], ["hot_3d"]),  # [b,1,V]
        helper.make_node("Cast", ["input_ids"], ["ids_logit"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["ids_logit", "axes_2"], ["ids_logit_3d"]),
        helper.make_node("Mul", ["ids_logit_3d", "zero_f"], ["zeros_bs1"]),
        helper.make_node("Add", ["zeros_bs1", "hot_3d"], ["logits"]),  # [b,s,V]
    ]
    inits = [ints("axes_1_3", [1, 3]), ints("axes_1_2_3", [1, 2, 3]), ints("axes_1", [1]),
             ints("axes_2", [2]),
             helper.make_tensor("two", TensorProto.INT64, [], [2]),
             helper.make_tensor("vocab", TensorProto.INT64, [], [vocab]),
             helper.make_tensor("zero_f", TensorProto.FLOAT, [], [0.0]),
             helper.make_tensor("one_f", TensorProto.FLOAT, [], [1.0]),
             helper.make_tensor("one_hot_values", TensorProto.FLOAT, [2], [0.0, 1.0])]
    io = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "uint8_cache", [
            io("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            io("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
            io("past_key_values.0.key", TensorProto.UINT8,
               ["batch_size", 1, "past_sequence_length", 2]),
            io("past_key_values.0.key_scale", TensorProto.FLOAT,
               ["batch_size", 1, "past_sequence_length", 1]),
        ], [
            io("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab]),
            io("present.0.key", TensorProto.UINT8,
               ["batch_size", 1, "total_sequence_length", 2]),
            io("present.0.key_scale", TensorProto.FLOAT,
               ["batch_size", 1, "total_sequence_length", 1]),
        ], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / "model.onnx"))
    config = {"model": {"context_length": 64, "eos_token_id": [99], "vocab_size": vocab,
                        "decoder": {"filename": "model.onnx", "head_size": 2,
                                    "num_hidden_layers": 1, "num_key_value_heads": 1,
                                    "inputs": {"input_ids": "input_ids",
                                               "attention_mask": "attention_mask",
                                               "past_key_names": "past_key_values.%d.key"},
                                    "outputs": {"logits": "logits",
                                                "present_key_names": "present.%d.key"}}}}
    (directory / "genai_config.json").write_text(json.dumps(config))
    return directory


def test_quantized_cache_is_fed_back_by_name(tmp_path):
    from qcompile.runtimes.genai_session import choose_engine, genai_can_run

    bundle = build_uint8_cache_bundle(tmp_path / "q")
    generator = OrtGenerator(bundle, require_tokenizer=False)
    prompt, tokens, seen = [3, 5, 7], [], [3, 5, 7]
    for _ in range(8):
        tokens.append(sum(seen) % 16)
        seen.append(tokens[-1])
    assert generator.generate(prompt, 8) == tokens
    # uint8 key (2 bytes per position) + float32 scale (4 bytes)
    assert generator.cache_bytes_per_token() == 2 + 4
    assert bundle_cache_bytes_per_token(bundle) == 6
    ok, reason = genai_can_run(bundle)
    assert not ok and "uint8" in reason and "past_key_values.0.key" in reason
    assert choose_engine("auto", [bundle])[0] == "ort"
    with pytest.raises(QcompileError, match="onnxruntime-genai cannot run"):
        choose_engine("genai", [bundle])


def test_genai_can_run_needs_genai_config(tiny_bundle, tmp_path):
    from qcompile.runtimes.genai_session import genai_can_run

    assert genai_can_run(tiny_bundle)[0]
    bundle = _copy(tiny_bundle, tmp_path)
    (bundle / "genai_config.json").unlink()
    assert genai_can_run(bundle) == (False, "the bundle has no genai_config.json")


# --------------------------------------------------------------------------- CLI


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qcompile", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_generate_streams_the_same_text_on_both_engines(tiny_bundle):
    ort_run = run_cli("generate", str(tiny_bundle), "hello world", "--engine", "ort",
                      "--max-new-tokens", "12")
    auto_run = run_cli("generate", str(tiny_bundle), "hello world", "--max-new-tokens", "12")
    assert ort_run.returncode == 0, ort_run.stderr
    assert auto_run.returncode == 0, auto_run.stderr
    assert "engine: ort" in ort_run.stderr and "engine: genai" in auto_run.stderr
    assert "tokens/s" in ort_run.stderr
    assert ort_run.stdout.strip() and ort_run.stdout == auto_run.stdout


def _cli_in_process(capsys, *args) -> tuple[int, str]:
    from qcompile.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["", "--engine", "ort"], "the prompt is empty"),
    (["hello", "--engine", "ort", "--max-new-tokens", "300"], "exceeds the model's context "
                                                               "length of 256"),
    (["hello", "--engine", "genai", "--max-new-tokens", "300"], "context length of 256"),
    (["hello", "--sample", "--temperature", "0"], "temperature must be > 0"),
])
def test_cli_generate_bad_input_exits_2(tiny_bundle, capsys, args, message):
    code, err = _cli_in_process(capsys, "generate", str(tiny_bundle), *args)
    assert code == 2 and message in err and "fix:" in err


def test_cli_generate_missing_tokenizer_exits_2(tiny_bundle, tmp_path, capsys):
    bundle = _copy(tiny_bundle, tmp_path)
    (bundle / "tokenizer.json").unlink()
    code, err = _cli_in_process(capsys, "generate", str(bundle), "hello")
    assert code == 2 and "has no tokenizer.json" in err
