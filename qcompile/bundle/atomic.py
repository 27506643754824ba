"""Writing a bundle atomically: one directory per compile, all or nothing.

Everything is written into a temporary sibling directory ``.NAME.<pid>.XXXXXXXX`` and renamed
into place at the end, so an interrupted or failed compile leaves no half-written bundle. An
existing bundle is replaced only with ``force`` (moved aside to ``.NAME.old`` for the swap).

SIGTERM and SIGINT while a bundle is written raise instead of killing the process, so the
temporary directory is removed (exit status 143 / 130). What a harder kill (SIGKILL, power
loss) leaves behind carries the dead pid in its name; the next compile to the same output
removes it (:func:`remove_stale_temporaries`) and leaves those of live processes alone.

:func:`check_output_path` runs every output check that needs no model, before it loads: an
existing output, a parent that is a file, a path that cannot be created, too little free space
for :func:`qcompile.bundle_size.estimate_bundle_bytes` (a lower bound from the source's
tensor shapes and the recipe).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import signal
import tempfile
import threading

from qcompile.console import console
from qcompile.errors import QcompileError

__all__ = [
    "check_output",
    "check_output_path",
    "check_free_space",
    "remove_stale_temporaries",
    "atomic_directory",
    "directory_bytes",
]

#: characters the temporary sibling adds to the output's name: ``.`` + ``.<pid>.XXXXXXXX``
#: (pids have at most 7 digits: Linux's pid_max is at most 2^22)
TEMPORARY_NAME_EXTRA = 18
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def check_output(out_dir: pathlib.Path, force: bool) -> None:
    """Refuse an existing output path unless ``force`` (checked before any work starts)."""
    if out_dir.exists() and not force:
        raise QcompileError(
            f"output directory {out_dir} already exists",
            "pass --force to replace it, or choose another -o",
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise QcompileError(f"output path {out_dir} is a file", "choose a directory path")


def check_output_path(out_dir: pathlib.Path, force: bool, needed_bytes: int | None) -> None:
    """Every output check that needs no model, so a bad ``-o`` fails in a second instead of
    after the whole compile; first clears what killed compiles to ``out_dir`` left behind."""
    out_dir = pathlib.Path(out_dir)
    remove_stale_temporaries(out_dir)
    check_output(out_dir, force)
    home = _nearest_existing(out_dir.parent)
    _check_creatable(out_dir, home)
    if needed_bytes:
        check_free_space(out_dir, needed_bytes, shutil.disk_usage(home).free)


def _nearest_existing(path: pathlib.Path) -> pathlib.Path:
    """``path`` or its nearest existing ancestor: where the missing directories will be made."""
    return next(p for p in (path, *path.parents) if p.exists())


def _check_creatable(out_dir: pathlib.Path, home: pathlib.Path) -> None:
    """Refuse a parent that is a file, names the filesystem cannot hold, or a ``home`` that
    refuses new directories; probed with a real ``mkdir``, since permission bits say nothing
    to root and a read-only mount, ``/proc`` or ``/sys`` refuse it anyway."""
    if not home.is_dir():
        raise QcompileError(f"cannot create {out_dir}: its parent {home} is a file",
                            "choose an -o whose parents are directories, or move the file")
    _check_name_lengths(out_dir, home)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".qcompile-probe.", dir=home))
    except OSError as exc:
        raise QcompileError(f"cannot create {out_dir}: {home} refuses new directories "
                            f"({exc.strerror})", "choose an -o on a writable disk") from exc


def _check_name_lengths(out_dir: pathlib.Path, home: pathlib.Path) -> None:
    """Refuse directory names over the filesystem's limit (NAME_MAX, usually 255), counting
    the characters the temporary sibling adds to the last one."""
    try:
        limit = os.pathconf(home, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    lengths = [len(part) for part in out_dir.relative_to(home).parts]
    if lengths:  # "-o ." has none; there is nothing to create
        lengths[-1] += TEMPORARY_NAME_EXTRA
    if lengths and max(lengths) > limit:
        raise QcompileError(
            f"cannot create {out_dir}: a name in it is too long for the filesystem "
            f"({limit} characters at most, and the bundle's own name at most "
            f"{limit - TEMPORARY_NAME_EXTRA}, for its temporary sibling)",
            "choose a shorter -o")


def check_free_space(out_dir: pathlib.Path, needed: int, free: int) -> None:
    """Refuse when ``free`` bytes cannot hold the ``needed`` bytes of the size estimate
    (:mod:`qcompile.bundle_size`): better now than a full disk after the whole compile."""
    if free < needed:
        raise QcompileError(
            f"not enough free space for {out_dir}: the bundle needs at least "
            f"{needed / 1e6:,.1f} MB and only {free / 1e6:,.1f} MB are free there",
            "free some space, or choose an -o on another disk")


def _old_path(out_dir: pathlib.Path) -> pathlib.Path:
    return out_dir.with_name(f".{out_dir.name}.old")


def _temporaries(out_dir: pathlib.Path) -> dict[pathlib.Path, bool]:
    """Temporary directories of compiles to ``out_dir``, each with whether its owner lives."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(\d{{1,10}})\.[a-z0-9_]{{8}}")
    try:
        entries = list(out_dir.parent.iterdir())
    except OSError:  # no parent yet (or unreadable): nothing of ours can be there
        return {}
    return {path: _alive(int(match[1])) for path in entries
            if (match := pattern.fullmatch(path.name)) and path.is_dir()}


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(out_dir: pathlib.Path) -> None:
    """Remove what killed compiles to ``out_dir`` left beside it, and say so in one line:
    temporaries of dead pids, and ``.NAME.old`` when no live compile is replacing the bundle
    (moved back to ``out_dir`` if the kill fell between the two renames of a replace)."""
    temporaries = _temporaries(out_dir)
    done = [path.name for path, alive in temporaries.items() if not alive]
    for path, alive in temporaries.items():
        if not alive:
            shutil.rmtree(path, ignore_errors=True)
    old = _old_path(out_dir)
    if old.is_dir() and not any(temporaries.values()):
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            done.append(old.name)
        else:
            os.replace(old, out_dir)
            done.append(f"{old.name} (moved back to {out_dir.name})")
    if done:
        console.print(f"[yellow]removed what interrupted compiles left beside {out_dir}:"
                      f"[/yellow] {', '.join(done)}")


