"""qcompile: a quantizing export compiler for large language models.

Importing the package registers the ``qcompile::`` torch ops; the passes register themselves
when :mod:`qcompile.passes` is imported.
"""

from __future__ import annotations

from qcompile import ops  # noqa: F401  (registers torch.ops.qcompile.*)
from qcompile.errors import QcompileError

__all__ = ["QcompileError", "__version__"]
__version__ = "0.1.0"
