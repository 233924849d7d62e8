"""A thin wrapper around HiGHS (highspy) for the 0/1 programs of the UTP solvers.

The models are built as sparse matrices (scipy CSR) and passed to HiGHS in one call; this module turns
HiGHS's status codes into plain strings and never returns a solution HiGHS did not report as feasible.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["MilpResult", "solve_milp"]


@dataclass(frozen=True)
class MilpResult:
    """Outcome of one HiGHS solve.

    Attributes
    ----------
    status : str
        ``"optimal"``, ``"time_limit"``, ``"infeasible"``, or HiGHS's own status text for anything else.
    objective : float
        Objective of the returned solution (NaN without one).
    gap : float
        Relative MIP gap HiGHS reports (0 when proven optimal; inf or NaN without a bound).
    x : np.ndarray or None
        (n,) float64 column values of HiGHS's best feasible solution, or None when there is none.
    seconds : float
        Wall time of ``Highs.run`` (model building excluded).
    """

    status: str
    objective: float
    gap: float
    x: np.ndarray | None
    seconds: float



#: whether this process has built its first Highs (the one that prints the banner)
_BANNER_SHOWN = False


def _new_highs() -> Any:
    """A ``highspy.Highs`` instance without the copyright banner that highspy >= 1.16 prints to the process's
    standard output (file descriptor 1, below Python's ``sys.stdout``) when the first one is constructed."""
    import highspy

    global _BANNER_SHOWN
    if _BANNER_SHOWN:  # printed once per process: later instances need no redirect
        return highspy.Highs()
    _BANNER_SHOWN = True
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no usable stdout: nothing to protect
        return highspy.Highs()
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            return highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def solve_milp(
    cost: np.ndarray,
    matrix: sp.spmatrix,
    row_lower: np.ndarray,
    row_upper: np.ndarray,
    col_lower: np.ndarray,
    col_upper: np.ndarray,
    integer: np.ndarray,
    *,
    offset: float = 0.0,
    time_limit: float = 60.0,
    mip_rel_gap: float = 0.0,
    threads: int | None = None,
    options: dict[str, Any] | None = None,
    start: np.ndarray | None = None,
) -> MilpResult:
    """Minimise ``cost @ x + offset`` s.t. ``row_lower <= matrix @ x <= row_upper``, column bounds, integrality.

    Parameters
    ----------
    cost : np.ndarray
        (n,) float64 objective coefficients.
    matrix : scipy.sparse matrix
        (m, n) constraint matrix.
    row_lower, row_upper : np.ndarray
        (m,) float64 row bounds (``-inf``/``inf`` for one-sided rows).
    col_lower, col_upper : np.ndarray
        (n,) float64 column bounds.
    integer : np.ndarray
        (n,) bool, True for integer columns.
    offset : float
        Constant added to the objective.
    time_limit : float
        Seconds HiGHS may run before it stops with its incumbent.
    mip_rel_gap : float
        Relative gap at which HiGHS stops; 0 asks for a proof of optimality.
    threads : int or None
        HiGHS thread count (None: HiGHS default).
    options : dict or None
        Further HiGHS options by name (e.g. ``{"presolve": "off"}``).
    start : np.ndarray or None
        (n,) float64 feasible solution handed to HiGHS as its first incumbent (a MIP start); HiGHS
        checks it and ignores it when infeasible.

    Returns
    -------
    MilpResult
    """
    import highspy

    n = int(cost.shape[0])
    csc = sp.csc_matrix(matrix)
    lp = highspy.HighsLp()
    lp.num_col_ = n
    lp.num_row_ = int(csc.shape[0])
    lp.col_cost_ = np.asarray(cost, dtype=np.float64)
    lp.col_lower_ = np.asarray(col_lower, dtype=np.float64)
    lp.col_upper_ = np.asarray(col_upper, dtype=np.float64)
    lp.row_lower_ = np.asarray(row_lower, dtype=np.float64)
    lp.row_upper_ = np.asarray(row_upper, dtype=np.float64)
    lp.offset_ = float(offset)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = csc.indptr.astype(np.int32)
    lp.a_matrix_.index_ = csc.indices.astype(np.int32)
    lp.a_matrix_.value_ = csc.data.astype(np.float64)
    if np.any(integer):
        lp.integrality_ = [
            highspy.HighsVarType.kInteger if flag else highspy.HighsVarType.kContinuous for flag in integer
        ]

    h = _new_highs()
    h.silent()
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("mip_rel_gap", float(mip_rel_gap))
    h.setOptionValue("mip_abs_gap", 1e-12)
    if threads is not None:
        h.setOptionValue("threads", int(threads))
    for key, value in (options or {}).items():
        h.setOptionValue(key, value)
    h.passModel(lp)
    if start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = np.asarray(start, dtype=np.float64).tolist()  # (n,)
        sol.value_valid = True
        h.setSolution(sol)
    t0 = time.perf_counter()
    h.run()
    seconds = time.perf_counter() - t0

    model_status = h.getModelStatus()
    info = h.getInfo()
    status_map = {
        highspy.HighsModelStatus.kOptimal: "optimal",
        highspy.HighsModelStatus.kTimeLimit: "time_limit",
        highspy.HighsModelStatus.kInfeasible: "infeasible",
    }
    status = status_map.get(model_status, h.modelStatusToString(model_status))
    has_solution = int(info.primal_solution_status) == 2  # kSolutionStatusFeasible
    x = np.asarray(h.getSolution().col_value, dtype=np.float64) if has_solution else None  # (n,)
    objective = float(h.getObjectiveValue()) if has_solution else float("nan")
    gap = float(info.mip_gap) if np.any(integer) else 0.0
    if status == "optimal":
        gap = max(0.0, gap) if np.isfinite(gap) else 0.0
    return MilpResult(status=status, objective=objective, gap=gap, x=x, seconds=seconds)
