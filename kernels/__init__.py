"""Kernels (installed as rnp_fast.kernels).

The package imports without Triton. ``masked_batch_norm`` (from ``.ops``, imported on first use)
is the fused masked-BatchNorm operator: PyTorch on the CPU, the Triton kernels of ``.masked_bn``
on CUDA, where it needs Triton (check ``triton_available()`` first). The pure-PyTorch reference
is always available.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any

from .reference import masked_batch_norm_reference

__all__ = ["masked_batch_norm", "masked_batch_norm_reference", "triton_available"]

# attribute -> submodule; imported on first use, so `import rnp_fast.kernels` registers no operator
_LAZY = {"masked_batch_norm": ".ops"}


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
    # PEP 562: import the submodule only when one of its names is asked for.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
