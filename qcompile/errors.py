"""User-facing errors: each names what is wrong and how to fix it.

The CLI turns a :class:`QcompileError` into a one-paragraph message and exit status 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["QcompileError"]


class QcompileError(Exception):
    """Bad input or an unsupported request, with the fix in ``hint``."""

    def __init__(self, problem: str, hint: str = ""):
        super().__init__(problem)
        self.problem = problem
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.problem}\n  fix: {self.hint}" if self.hint else self.problem
