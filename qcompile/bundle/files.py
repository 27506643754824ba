"""What a bundle directory holds, by name: the one place every writer and reader takes them from.

Torch-free (and onnx-free), so the runtimes, ``bench``'s worker processes and the samples
import it without loading the compiler. A bundle holds one model file, either ONNX
(``model.onnx``, its tensors in ``model.onnx.data``) or ONNX Runtime's own format
(``model.ort``, the ``ort-mobile`` target), plus ``genai_config.json`` (which names the model
file), the tokenizer files and ``report.json``.
"""

from __future__ import annotations

import pathlib

from qcompile.errors import QcompileError

__all__ = [
    "MODEL_FILE",
    "DATA_FILE",
    "ORT_MODEL_FILE",
    "MODEL_FILES",
    "GENAI_CONFIG_FILE",
    "REPORT_FILE",
    "TOKENIZER_FILES",
    "check_bundle_files",
    "model_file",
    "model_bytes",
]

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
#: the ORT-format model (flatbuffers, tensors inside), written by the ``ort-mobile`` target
ORT_MODEL_FILE = "model.ort"
#: the model files a bundle may hold, in the order they are looked for
MODEL_FILES = (MODEL_FILE, ORT_MODEL_FILE)
GENAI_CONFIG_FILE = "genai_config.json"
REPORT_FILE = "report.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def model_file(bundle) -> pathlib.Path:
    """The bundle's model file: ``model.onnx``, else ``model.ort`` (a clear error if neither)."""
    bundle = pathlib.Path(bundle)
    for name in MODEL_FILES:
        if (bundle / name).is_file():
            return bundle / name
    raise QcompileError(f"bundle {bundle} has no {' or '.join(MODEL_FILES)}",
                        "re-create the bundle with `qcompile compile`")


def check_bundle_files(bundle, tokenizer: bool = True) -> pathlib.Path:
    """Refuse a bundle directory that lacks the model, genai_config.json or the tokenizer.

    Args:
        bundle: the bundle directory.
        tokenizer: also require ``tokenizer.json`` and ``tokenizer_config.json``.

    Returns:
        The bundle as a path.
    """
    bundle = pathlib.Path(bundle)
    if not bundle.is_dir():
        raise QcompileError(f"no such bundle directory: {bundle}",
                            "pass a directory written by `qcompile compile` or the model builder")
    model_file(bundle)
    for name in (GENAI_CONFIG_FILE,) + (TOKENIZER_FILES if tokenizer else ()):
        if not (bundle / name).is_file():
            raise QcompileError(f"bundle {bundle} has no {name}",
                                f"re-create the bundle, or copy {name} into it")
    return bundle


def model_bytes(bundle) -> int:
    """Bytes on disk of the model file and its external data files."""
    model = model_file(bundle)
    return sum(p.stat().st_size for p in model.parent.glob(model.name + "*") if p.is_file())
