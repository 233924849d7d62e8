"""The stages of a calibration run, as library calls: profile -> fit -> export -> report.

The CLI is a thin shell over these functions; so is any notebook or script that wants one stage.
Layer indices are 0-based decoder layer indices everywhere in posbias.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from posbias.errors import PosbiasError

__all__ = [
    "STORE_FILENAME",
    "REPORT_FILENAME",
    "default_layers",
    "FitResult",
    "fit_calibration",
    "positions_for_domain",
]

STORE_FILENAME = "profile.h5"
REPORT_FILENAME = "report.html"

#: PosPrune prunes at decoder layer 2; its deep reference is layer 20 of a 32-layer model
DEFAULT_SHALLOW_LAYER = 2
REFERENCE_DEEP_LAYER, REFERENCE_DEPTH = 20, 32


def default_layers(n_layers: int) -> tuple[int, int]:
    """(shallow, deep) default layers for a decoder with ``n_layers`` layers.

    shallow = 2 (PosPrune, FastV); deep = the layer at the relative depth of layer 20 in a 32-layer
    model, ``round(20 / 32 * n_layers)``, kept inside the model and above shallow.
    """
    if n_layers < 2:
        raise PosbiasError(f"a decoder with {n_layers} layer(s) has no shallow/deep pair; need at least 2 layers")
    shallow = min(DEFAULT_SHALLOW_LAYER, n_layers - 2)
    deep = int(round(REFERENCE_DEEP_LAYER / REFERENCE_DEPTH * n_layers))
    deep = min(max(deep, shallow + 1), n_layers - 1)
    return shallow, deep


def _check_layer(name: str, layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise PosbiasError(f"{name}={layer} is outside the model's decoder layers 0..{n_layers - 1}; pass a layer in that range")


def positions_for_domain(token_index: np.ndarray, token_n_visual: np.ndarray, domain: str) -> np.ndarray:
    """Token positions in a fit's domain: raster index i, or i/N for dynamic resolution."""
    if domain == "index":
        return token_index.astype(np.float64)
    if domain == "normalized":
        return token_index.astype(np.float64) / token_n_visual.astype(np.float64)
    raise PosbiasError(f"domain {domain!r} is not one of 'index', 'normalized', 'auto'")


@dataclass
class FitResult:
    """A fitted calibration and the numbers worth printing about it."""

    calibration: Any  # posbias.artifacts.Calibration
    rows: list[tuple[str, str, str]]  # (method, what, value) summary lines
    n_excluded_samples: int


