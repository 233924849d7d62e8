"""posbias.solvers: UTP layer-wise retention schedules as HiGHS mixed-integer programs.

Public names load lazily (highspy is imported on first use).
"""

from __future__ import annotations

from posbias._lazy import lazy_getattr

__all__ = ["UTPSolver", "retention_budget", "ranking_metric", "simulate_loss", "solve_store", "solve_milp"]

_LAZY = {
    "UTPSolver": "posbias.solvers.utp",
    "retention_budget": "posbias.solvers.utp",
    "ranking_metric": "posbias.solvers.utp",
    "simulate_loss": "posbias.solvers.utp",
    "solve_store": "posbias.solvers.store",
    "solve_milp": "posbias.solvers.milp",
}

__getattr__ = lazy_getattr(__name__, _LAZY)
