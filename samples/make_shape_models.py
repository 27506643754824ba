"""Random-weight models of real shapes, written as users have them: bf16 safetensors, sharded
with an index above 5 GB (Hugging Face's default), tied or untied heads.

    .venv/bin/python samples/make_shape_models.py llama-3.2-1b --out /work/shapes
    .venv/bin/python samples/make_shape_models.py llama-3.1-8b qwen2.5-7b --out /work/shapes
    .venv/bin/python samples/make_shape_models.py llama-3.2-1b --layers 4 --out /tmp/s  # fewer

Tensor names and shapes come from transformers' own model class built on the meta device (no
memory), so every architecture transformers knows gets its real checkpoint layout. Each tensor
is generated and written on its own (a streamed safetensors writer), so memory stays at one
tensor (the largest is the embedding: 1 GB in bf16 for the Llama-3 vocabulary) and an 8B model
takes 16 GB of disk and a few minutes. Weights are N(0, 0.02) like the models' initializers,
norm weights 1, biases 0, each tensor seeded by its name, so a rerun writes the same bytes.

The tokenizer files of the default model (SmolLM2) are copied beside the weights, so
calibration reads real text and onnxruntime-genai's builder finds a tokenizer; its ids are a
subset of every vocabulary below.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import struct
import sys

import torch

#: name -> (model_type, config fields, tied head); the real models' config.json values
SHAPES = {
    "smollm2-360m": ("llama", dict(hidden_size=960, intermediate_size=2560,
                                   num_hidden_layers=32, num_attention_heads=15,
                                   num_key_value_heads=5, vocab_size=49152,
                                   max_position_embeddings=8192, rope_theta=100000.0,
                                   rms_norm_eps=1e-5), True),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192,
                                   num_hidden_layers=16, num_attention_heads=32,
                                   num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                   max_position_embeddings=131072, rope_theta=500000.0,
                                   rms_norm_eps=1e-5), True),
    "llama-3.2-3b": ("llama", dict(hidden_size=3072, intermediate_size=8192,
                                   num_hidden_layers=28, num_attention_heads=24,
                                   num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                   max_position_embeddings=131072, rope_theta=500000.0,
                                   rms_norm_eps=1e-5), True),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                   max_position_embeddings=131072, rope_theta=500000.0,
                                   rms_norm_eps=1e-5), False),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944,
                                 num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, vocab_size=152064,
                                 max_position_embeddings=32768, rope_theta=1000000.0,
                                 rms_norm_eps=1e-6), False),
}
SHARD_BYTES = 5 * 10**9
_DTYPES = {"bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16"),
           "float32": (torch.float32, "F32")}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def shape_config(name: str, layers: int | None, tied: bool | None, dtype: str):
    """The transformers config of shape ``name`` (optionally with fewer layers / another head)."""
    from transformers import AutoConfig

    model_type, fields, default_tied = SHAPES[name]
    fields = dict(fields, tie_word_embeddings=default_tied if tied is None else tied,
                  torch_dtype=dtype)
    if layers is not None:
        fields["num_hidden_layers"] = layers
    return AutoConfig.for_model(model_type, **fields)


def tensor_layout(config) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor of the checkpoint, in the model's order; a tied head
    is stored once, under the embedding's name (as ``save_pretrained`` does)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]  # deduplicates ties
    persistent = {n for n, _ in model.state_dict().items()}
    names += [(n, tuple(b.shape)) for n, b in model.named_buffers() if n in persistent]
    return names


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """N(0, 0.02) matrices, ones for norm weights, zeros for biases; seeded by the name."""
    if len(shape) == 1:
        return (torch.zeros if name.endswith("bias") else torch.ones)(shape, dtype=dtype)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def shards(layout, itemsize: int, shard_bytes: int) -> list[list[tuple[str, tuple]]]:
    """Greedy split of ``layout`` into shards of at most ``shard_bytes`` (one tensor may exceed)."""
    groups, size = [[]], 0
    for name, shape in layout:
        nbytes = itemsize * _count(shape)
        if groups[-1] and size + nbytes > shard_bytes:
            groups, size = groups + [[]], 0
        groups[-1].append((name, shape))
        size += nbytes
    return groups


def _count(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def write_safetensors(path: pathlib.Path, tensors, dtype: torch.dtype, code: str) -> int:
    """Write ``tensors`` (name, shape) one at a time; the header is known from the shapes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        end = offset + itemsize * _count(shape)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape in tensors:
            tensor = random_tensor(name, shape, dtype).contiguous()
            f.write(tensor.view(torch.uint8).numpy().tobytes())
    return offset