def fit_calibration(
    store_path: str | Path,
    *,
    shallow_layer: int | None = None,
    deep_layer: int | None = None,
    pore_layer: int | None = None,
    degree: int = 3,
    domain: str = "auto",
    pore_offset: bool = True,
    keep: int = 64,
    created: str | None = None,
) -> FitResult:
    """Fit PosPrune's PBC polynomial and PoRe's exponential on a store; return the calibration.

    Parameters
    ----------
    store_path : path
        A profile store (``profile.h5``).
    shallow_layer, deep_layer : int, optional
        Layers of A_shallow - A_deep (defaults from :func:`default_layers`).
    pore_layer : int, optional
        Layer whose mean attention PoRe fits (default: the shallow layer, where pruning happens).
    degree : int
        Polynomial degree of the PBC fit (1-5, default 3 as in the seed).
    domain : {"auto", "index", "normalized"}
        Position variable: raster index for fixed grids, i/N for dynamic resolution; "auto" picks index
        when every sample has the same grid.
    pore_offset : bool
        Fit a*exp(b*x)+c (True) or the seed's pure a*exp(b*x) (False).
    keep : int
        Default number of kept tokens recorded in the artifact.
    created : str, optional
        ISO timestamp to record (default: now, UTC).
    """
    import posbias
    from posbias.artifacts import Calibration
    from posbias.artifacts.calibration import utc_now
    from posbias.fitters import ExponentialBiasFitter, PolynomialBiasFitter
    from posbias.profiler.store import ProfileStore

    with ProfileStore(store_path) as store:
        n_layers = store.n_layers
        d_shallow, d_deep = default_layers(n_layers)
        shallow = d_shallow if shallow_layer is None else int(shallow_layer)
        deep = d_deep if deep_layer is None else int(deep_layer)
        pore = shallow if pore_layer is None else int(pore_layer)
        for name, value in (("--shallow-layer", shallow), ("--deep-layer", deep), ("--pore-layer", pore)):
            _check_layer(name, value, n_layers)
        if shallow == deep:
            raise PosbiasError(f"--shallow-layer and --deep-layer are both {shallow}; PBC needs two different layers")
        if store.n_samples < 2:
            raise PosbiasError(
                f"store {store_path} holds {store.n_samples} sample(s); fitting needs at least 2: profile more samples (--n)"
            )
        grids = np.asarray(store.grids)  # (S, 2)
        fixed_grid = bool(np.all(grids == grids[0]))
        if domain == "auto":
            domain = "index" if fixed_grid else "normalized"
        if domain == "index" and not fixed_grid:
            raise PosbiasError(
                f"store {store_path} mixes visual grids; the raster-index domain needs one grid: pass --domain normalized"
            )
        attn = store.layers(sorted({shallow, deep, pore}))  # (T, k) float32
        cols = {layer: j for j, layer in enumerate(sorted({shallow, deep, pore}))}
        token_sample = store.token_sample()  # (T,)
        token_index = store.token_index()  # (T,)
        n_visual = np.asarray(store.n_visual)  # (S,)
        token_n = n_visual[token_sample]  # (T,)
        # a sample with any non-finite value in the layers used is excluded whole (fp16 overflow)
        bad_token = ~np.all(np.isfinite(attn), axis=1)  # (T,)
        bad_sample = np.zeros(store.n_samples, dtype=bool)
        bad_sample[token_sample[bad_token]] = True
        n_excluded = int(bad_sample.sum())
        if store.n_samples - n_excluded < 2:
            raise PosbiasError(
                f"store {store_path}: {n_excluded} of {store.n_samples} samples have NaN/inf attention at layers "
                f"{sorted(cols)}; re-profile with --dtype float32"
            )
        ok = ~bad_sample[token_sample]  # (T,)
        x = positions_for_domain(token_index, token_n, domain)[ok]  # (T',)
        delta = (attn[ok, cols[shallow]] - attn[ok, cols[deep]]).astype(np.float64)  # (T',)
        mean_attn = attn[ok, cols[pore]].astype(np.float64)  # (T',)

        pbc = PolynomialBiasFitter(degree=degree, domain=domain).fit(x, delta)
        exp_fit = ExponentialBiasFitter(offset=pore_offset, domain=domain).fit(x, mean_attn)

        sources = store.sources_count()
        attrs = store.attrs
        n_samples = store.n_samples
        n_skipped = len(store.skipped())
        grid = [int(grids[0, 0]), int(grids[0, 1])] if fixed_grid else None

    n_used = n_samples - n_excluded
    doc: dict[str, Any] = {
        "schema": "posbias.calibration",
        "schema_version": 1,
        "created": created or utc_now(),
        "posbias_version": posbias.__version__,
        "model": {
            "id": str(attrs["model_id"]),
            "revision": str(attrs["model_revision"]) if attrs.get("model_revision") else None,
            "fingerprint": str(attrs["model_fingerprint"]),
            "adapter": str(attrs["adapter"]),
            "n_layers": int(n_layers),
            "rope_dims": int(attrs["rope_dims"]),
            "grid": grid,
        },
        "store": {
            "file": Path(store_path).name,
            "n_samples": int(n_samples),
            "n_skipped": int(n_skipped),
            "sources": {str(k): int(v) for k, v in sorted(sources.items())},
            "seed": int(attrs["seed"]),
        },
        "methods": {
            "fastv": {"layer": int(shallow)},
            "pore": {
                "layer": int(pore),
                "domain": domain,
                "fit": exp_fit.to_dict(),
                "goodness": {"r2": float(exp_fit.r2_), "rmse": float(exp_fit.rmse_), "n_samples": int(n_used)},
            },
            "posprune-pbc": {
                "shallow_layer": int(shallow),
                "deep_layer": int(deep),
                "domain": domain,
                "fit": pbc.to_dict(),
                "goodness": {"r2": float(pbc.r2_), "rmse": float(pbc.rmse_), "n_samples": int(n_used)},
            },
        },
        "defaults": {"method": "posprune-pbc", "layer": int(shallow), "keep": int(keep)},
    }
    calibration = Calibration.from_dict(doc)
    rows = [
        ("posprune-pbc", "layers (shallow - deep)", f"{shallow} - {deep}"),
        ("posprune-pbc", "degree / domain", f"{degree} / {domain}"),
        ("posprune-pbc", "R^2 vs mean curve", f"{pbc.r2_:.4f}"),
        ("posprune-pbc", "RMSE", f"{pbc.rmse_:.3e}"),
        ("pore", "layer", str(pore)),
        ("pore", "P(x)", exp_fit.describe() if hasattr(exp_fit, "describe") else f"a={exp_fit.a_:.4g} b={exp_fit.b_:.4g} c={exp_fit.c_:.4g}"),
        ("pore", "R^2 vs mean curve", f"{exp_fit.r2_:.4f}"),
        ("store", "samples used / excluded (NaN/inf) / skipped", f"{n_used} / {n_excluded} / {n_skipped}"),
    ]
    return FitResult(calibration=calibration, rows=rows, n_excluded_samples=n_excluded)
