"""Graph passes, one per file, each registered by name on import (see ``qcompile.pass_infra``)."""

from __future__ import annotations

from qcompile.passes import pack_weights, quantize_kv_cache, quantize_weights_rtn  # noqa: F401
from qcompile.passes import awq, gptq  # noqa: F401  (after the RTN pass they build on)
from qcompile.passes import adadim  # noqa: F401  (after gptq, whose options it extends)
from qcompile.passes import flexround  # noqa: F401

__all__ = ["adadim", "awq", "gptq", "pack_weights", "quantize_kv_cache", "quantize_weights_rtn"]
