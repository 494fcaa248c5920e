"""Triton kernels (installed as rnp_fast.kernels).

The package imports without Triton: the pure-PyTorch references are always available, and the
Triton entry points are imported on first use (``rnp_fast.kernels.masked_batch_norm``), which
raises ImportError when Triton is missing. Check ``triton_available()`` first.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any

from .reference import masked_batch_norm_reference

__all__ = ["masked_batch_norm", "masked_batch_norm_reference", "triton_available"]

_LAZY = {"masked_batch_norm": ".masked_bn"}  # attribute -> submodule that needs Triton


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works (it may still need a GPU or TRITON_INTERPRET=1 to run)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def __getattr__(name: str) -> Any:
    # PEP 562: import the Triton module only when one of its names is asked for.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