def write_model(name: str, out: pathlib.Path, layers: int | None = None,
                tied: bool | None = None, dtype: str = "bfloat16",
                shard_bytes: int = SHARD_BYTES, tokenizer_from: pathlib.Path | None = None
                ) -> pathlib.Path:
    """Write shape ``name`` into ``out``; returns the model directory."""
    config = shape_config(name, layers, tied, dtype)
    return write_checkpoint(config, out, dtype, shard_bytes, tokenizer_from, name)


def write_checkpoint(config, out: pathlib.Path, dtype: str = "bfloat16",
                     shard_bytes: int = SHARD_BYTES, tokenizer_from: pathlib.Path | None = None,
                     name: str = "model") -> pathlib.Path:
    """Write a random-weight checkpoint of the transformers ``config`` into ``out`` (any
    shape: the tests use narrow, few-vocabulary ones); returns the model directory."""
    from transformers import AutoModelForCausalLM

    torch_dtype, code = _DTYPES[dtype]
    out.mkdir(parents=True, exist_ok=True)
    if not config.architectures:  # onnxruntime-genai's builder picks its model class by it
        config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    config.save_pretrained(out)
    layout = tensor_layout(config)
    groups = shards(layout, torch.empty((), dtype=torch_dtype).element_size(), shard_bytes)
    if len(groups) == 1:
        total = write_safetensors(out / "model.safetensors", groups[0], torch_dtype, code)
    else:
        weight_map, total = {}, 0
        for index, group in enumerate(groups, 1):
            file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
            total += write_safetensors(out / file, group, torch_dtype, code)
            weight_map.update({tensor: file for tensor, _ in group})
            print(f"  {file}", flush=True)
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer_from is not None:
        for file in _TOKENIZER_FILES:
            if (tokenizer_from / file).exists():
                shutil.copy(tokenizer_from / file, out / file)
    params = sum(_count(s) for _, s in layout)
    print(f"{name}: {params / 1e9:.2f} B parameters, {total / 1e9:.2f} GB in {len(groups)} "
          f"file(s), {'tied' if config.tie_word_embeddings else 'untied'} head -> {out}")
    return out


def default_tokenizer_directory() -> pathlib.Path:
    """The default model's converted Hugging Face directory (holds its tokenizer files)."""
    from qcompile.models import default_model_path, gguf_as_directory

    return pathlib.Path(gguf_as_directory(default_model_path()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="+", choices=sorted(SHAPES))
    parser.add_argument("--out", type=pathlib.Path, required=True,
                        help="parent directory; each shape goes into OUT/<shape>")
    parser.add_argument("--layers", type=int, help="override num_hidden_layers")
    head = parser.add_mutually_exclusive_group()
    head.add_argument("--tied", dest="tied", action="store_true", default=None)
    head.add_argument("--untied", dest="tied", action="store_false")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--shard-bytes", type=int, default=SHARD_BYTES)
    parser.add_argument("--no-tokenizer", action="store_true")
    args = parser.parse_args(argv)
    tokenizer = None if args.no_tokenizer else default_tokenizer_directory()
    for name in args.shapes:
        suffix = f"-{args.layers}l" if args.layers else ""
        write_model(name, args.out / f"{name}{suffix}", args.layers, args.tied, args.dtype,
                    args.shard_bytes, tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
