"""Progress output on stderr (rich), so stdout stays clean for machine-readable results."""

from __future__ import annotations

import contextlib
import time

from rich.console import Console

__all__ = ["console", "step", "progress_bar"]

console = Console(stderr=True, highlight=False)
if not console.is_terminal:  # logs and CI: wide enough that tables do not wrap
    console.width = 140


@contextlib.contextmanager
def step(message: str, timings: dict | None = None, key: str | None = None):
    """Print ``message``, run the block, then print how long it took (and record it)."""
    console.print(f"[bold]•[/bold] {message} ...")
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    if timings is not None and key:
        timings[key] = round(seconds, 3)
    console.print(f"  [green]done[/green] in {seconds:.1f} s")


def progress_bar(description: str, total: int):
    """A rich progress bar with time left; use as ``with bar: bar.advance(task)``."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("  {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    task = bar.add_task(description, total=total)
    return bar, task
