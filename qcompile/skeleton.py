"""A weightless model of a safetensors checkpoint, for the streamed compile.

The model class is built with its parameters on the meta device (accelerate's
``init_empty_weights``; buffers such as rotary frequencies are computed for real, they are
small), then every matrix becomes a fake tensor whose producer reads that one tensor from its
shard and converts it to float32 (:class:`~qcompile.lazy_weights.LazyWeights`), and every vector
(norm weights, biases: a few MB even at 8B) is read now. Capture, the passes and the ONNX
export then run on shapes alone; a weight is read when the bundle writes it.
"""

from __future__ import annotations

import pathlib

import torch

from qcompile.checkpoint import TensorEntry, check_checkpoint
from qcompile.errors import QcompileError
from qcompile.lazy_weights import LazyWeights
from qcompile.models import LoadedModel, checked_directory_config, load_tokenizer

__all__ = ["load_skeleton"]


def _reader(entry: TensorEntry, name: str):
    def read() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(entry.file), "pt") as file:
            return file.get_tensor(name).to(torch.float32)

    return read


def _parameter(name: str, shape, tensors: dict[str, TensorEntry], weights: LazyWeights,
               directory: pathlib.Path) -> torch.nn.Parameter:
    entry = tensors.get(name)
    if entry is None:
        raise QcompileError(
            f"the streamed compile found no tensor {name} in {directory}'s safetensors files",
            "the checkpoint uses other tensor names than its model class: compile it with "
            "--stream never (loads the whole model)")
    if entry.shape != tuple(shape):
        raise QcompileError(f"weight {name} has shape {list(entry.shape)}, the model class "
                            f"expects {list(shape)}", "use the config.json saved with these "
                            "weights")
    read = _reader(entry, name)
    if len(shape) < 2:
        return torch.nn.Parameter(read(), requires_grad=False)
    # registered as the Parameter itself: wrapping makes a new tensor object
    return weights.add(torch.nn.Parameter(weights.fake(shape), requires_grad=False), read)


def load_skeleton(directory: pathlib.Path, weights: LazyWeights, source: str,
                  kind: str) -> LoadedModel:
    """The checkpoint in ``directory`` as a float32 eval-mode model of fake matrices."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict, model_type = checked_directory_config(directory)
    tensors = check_checkpoint(directory, config_dict)
    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # a tied head becomes the embedding's parameter object, as when loaded
    made: dict[int, torch.nn.Parameter] = {}
    for name, meta in list(model.named_parameters(remove_duplicate=False)):
        if id(meta) not in made:  # a tied head is the embedding's parameter object
            made[id(meta)] = _parameter(name, meta.shape, tensors, weights, directory)
        owner, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attribute, made[id(meta)])
    tokenizer = load_tokenizer(str(directory), None)
    return LoadedModel(model.eval(), tokenizer, source, kind, model_type)
