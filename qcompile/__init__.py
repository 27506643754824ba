"""qcompile: a quantizing export compiler for large language models.

Importing the package is cheap: it loads neither torch nor onnx, so the runtimes, the bundle
module and ``bench``'s worker processes stay light. The ``qcompile::`` torch ops register when
:mod:`qcompile.ops` is imported (the passes and lowerings that use them import it), and the
passes when :mod:`qcompile.passes` is.
"""

from __future__ import annotations

from qcompile.errors import QcompileError

__all__ = ["QcompileError", "__version__"]
__version__ = "0.1.0"
