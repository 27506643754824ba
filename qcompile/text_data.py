"""Text for calibration and evaluation, and token windows over it.

The offline default is Python's bundled documentation (``pydoc_data.topics``, ~465 k
characters, 113 k SmolLM2 tokens), split in halves at the *token* level: the first half for
calibration, the second half for evaluation (16 x 512 tokens of it give fp32 SmolLM2 12.05). Users pass their
own text file, or ``hf:NAME[:CONFIG][:SPLIT][:COLUMN]`` for a Hugging Face dataset (needs the
``datasets`` package and a reachable hub).

Two more offline texts of other kinds, never used for calibration, keep a quality figure from
flattering a method tuned on documentation prose (:data:`NAMED_TEXTS`): ``python-code``, the
source of a fixed list of pure-Python standard-library modules, and ``release-notes``, IDLE's
change logs and Python's licence (short itemised English, issue numbers, legal prose). Both
ship with every CPython that ships IDLE; a distribution that strips them gets a clear error.
"""

from __future__ import annotations

import pathlib

import torch

from qcompile.errors import QcompileError

__all__ = ["NAMED_TEXTS", "default_text", "load_text", "token_ids", "token_windows"]

#: standard-library modules whose source is the ``python-code`` text (fixed, so figures repeat)
_CODE_MODULES = ("argparse", "dataclasses", "enum", "functools", "inspect", "pathlib", "shutil",
                 "subprocess", "tarfile", "textwrap", "typing", "zipfile")
#: files of the ``release-notes`` text, relative to the standard library
_NOTES_FILES = ("idlelib/NEWS.txt", "idlelib/NEWS2x.txt", "idlelib/HISTORY.txt",
                "idlelib/README.txt", "LICENSE.txt")


def default_text() -> str:
    """All of Python's pydoc topics, joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


def _stdlib_files(relative: tuple[str, ...], name: str) -> str:
    import sysconfig

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    missing = [r for r in relative if not (root / r).is_file()]
    if missing:
        raise QcompileError(f"the {name} text needs {', '.join(missing)} from the Python "
                            f"standard library at {root}, which this Python lacks",
                            "install the full standard library (IDLE included) or pass a text file")
    return "\n\n".join((root / r).read_text(errors="replace") for r in relative)


def python_code_text() -> str:
    """The source of :data:`_CODE_MODULES`: code, not prose."""
    return _stdlib_files(tuple(f"{m}.py" for m in _CODE_MODULES), "python-code")


def release_notes_text() -> str:
    """IDLE's change logs and Python's licence: itemised notes and legal prose."""
    return _stdlib_files(_NOTES_FILES, "release-notes")


#: offline texts by name, besides ``default``; none is ever used for calibration by default
NAMED_TEXTS = {"python-code": python_code_text, "release-notes": release_notes_text}


def _hf_dataset_text(spec: str) -> str:
    parts = spec.split(":")[1:]
    name, config, split, column = (parts + [None, "test", "text"][len(parts) - 1:])[:4]
    try:
        import datasets
    except ImportError as exc:
        raise QcompileError("hf: text sources need the datasets package",
                            "pip install datasets, or pass a text file") from exc
    try:
        rows = datasets.load_dataset(name, config, split=split)[column]
    except Exception as exc:
        raise QcompileError(f"cannot load dataset {spec}: {exc}",
                            "check the name and column, or pass a local text file") from exc
    return "\n\n".join(r for r in rows if r)


def load_text(source: str | None) -> str:
    """The default text, a named offline text, a file's contents, or a dataset column."""
    if source in (None, "", "default"):
        return default_text()
    if source in NAMED_TEXTS:
        return NAMED_TEXTS[source]()
    if source.startswith("hf:"):
        return _hf_dataset_text(source)
    path = pathlib.Path(source).expanduser()
    if not path.is_file():
        raise QcompileError(f"text file {source} does not exist", "check the path")
    text = path.read_text(errors="replace")
    if not text.strip():
        raise QcompileError(f"text file {source} is empty", "pass a file with text in it")
    return text


def token_ids(tokenizer, source: str | None = None, split: str = "evaluation") -> torch.Tensor:
    """Token ids of ``source``; the default text is cut in half (``split``) at token level."""
    if tokenizer is None:
        raise QcompileError("this model has no tokenizer, so text cannot be tokenized",
                            "save the tokenizer next to the model (save_pretrained)")
    text = load_text(source)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if source in (None, "", "default"):
        half = ids.numel() // 2
        ids = ids[:half] if split == "calibration" else ids[half:]
    return ids


def token_windows(ids: torch.Tensor, length: int = 512, count: int = 16) -> torch.Tensor:
    """``[count, length]`` consecutive, non-overlapping windows from the start of ``ids``."""
    available = ids.numel() // length
    if available == 0:
        raise QcompileError(f"the text has {ids.numel()} tokens, fewer than one window of "
                            f"{length}", "pass a longer text or a smaller --seq-len")
    count = min(count, available)
    return ids[: count * length].reshape(count, length)
