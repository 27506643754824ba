"""``verify``: which parity ladder a bundle gets, whole-model or block-wise.

The whole-model ladder (:mod:`qcompile.runtimes.ladder`) checks every stage, each pass's
included, and names the first diverging layer; it holds the float model, its capture and a
copy per pass stage. Where that would not fit in the memory available (a 1B model needs ~25 GB)
the block-wise ladder (:mod:`qcompile.runtimes.blockwise_ladder`) checks the bundle against
its last torch stage block by block, holding about twice the bundle. ``--ladder auto`` picks
the whole ladder whenever its estimate fits in 80 % of the available memory.
"""

from __future__ import annotations

import pathlib

from qcompile.bundle import read_report, update_report
from qcompile.bundle_size import source_elements
from qcompile.errors import QcompileError
from qcompile.memory import return_freed_memory
from qcompile.recipes import recipe_of_report

__all__ = ["LADDERS", "choose_ladder", "verify", "whole_ladder_bytes"]

LADDERS = ("auto", "whole", "blockwise")
#: share of the available memory the whole ladder may plan to use
_HEADROOM = 0.8


def whole_ladder_bytes(report: dict, source: str | None) -> int | None:
    """About what the whole ladder holds: the float32 model, its capture and one copy per
    pass stage (None: the source's size is unknown)."""
    elements = source_elements(source or report["source"]["path"])
    if elements is None:
        return None
    copies = 3 + len(recipe_of_report(report).steps)
    return int(sum(elements) * 4 * copies)


def _available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _stream_refusal(report: dict, source: str | None) -> str | None:
    """Why the bundle's torch reference cannot be rebuilt streamed (None: it can)."""
    from qcompile.streaming import plan_stream
    from qcompile.targets import get_target

    plan = plan_stream(source or report["source"]["path"], recipe_of_report(report),
                       get_target(report["target"]["name"]))
    return plan.reason


def choose_ladder(report: dict, source: str | None, requested: str) -> tuple[str, str]:
    """``(ladder, why)`` for ``requested`` (one of :data:`LADDERS`)."""
    if requested not in LADDERS:
        raise QcompileError(f"unknown ladder {requested!r}", f"use one of {', '.join(LADDERS)}")
    if requested != "auto":
        return requested, "asked for"
    need, available = whole_ladder_bytes(report, source), _available_bytes()
    if need is None or need <= _HEADROOM * available:
        return "whole", "fits in memory"
    refusal = _stream_refusal(report, source)
    if refusal:
        return "whole", (f"the whole ladder would hold ~{need / 1e9:.1f} GB, more than is "
                         f"available, but the block-wise ladder cannot stream this bundle's "
                         f"reference: {refusal}")
    return "blockwise", (f"the whole ladder would hold ~{need / 1e9:.1f} GB, "
                         f"{available / 1e9:.1f} GB available")


def verify(bundle, source: str | None = None, ladder: str = "auto") -> dict:
    """Run the ladder ``choose_ladder`` picks on ``bundle``; the summary says which and why."""
    return_freed_memory()  # large tensors freed go back to the system (qcompile.memory)
    bundle = pathlib.Path(bundle)
    report = read_report(bundle)
    chosen, why = choose_ladder(report, source, ladder)
    if chosen == "blockwise":
        from qcompile.runtimes.blockwise_ladder import verify_blockwise

        summary = verify_blockwise(bundle, report, source)
    else:
        from qcompile.runtimes.ladder import verify_bundle

        summary = verify_bundle(bundle, source)
    summary["ladder"] = {"kind": chosen, "why": why}
    update_report(bundle, "parity", summary)
    return summary
