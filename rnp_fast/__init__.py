"""rnp_fast: a fast, faithful implementation of Reconstructive Neuron Pruning (ICML 2023).

The Python API (`api`): ``rnp_fast.defend(model, defense=..., mean=..., std=...)`` defends any
PyTorch model with BatchNorm2d layers; ``learn_masks`` and ``prune_model`` run one stage each;
``RNPConfig``, ``DataConfig`` and ``EngineConfig`` are the CLI's settings, ``Goal`` what its verdict
calls a success.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Where each public name lives. Imported on first use (PEP 562), so that `import rnp_fast` and the
# CLI's start do not pay for torch before they need it.
PUBLIC = {
    "DefenseResult": "rnp_fast.api",
    "ScoredStep": "rnp_fast.api",
    "Step": "rnp_fast.api",  # ScoredStep's name in 0.1.0
    "defend": "rnp_fast.api",
    "learn_masks": "rnp_fast.api",
    "prune_model": "rnp_fast.api",
    "DataConfig": "rnp_fast.config",
    "EngineConfig": "rnp_fast.config",
    "RNPConfig": "rnp_fast.config",
    "Goal": "rnp_fast.config",
}

__all__ = ["__version__", *PUBLIC]


def __getattr__(name: str):
    if name in PUBLIC:
        return getattr(importlib.import_module(PUBLIC[name]), name)
    raise AttributeError(f"module 'rnp_fast' has no attribute {name!r}")
