"""Model selection by k-fold cross-validation over samples.

Folds are sets of whole samples (a sample's tokens share its image and question, so splitting tokens would
leak). For each fold the candidate linear models are fitted by count-weighted least squares to the mean
curve of the training samples -- exactly the pooled least-squares fit of all their points -- and scored by
the count-weighted squared error against the mean curve of the held-out samples:

``cv_mse = Σ_j N_j (ȳ_test_j - f(x_j))² / Σ_j N_j``

(the pooled held-out MSE minus the within-position variance, which no model can explain and which is the
same for every candidate, so the ranking is that of the pooled held-out MSE).

Choice rule (default ``"1se"``): take the candidate with the lowest mean CV error, then the simplest
candidate whose mean fold-paired excess error over it is within one standard error of that excess. The
paired SE removes the large fold-to-fold variation that all candidates share. ``"min"`` takes the lowest
mean error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from posbias.errors import PosbiasError
from posbias.fitters.curves import SampleCurves
from posbias.fitters.polynomial import MAX_DEGREE

__all__ = [
    "DEFAULT_FOLDS",
    "RULES",
    "DegreeSelection",
    "make_folds",
    "cv_errors",
    "choose",
    "polynomial_design",
    "select_polynomial_degree",
]

#: default number of folds
DEFAULT_FOLDS: int = 5
#: selection rules
RULES: tuple[str, ...] = ("1se", "min")


def make_folds(n_samples: int, n_folds: int, seed: int) -> np.ndarray:
    """(S,) int64 fold id 0..k-1 of each sample: a seeded permutation cut into near-equal parts."""
    if isinstance(n_folds, bool) or int(n_folds) < 2:
        raise PosbiasError(f"cv_folds={n_folds}: cross-validation needs at least 2 folds")
    if int(n_samples) < int(n_folds):
        raise PosbiasError(
            f"cv_folds={n_folds}: {n_folds}-fold cross-validation needs at least {n_folds} samples, the store has "
            f"{n_samples} usable; pass cv_folds <= {n_samples} or profile more samples"
        )
    rng = np.random.default_rng([int(seed), 7919])
    order = rng.permutation(int(n_samples))  # (S,)
    folds = np.empty(int(n_samples), dtype=np.int64)
    folds[order] = np.arange(int(n_samples)) % int(n_folds)
    return folds


def polynomial_design(x: np.ndarray, degree: int, shift: float, scale: float) -> np.ndarray:
    """(m, degree+1) float64 Vandermonde matrix of ``t = (x - shift) / scale`` (the fitter's basis)."""
    t = (np.asarray(x, dtype=np.float64) - shift) / scale  # (m,)
    return np.vander(t, int(degree) + 1, increasing=True)


def cv_errors(curves: SampleCurves, designs: dict[str, np.ndarray], folds: np.ndarray) -> dict[str, np.ndarray]:
    """Held-out error of each linear model on each fold.

    Parameters
    ----------
    curves : SampleCurves
        (S, m) per-sample sums and counts.
    designs : dict
        Model name -> (m, p) design matrix over the columns of ``curves``.
    folds : np.ndarray
        (S,) fold id of each sample.

    Returns
    -------
    dict
        Model name -> (k,) float64 count-weighted MSE against the held-out mean curve (module docstring).
        A model whose training system is rank-deficient on a fold gets ``inf`` there.
    """
    k = int(folds.max()) + 1
    member = (folds[None, :] == np.arange(k)[:, None]).astype(np.float64)  # (k, S)
    test_means, test_counts = curves.group_means(member)  # (k, m)
    train_means, train_counts = curves.group_means(1.0 - member)  # (k, m)
    out = {name: np.empty(k, dtype=np.float64) for name in designs}
    for f in range(k):
        tr = train_counts[f] > 0  # (m,) bool
        te = test_counts[f] > 0  # (m,) bool
        sw = np.sqrt(train_counts[f, tr])  # (m_tr,)
        ytr = train_means[f, tr] * sw  # (m_tr,)
        for name, design in designs.items():
            a = design[tr] * sw[:, None]  # (m_tr, p)
            coef, _, rank, _ = np.linalg.lstsq(a, ytr, rcond=None)  # (p,)
            if rank < design.shape[1]:
                out[name][f] = np.inf
                continue
            pred = design[te] @ coef  # (m_te,)
            resid = test_means[f, te] - pred  # (m_te,)
            out[name][f] = float(np.sum(test_counts[f, te] * resid**2) / np.sum(test_counts[f, te]))
    return out


def choose(errors: dict[str, np.ndarray], order: list[str], rule: str) -> tuple[str, str, dict[str, float]]:
    """Apply the selection rule.

    Parameters
    ----------
    errors : dict
        Name -> (k,) fold errors.
    order : list of str
        Candidates from simplest to most complex (ties and the 1-SE rule favour the earlier).
    rule : {"1se", "min"}

    Returns
    -------
    chosen : str
    best : str
        Candidate with the lowest mean error.
    paired_se : dict
        Name -> SE of its fold-paired excess error over ``best``.
    """
    if rule not in RULES:
        raise PosbiasError(f"selection rule {rule!r} is not one of {list(RULES)}")
    means = {n: float(np.mean(errors[n])) for n in order}
    best = min(order, key=lambda n: (means[n], order.index(n)))
    k = errors[best].size
    paired_se: dict[str, float] = {}
    for n in order:
        diff = errors[n] - errors[best]  # (k,)
        paired_se[n] = float(np.std(diff, ddof=1) / np.sqrt(k)) if k > 1 and np.all(np.isfinite(diff)) else float("inf")
    if rule == "min":
        return best, best, paired_se
    for n in order:
        if not np.isfinite(means[n]):
            continue
        if means[n] - means[best] <= paired_se[n]:
            return n, best, paired_se
    return best, best, paired_se


@dataclass
class DegreeSelection:
    """Cross-validated choice of the PBC polynomial degree.

    Attributes
    ----------
    degrees : list of int
        Candidates.
    cv_mse, cv_se : list of float
        Mean and standard error over folds of the held-out error, per degree.
    paired_se : list of float
        SE of each degree's fold-paired excess error over the best degree.
    best : int
        Degree with the lowest mean CV error.
    chosen : int
        Degree chosen by ``rule``.
    rule : str
    n_folds, seed : int
    mode : {"auto", "forced"}
        ``"forced"``: the user fixed the degree; the CV table is still reported.
    """

    degrees: list[int]
    cv_mse: list[float]
    cv_se: list[float]
    paired_se: list[float]
    best: int
    chosen: int
    rule: str
    n_folds: int
    seed: int
    mode: str = "auto"
    fold_mse: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (the calibration's ``statistics.pbc_degree``)."""
        fin = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731
        return {
            "mode": self.mode,
            "rule": self.rule,
            "n_folds": int(self.n_folds),
            "seed": int(self.seed),
            "degrees": [int(d) for d in self.degrees],
            "cv_mse": [fin(v) for v in self.cv_mse],
            "cv_se": [fin(v) for v in self.cv_se],
            "paired_se": [fin(v) for v in self.paired_se],
            "best": int(self.best),
            "chosen": int(self.chosen),
        }


def select_polynomial_degree(
    curves: SampleCurves,
    *,
    degrees: tuple[int, ...] | list[int] = tuple(range(1, MAX_DEGREE + 1)),
    n_folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    rule: str = "1se",
    folds: np.ndarray | None = None,
) -> DegreeSelection:
    """Choose the polynomial degree by k-fold cross-validation over samples.

    Parameters
    ----------
    curves : SampleCurves
        Per-sample ΔA values per position (``curves.x`` is the fit's position variable).
    degrees : sequence of int
        Candidate degrees (1..5).
    n_folds : int
        Folds (needs at least that many samples).
    seed : int
        Seed of the fold assignment.
    rule : {"1se", "min"}
        Selection rule (module docstring).
    folds : np.ndarray, optional
        (S,) precomputed fold ids (overrides ``n_folds``/``seed``).

    Returns
    -------
    DegreeSelection
    """
    degs = sorted({int(d) for d in degrees})
    if not degs or degs[0] < 1 or degs[-1] > MAX_DEGREE:
        raise PosbiasError(f"candidate degrees {list(degrees)} must lie in 1..{MAX_DEGREE}")
    n_pos = int(np.unique(curves.x).size)
    degs = [d for d in degs if d < n_pos]
    if not degs:
        raise PosbiasError(f"{n_pos} distinct positions cannot determine a polynomial; profile a model with more visual tokens")
    if folds is None:
        folds = make_folds(curves.n_samples, n_folds, seed)
    k = int(folds.max()) + 1
    lo, hi = float(curves.x.min()), float(curves.x.max())
    shift, scale = 0.5 * (lo + hi), max(0.5 * (hi - lo), 1e-12)
    names = [str(d) for d in degs]
    designs = {str(d): polynomial_design(curves.x, d, shift, scale) for d in degs}
    errs = cv_errors(curves, designs, folds)
    chosen, best, pse = choose(errs, names, rule)
    return DegreeSelection(
        degrees=degs,
        cv_mse=[float(np.mean(errs[n])) for n in names],
        cv_se=[float(np.std(errs[n], ddof=1) / np.sqrt(k)) for n in names],
        paired_se=[pse[n] for n in names],
        best=int(best),
        chosen=int(chosen),
        rule=rule,
        n_folds=k,
        seed=int(seed),
        fold_mse=[[float(v) for v in errs[n]] for n in names],
    )
