"""posbias.solvers: UTP layer-wise retention schedules as HiGHS mixed-integer programs.

Public names load lazily (highspy is imported on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["UTPSolver", "retention_budget", "ranking_metric", "simulate_loss", "solve_store", "solve_milp"]

_LAZY = {
    "UTPSolver": "posbias.solvers.utp",
    "retention_budget": "posbias.solvers.utp",
    "ranking_metric": "posbias.solvers.utp",
    "simulate_loss": "posbias.solvers.utp",
    "solve_store": "posbias.solvers.store",
    "solve_milp": "posbias.solvers.milp",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'posbias.solvers' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