def _raise_for(signum: int) -> None:
    """SIGINT raises KeyboardInterrupt (the CLI exits 130), SIGTERM exits with status 143."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


class _SignalGuard:
    """While a bundle is written, SIGTERM and SIGINT raise in the main thread, so the
    ``finally`` that removes the temporary directory runs (SIGTERM's default kills at once).

    Inside :meth:`holding` (the swap into place, the cleanup) the signal waits until the block
    ends, so neither is left half done; signals after the first are ignored, and the previous
    handlers (an ignored SIGINT of a background job stays ignored) come back on exit.
    """

    def __init__(self):
        self.previous: dict[int, object] = {}
        self.received: int | None = None
        self.raised = False
        self.held = False

    def __enter__(self) -> "_SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if self.received is not None:
            console.print(f"[red]interrupted by {signal.Signals(self.received).name}[/red]: "
                          "no half-written bundle is left")

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
            if not self.held:
                self.raised = True
                _raise_for(signum)

    @contextlib.contextmanager
    def holding(self):
        """Run the block to its end even if a signal arrives; raise for it afterwards."""
        self.held = True
        try:
            yield
        finally:
            self.held = False
        if self.received is not None and not self.raised:
            self.raised = True
            _raise_for(self.received)


def _make_temporary(out_dir: pathlib.Path) -> pathlib.Path:
    """The temporary sibling of ``out_dir``, named with this process's pid (see above)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.", dir=out_dir.parent)
    except OSError as exc:
        raise QcompileError(f"cannot create the bundle beside {out_dir}: {exc}",
                            "choose an -o on a writable disk") from exc
    pathlib.Path(tmp).chmod(0o755)
    return pathlib.Path(tmp)


def _move_into_place(tmp: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing bundle goes aside to ``.NAME.old`` first
    and comes back if the second rename fails."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = _old_path(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out_dir: pathlib.Path, force: bool):
    """Yield a temporary directory that becomes ``out_dir`` only if the block succeeds; on an
    error, SIGTERM or SIGINT it is removed instead."""
    remove_stale_temporaries(out_dir)
    check_output(out_dir, force)
    with _SignalGuard() as guard:
        tmp = None
        try:
            with guard.holding():
                tmp = _make_temporary(out_dir)
            yield tmp
            with guard.holding():
                _move_into_place(tmp, out_dir)
        finally:
            with guard.holding():
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                if out_dir.exists():
                    shutil.rmtree(_old_path(out_dir), ignore_errors=True)


def directory_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
