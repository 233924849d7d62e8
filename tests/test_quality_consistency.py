"""Consistency verdicts say how many samples would settle them, and the estimate holds (issue 18)."""

from __future__ import annotations

import numpy as np
import pytest

from posbias.fitters.consistency import settle_size
from posbias.testing import write_synthetic_store
from posbias.pipeline import fit_calibration

GRID = (12, 12)
V = GRID[0] * GRID[1]


def cubic(x, u, v):
    t = x / (V - 1)
    return 1e-3 * (t - 0.4) ** 3 + 1e-4 * t


def _cons(path):
    return fit_calibration(path, seed=0, n_boot=0, n_repeats=60, methods=["posprune-pbc"]).statistics["consistency"]


def test_settle_size_follows_the_spearman_brown_curve():
    k = 20.0
    sizes = [10, 20, 40]
    med = [n / (n + k) for n in sizes]
    # no interval spread: the size where n / (n + k) reaches 0.9 is 9k = 180
    assert settle_size(sizes, med, med, 0.9) == pytest.approx(180, abs=2)
    # a spread below the median asks for more
    low = [float(np.tanh(np.arctanh(m) - 0.2)) for m in med]
    assert settle_size(sizes, med, low, 0.9) > 200
    assert settle_size(sizes, [-0.1, 0.0, None], [-0.3, -0.2, None], 0.9) is None  # no trend


def test_estimate_settles_a_noisy_store(tmp_path):
    small = write_synthetic_store(tmp_path / "small.h5", n_samples=40, grid=GRID, n_layers=4, shallow_bias=cubic,
                                  noise=2e-4, sample_effect=5e-5, sources=("a",), seed=4)
    cons = _cons(small)
    assert cons["verdict"] == "not consistent"
    curve = cons["curves"][0]
    need = curve["samples_needed"]
    assert need == 2 * curve["group_size_needed"] and cons["more_samples"] == need - 40
    assert f"profile at least {need - 40} more samples" in cons["settle"] and cons["settle"] in cons["evidence"]
    # profiled at the estimate, the median r is close to the threshold ...
    at = _cons(write_synthetic_store(tmp_path / "at.h5", n_samples=need, grid=GRID, n_layers=4, shallow_bias=cubic,
                                     noise=2e-4, sample_effect=5e-5, sources=("a",), seed=5))
    assert at["curves"][0]["r_median"][-1] >= 0.87
    # ... and twice the estimate settles it
    twice = _cons(write_synthetic_store(tmp_path / "twice.h5", n_samples=2 * need, grid=GRID, n_layers=4,
                                        shallow_bias=cubic, noise=2e-4, sample_effect=5e-5, sources=("a",), seed=6))
    assert twice["verdict"] == "consistent" and not twice["settle"] and twice["more_samples"] is None


def test_too_small_store_says_how_many_more(tmp_path):
    path = write_synthetic_store(tmp_path / "s.h5", n_samples=6, grid=(4, 4), n_layers=4, shallow_bias=cubic, seed=3)
    cons = _cons(path)
    assert cons["status"] == "insufficient samples" and cons["more_samples"] == 14
    assert "profile at least 14 more samples" in cons["settle"]
    assert not cons["evidence"].lower().startswith("insufficient samples")  # the verdict is not said twice
