"""Fitters recover known curves, exclude NaN, round-trip through JSON, reject bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from posbias.errors import PosbiasError
from posbias.fitters import ExponentialBiasFitter, PolynomialBiasFitter, fitter_from_dict, mean_curve

V = 576  # LLaVA-1.5 grid 24x24
GRID = np.arange(V, dtype=np.float64)  # (V,) float64


def cubic(x: np.ndarray) -> np.ndarray:
    """A ΔA-like cubic in the raster index: ~1e-3 scale, rising late (recency)."""
    return 2e-4 - 1.5e-6 * x + 4e-9 * x**2 + 6e-12 * x**3


def pooled(curve, n_samples: int, noise: float, seed: int, x_unit: np.ndarray = GRID):
    rng = np.random.default_rng(seed)
    x = np.tile(x_unit, n_samples)  # (n_samples*V,) float64
    y = curve(x) + rng.normal(0.0, noise, x.size)  # (n_samples*V,) float64
    return x, y


# ------------------------------------------------------------------------------------ polynomial
def test_polynomial_recovers_injected_cubic():
    x, y = pooled(cubic, n_samples=200, noise=5e-4, seed=0)
    f = PolynomialBiasFitter(degree=3).fit(x, y)
    truth = cubic(GRID)  # (V,)
    span = truth.max() - truth.min()
    # tolerance: 2% of the curve's range everywhere on the grid (noise/sqrt(200) ~ 3.5e-5 per position)
    assert np.max(np.abs(f.predict(GRID) - truth)) < 0.02 * span
    # the unscaled coefficients reproduce the same curve (seed's Eq. 5 form)
    a = f.unscaled_coef()
    assert a.shape == (4,)
    np.testing.assert_allclose(np.polynomial.polynomial.polyval(GRID, a), f.predict(GRID), rtol=1e-9, atol=1e-15)
    assert f.n_samples_ == 200 and f.n_points_ == 200 * V and f.n_excluded_ == 0
    assert f.r2_ > 0.95 and 0 < f.rmse_ < 1e-4
    assert f.x_shift_ == pytest.approx(287.5) and f.x_scale_ == pytest.approx(287.5)
    assert f.coef_.shape == (4,)


def test_polynomial_normalized_domain_and_groups():
    unit = GRID / V  # (V,) i/N in [0, 1)
    truth_fn = lambda u: 1e-3 * (u - 0.3) ** 3 + 2e-4 * u  # noqa: E731
    x, y = pooled(truth_fn, n_samples=50, noise=1e-5, seed=1, x_unit=unit)
    groups = np.repeat(np.arange(50), V)
    f = PolynomialBiasFitter(degree=3, domain="normalized").fit(x, y, groups=groups)
    np.testing.assert_allclose(f.predict(unit), truth_fn(unit), atol=5e-6)
    assert f.n_samples_ == 50
    with pytest.raises(PosbiasError, match="normalized"):
        PolynomialBiasFitter(domain="normalized").fit(GRID, cubic(GRID))


def test_polynomial_excludes_and_counts_nan_rows():
    x, y = pooled(cubic, n_samples=20, noise=1e-5, seed=2)
    y[::7] = np.nan
    x[3] = np.inf
    n_bad = int(np.sum(~np.isfinite(y) | ~np.isfinite(x)))
    f = PolynomialBiasFitter().fit(x, y)
    assert f.n_excluded_ == n_bad
    assert f.n_points_ == x.size - n_bad
    assert np.all(np.isfinite(f.coef_)) and np.isfinite(f.r2_)
    np.testing.assert_allclose(f.predict(GRID), cubic(GRID), atol=2e-5)


@pytest.mark.parametrize("degree", [0, 6, -1, 2.5, True])
def test_polynomial_rejects_bad_degree(degree):
    with pytest.raises(PosbiasError, match="degree"):
        PolynomialBiasFitter(degree=degree).fit(GRID, cubic(GRID))


def test_polynomial_rejects_bad_input():
    with pytest.raises(PosbiasError, match="domain"):
        PolynomialBiasFitter(domain="log").fit(GRID, cubic(GRID))
    with pytest.raises(PosbiasError, match="1-D"):
        PolynomialBiasFitter().fit(GRID, cubic(GRID)[:-1])
    with pytest.raises(PosbiasError, match="distinct positions"):
        PolynomialBiasFitter(degree=3).fit([0, 1, 2, 0, 1, 2], [1, 2, 3, 1, 2, 3])
    with pytest.raises(PosbiasError, match="no finite points"):
        PolynomialBiasFitter().fit(GRID, np.full(V, np.nan))
    with pytest.raises(PosbiasError, match="not fitted"):
        PolynomialBiasFitter().predict(GRID)


@pytest.mark.parametrize("cls,kw", [(PolynomialBiasFitter, {"degree": 2}), (ExponentialBiasFitter, {"offset": False})])
def test_to_dict_from_dict_round_trip_exact(cls, kw):
    truth = (lambda x: 1e-3 * np.exp(3e-3 * x)) if cls is ExponentialBiasFitter else cubic
    x, y = pooled(truth, n_samples=10, noise=1e-6, seed=3)
    f = cls(**kw).fit(x, y)
    d = f.to_dict()
    text = json.dumps(d)  # plain JSON types only
    g = cls.from_dict(json.loads(text))
    assert g.get_params() == f.get_params()
    assert np.array_equal(g.predict(GRID), f.predict(GRID))  # exact, not approximate
    assert np.array_equal(fitter_from_dict(json.loads(text)).predict(GRID), f.predict(GRID))
    assert set(d) == {"class", "params", "learned"} and d["class"] == cls.__name__
    assert all(k.endswith("_") for k in d["learned"])


def test_estimator_contract_params():
    f = PolynomialBiasFitter(degree=2, domain="normalized")
    assert f.get_params() == {"degree": 2, "domain": "normalized"}
    assert f.set_params(degree=4) is f and f.degree == 4
    assert not [a for a in vars(f) if a.endswith("_")]  # __init__ only stores params
    with pytest.raises(PosbiasError, match="unknown parameter"):
        f.set_params(order=3)
    with pytest.raises(TypeError):
        PolynomialBiasFitter(3)  # keyword-only
    with pytest.raises(PosbiasError, match="not a PolynomialBiasFitter"):
        PolynomialBiasFitter.from_dict({"class": "ExponentialBiasFitter", "params": {}, "learned": {}})


def test_score_is_r2():
    x, y = pooled(cubic, n_samples=5, noise=0.0, seed=4)
    f = PolynomialBiasFitter().fit(x, y)
    assert f.score(GRID, cubic(GRID)) == pytest.approx(1.0, abs=1e-9)
    assert f.score(GRID, -cubic(GRID)) < 0


# ------------------------------------------------------------------------------------ exponential
@pytest.mark.parametrize("seed", [0, 1])
def test_exponential_recovers_injected_curve(seed):
    a, b, c = 3e-4, 5e-3, 8e-4  # P(575) ~ 0.0057, a recency ramp on top of a floor
    x, y = pooled(lambda t: a * np.exp(b * t) + c, n_samples=100, noise=5e-4, seed=seed)
    f = ExponentialBiasFitter().fit(x, y)
    # tolerances: a within 10%, b within 3%, c within 1e-4 absolute (~12% of c)
    assert f.a_ == pytest.approx(a, rel=0.10)
    assert f.b_ == pytest.approx(b, rel=0.03)
    assert f.c_ == pytest.approx(c, abs=1e-4)
    assert f.r2_ > 0.99 and f.n_samples_ == 100
    assert np.all(f.predict(GRID) > 0)


def test_exponential_pure_form_and_decreasing_bias():
    a, b = 4e-3, -2.5e-3  # decaying (the Qwen-like opposite sign)
    x, y = pooled(lambda t: a * np.exp(b * t), n_samples=60, noise=3e-4, seed=5)
    f = ExponentialBiasFitter(offset=False).fit(x, y)
    assert f.c_ == 0.0
    assert f.a_ == pytest.approx(a, rel=0.05)
    assert f.b_ == pytest.approx(b, rel=0.05)


def test_exponential_normalized_domain_reports_unscaled_params():
    unit = GRID / V
    a, b, c = 1e-3, 2.0, 5e-4
    x, y = pooled(lambda t: a * np.exp(b * t) + c, n_samples=40, noise=1e-4, seed=6, x_unit=unit)
    f = ExponentialBiasFitter(domain="normalized").fit(x, y)
    np.testing.assert_allclose(f.predict(unit), a * np.exp(b * unit) + c, rtol=0.03)
    assert f.b_ == pytest.approx(b, rel=0.05)


def test_exponential_nan_excluded_and_bad_input():
    x, y = pooled(lambda t: 1e-3 * np.exp(4e-3 * t) + 1e-4, n_samples=20, noise=1e-5, seed=7)
    y[5::11] = np.nan
    f = ExponentialBiasFitter().fit(x, y)
    assert f.n_excluded_ == int(np.isnan(y).sum()) > 0
    assert np.isfinite([f.a_, f.b_, f.c_, f.r2_, f.rmse_]).all()
    with pytest.raises(PosbiasError, match="<= 0"):
        ExponentialBiasFitter().fit(GRID, -np.ones(V))
    with pytest.raises(PosbiasError, match="too few"):
        ExponentialBiasFitter().fit([0, 1, 2], [1.0, 2.0, 3.0])


def test_exponential_convergence_failure_is_posbias_error(monkeypatch):
    import posbias.fitters.exponential as mod

    def boom(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found: The maximum number of function evaluations is exceeded.")

    monkeypatch.setattr(mod.ExponentialBiasFitter, "_curve_fit", boom)
    with pytest.raises(PosbiasError, match="did not converge.*more samples"):
        ExponentialBiasFitter().fit(GRID, 1e-3 * np.exp(1e-3 * GRID))


# ------------------------------------------------------------------------------------ mean_curve
def test_mean_curve_distinct_and_binned():
    x = np.array([0, 0, 1, 1, 2, 2], dtype=float)
    y = np.array([1, 3, 2, 4, 10, 20], dtype=float)
    xs, ms, ws = mean_curve(x, y)
    np.testing.assert_array_equal(xs, [0, 1, 2])
    np.testing.assert_array_equal(ms, [2, 3, 15])
    np.testing.assert_array_equal(ws, [2, 2, 2])
    u = np.array([0.0, 0.1, 0.2, 0.9, 1.0])
    xs, ms, ws = mean_curve(u, np.array([1.0, 1.0, 1.0, 5.0, 7.0]), n_bins=2)
    np.testing.assert_allclose(xs, [0.1, 0.95])
    np.testing.assert_allclose(ms, [1.0, 6.0])
    with pytest.raises(PosbiasError, match="NaN"):
        mean_curve([0.0, np.nan], [1.0, 2.0])
