"""The stages of a calibration run, as library calls: profile -> fit -> export -> report.

The CLI is a thin shell over these functions; so is any notebook or script that wants one stage.
Layer indices are 0-based decoder layer indices everywhere in posbias.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
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
    "FIT_METHODS",
    "parse_degree",
]

#: methods ``fit_calibration`` can fit (fastv has nothing to fit; it only records its layer)
FIT_METHODS: tuple[str, ...] = ("fastv", "pore", "posprune-pbc", "adaptprune-gaussian")

STORE_FILENAME = "profile.h5"
REPORT_FILENAME = "report.html"

#: PosPrune scores with its "2nd" (shallow) layer and prunes there, as FastV's K=2: 0-based layer 1; its deep
#: reference is the "20th" layer of a 32-layer model, 0-based 19 (docs/runtime.md, "Layers and the papers' K")
DEFAULT_SHALLOW_LAYER = 1
REFERENCE_DEEP_LAYER, REFERENCE_DEPTH = 20, 32


def default_layers(n_layers: int) -> tuple[int, int]:
    """(shallow, deep) default layers for a decoder with ``n_layers`` layers.

    shallow = 1 (PosPrune's 2nd layer, FastV's K=2); deep = the 0-based index of the layer at the relative depth
    of the 20th of 32 layers, ``round(20 / 32 * n_layers) - 1``, kept inside the model and above shallow.
    """
    if n_layers < 2:
        raise PosbiasError(f"a decoder with {n_layers} layer(s) has no shallow/deep pair; need at least 2 layers")
    shallow = min(DEFAULT_SHALLOW_LAYER, n_layers - 2)
    deep = int(round(REFERENCE_DEEP_LAYER / REFERENCE_DEPTH * n_layers)) - 1
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


def parse_degree(value: int | str) -> int | str:
    """``"auto"`` or an integer degree 1..5 (from the CLI's ``--degree auto|N``)."""
    from posbias.fitters.polynomial import MAX_DEGREE

    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = int(value)
        except ValueError:
            raise PosbiasError(f"--degree {value!r}: use 'auto' (cross-validated) or an integer 1..{MAX_DEGREE}") from None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= int(value) <= MAX_DEGREE:
        raise PosbiasError(f"--degree {value!r}: use 'auto' (cross-validated) or an integer 1..{MAX_DEGREE}")
    return int(value)


@dataclass
class FitResult:
    """A fitted calibration and the numbers worth printing about it."""

    calibration: Any  # posbias.artifacts.Calibration
    rows: list[tuple[str, str, str]]  # (method, what, value) summary lines
    n_excluded_samples: int
    statistics: dict[str, Any] = field(default_factory=dict)  # the calibration's "statistics" section


def _fmt_ci(est: float, lo: float, hi: float) -> str:
    return f"{est:.4g} [{lo:.4g}, {hi:.4g}]"


def fit_calibration(
    store_path: str | Path,
    *,
    shallow_layer: int | None = None,
    deep_layer: int | None = None,
    pore_layer: int | None = None,
    degree: int | str = "auto",
    domain: str = "auto",
    pore_offset: bool | str = "auto",
    keep: int = 64,
    created: str | None = None,
    methods: Sequence[str] | None = None,
    seed: int = 0,
    statistics: bool = True,
    group_sizes: Sequence[int] | None = None,
    n_repeats: int = 200,
    consistency_threshold: float | None = None,
    cv_folds: int | None = None,
    n_boot: int = 200,
    gaussian_sigma: str | float = "default",
    level: float = 0.95,
) -> FitResult:
    """Fit the bias curves of a store, with their statistics; return the calibration.

    Parameters
    ----------
    store_path : path
        A profile store (``profile.h5``).
    shallow_layer, deep_layer : int, optional
        Layers of A_shallow - A_deep (defaults from :func:`default_layers`).
    pore_layer : int, optional
        Layer whose mean attention PoRe (and the Gaussian centre fit) uses (default: the shallow layer).
    degree : "auto" or int
        PBC polynomial degree: ``"auto"`` (default) chooses 1-5 by k-fold cross-validation over samples
        (one-SE rule); an integer 1-5 forces it (the CV table is still reported).
    domain : {"auto", "index", "normalized"}
        Position variable: raster index for fixed grids, i/N for dynamic resolution; "auto" picks index
        when every sample has the same grid.
    pore_offset : "auto" or bool
        ``False``: PoRe's released pure exponential a*exp(b*x) (weights exp(-b i)); ``True``: a*exp(b*x)+c;
        ``"auto"`` (default): the pure form unless the offset form's held-out error over sample folds is lower by
        more than one standard error (``methods.pore.form`` records both errors and the other form's fit).
    keep : int
        Default number of kept tokens recorded in the artifact.
    created : str, optional
        ISO timestamp to record (default: now, UTC).
    methods : sequence of str, optional
        Methods to fit, from :data:`FIT_METHODS` (default: all).
    seed : int
        Seed of every random split, fold assignment and bootstrap (same seed, same artifact).
    statistics : bool
        Compute the ``statistics`` section (consistency, CV, intervals, 2-D comparison, density).
    group_sizes : sequence of int, optional
        Consistency group sizes (default: 10, 25, 50, ... up to what the store holds). An explicit size no
        source can hold is an error.
    n_repeats : int
        Random splits per group size.
    consistency_threshold : float, optional
        Verdict threshold on Pearson r (default 0.9, :data:`posbias.fitters.consistency.DEFAULT_THRESHOLD`).
    cv_folds : int, optional
        Folds of the degree / 2-D cross-validation (default ``min(5, samples)``; an explicit value larger
        than the number of samples is an error).
    n_boot : int
        Bootstrap replicates of the PoRe intervals.
    gaussian_sigma : "default", "fit" or float
        Sigma of AdaptPrune's centre weight in centred units (default: AdaptPrune's, 12 on 24x24).
    level : float
        Confidence level of all intervals.
    """
    import posbias
    from posbias.artifacts import Calibration
    from posbias.artifacts.calibration import SCHEMA_VERSION, utc_now
    from posbias.artifacts.quality import assess_methods
    from posbias.fitters import ExponentialBiasFitter, PolynomialBiasFitter
    from posbias.fitters.exponential import select_exponential_form
    from posbias.fitters.consistency import DEFAULT_THRESHOLD, bias_consistency
    from posbias.fitters.curves import build_sample_curves, centred_coords, token_geometry
    from posbias.fitters.density import NOT_PROFILED, density_test, read_region_density
    from posbias.fitters.gaussian import GaussianCentreFitter
    from posbias.fitters.inference import exponential_inference, polynomial_inference
    from posbias.fitters.selection import DEFAULT_FOLDS, make_folds, select_polynomial_degree
    from posbias.fitters.surface import SurfaceBiasFitter, best_surface_params, compare_bias_maps
    from posbias.profiler.store import ProfileStore

    wanted = list(FIT_METHODS) if methods is None else [str(m) for m in methods]
    unknown = [m for m in wanted if m not in FIT_METHODS]
    if unknown or not wanted:
        raise PosbiasError(f"--methods {','.join(wanted)}: unknown {unknown}; choose from {','.join(FIT_METHODS)}")
    degree = parse_degree(degree)
    threshold = DEFAULT_THRESHOLD if consistency_threshold is None else float(consistency_threshold)
    if not 0.0 < float(level) < 1.0:
        raise PosbiasError(f"--level {level}: a confidence level must be in (0, 1), e.g. 0.95")
    seed = int(seed)

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
        multi_tile = bool(store.multi_tile)  # any-resolution layouts (LLaVA-NeXT): no one raster grid
        fixed_grid = bool(np.all(grids == grids[0])) and not multi_tile
        if domain == "auto":
            domain = "index" if fixed_grid else "normalized"
        if domain not in ("index", "normalized"):
            raise PosbiasError(f"--domain {domain!r} is not one of 'auto', 'index', 'normalized'")
        if domain == "index" and not fixed_grid:
            raise PosbiasError(
                f"store {store_path} mixes visual grids; the raster-index domain needs one grid: pass --domain normalized"
            )
        used_layers = sorted({shallow, deep, pore})
        attn = store.layers(used_layers)  # (T, k) float32
        cols = {layer: j for j, layer in enumerate(used_layers)}
        token_sample = store.token_sample()  # (T,)
        n_visual = np.asarray(store.n_visual)  # (S,)
        token_index, tok_grid, cand = token_geometry(store)  # (T,), (T, 2), (T,)
        tok_rows, tok_cols = np.asarray(store.rows), np.asarray(store.cols)  # (T,) each
        if not cand.all():  # separators (any-resolution layouts) are never pruning candidates: not fitted
            attn, token_sample, token_index = attn[cand], token_sample[cand], token_index[cand]
            tok_rows, tok_cols, tok_grid = tok_rows[cand], tok_cols[cand], tok_grid[cand]
        token_n = n_visual[token_sample]  # (T,)
        # a sample with any non-finite value in the layers used is excluded whole (fp16 overflow)
        bad_token = ~np.all(np.isfinite(attn), axis=1)  # (T,)
        bad_sample = np.zeros(store.n_samples, dtype=bool)  # (S,)
        bad_sample[token_sample[bad_token]] = True
        n_excluded = int(bad_sample.sum())
        if store.n_samples - n_excluded < 2:
            raise PosbiasError(
                f"store {store_path}: {n_excluded} of {store.n_samples} samples have NaN/inf attention at layers "
                f"{used_layers}; re-profile with --dtype float32"
            )
        ok = ~bad_sample[token_sample]  # (T,)
        x_all = positions_for_domain(token_index, token_n, domain)  # (T,) float64
        x = x_all[ok]  # (T',)
        groups = token_sample[ok]  # (T',)
        delta_all = attn[:, cols[shallow]].astype(np.float64) - attn[:, cols[deep]].astype(np.float64)  # (T,)
        attn_all = attn[:, cols[pore]].astype(np.float64)  # (T,)
        delta = delta_all[ok]  # (T',)
        mean_attn = attn_all[ok]  # (T',)
        u_all, v_all = centred_coords(tok_rows, tok_cols, tok_grid[:, 0], tok_grid[:, 1])  # (T,) each

        sources = store.sources_count()
        source_list = list(store.sources)
        excluded_ids = [store.sample_ids[i] for i in np.flatnonzero(bad_sample)]
        attrs = store.attrs
        n_samples = store.n_samples
        n_skipped = len(store.skipped())
        grid = [int(grids[0, 0]), int(grids[0, 1])] if fixed_grid else None

    n_used = n_samples - n_excluded
    keep_mask = ~bad_sample  # (S,)
    rows: list[tuple[str, str, str]] = []
    stats: dict[str, Any] = {}

    def curves_of(values: np.ndarray, layout: str):
        return build_sample_curves(
            values, token_sample, keep_mask, source_list, x=x_all, u=u_all, v=v_all, layout=layout,
            raster_index=token_index if layout == "grid" else None,
            grid=(grid[0], grid[1]) if grid is not None else None,
        )

    layout_1d = "grid" if fixed_grid else "bins1d"
    need_pbc = "posprune-pbc" in wanted
    delta_curves = curves_of(delta_all, layout_1d) if (need_pbc and (statistics or degree == "auto")) else None
    folds = None
    if delta_curves is not None:
        if cv_folds is None:
            n_folds = min(DEFAULT_FOLDS, n_used)
        else:
            n_folds = int(cv_folds)
        folds = make_folds(n_used, n_folds, seed)

    doc_methods: dict[str, Any] = {}
    if "fastv" in wanted:
        doc_methods["fastv"] = {"layer": int(shallow)}

    # ------------------------------------------------------------------------------ PosPrune PBC
    if need_pbc:
        selection = None
        if delta_curves is not None:
            selection = select_polynomial_degree(delta_curves, folds=folds, seed=seed)
            selection.mode = "auto" if degree == "auto" else "forced"
            stats["pbc_degree"] = selection.to_dict()
        chosen = selection.chosen if degree == "auto" else int(degree)  # type: ignore[union-attr]
        pbc = PolynomialBiasFitter(degree=chosen, domain=domain).fit(x, delta, groups=groups)
        doc_methods["posprune-pbc"] = {
            "shallow_layer": int(shallow),
            "deep_layer": int(deep),
            "domain": domain,
            "fit": pbc.to_dict(),
            "goodness": {"r2": float(pbc.r2_), "rmse": float(pbc.rmse_), "n_samples": int(n_used)},
        }
        rows.append(("posprune-pbc", "layers (shallow - deep)", f"{shallow} - {deep}"))
        if selection is not None:
            cv = ", ".join(f"{d}:{m:.3g}" for d, m in zip(selection.degrees, selection.cv_mse))
            how = f"auto ({selection.n_folds}-fold CV, 1-SE rule)" if degree == "auto" else "forced"
            rows.append(("posprune-pbc", "degree", f"{chosen} {how}; CV MSE {cv}"))
        else:
            rows.append(("posprune-pbc", "degree", f"{chosen} forced"))
        rows.append(("posprune-pbc", "domain", domain))
        rows.append(("posprune-pbc", "R^2 vs mean curve", f"{pbc.r2_:.4f}"))
        rows.append(("posprune-pbc", "RMSE", f"{pbc.rmse_:.3e}"))
        if statistics:
            inf = polynomial_inference(pbc, x, delta, groups, level=level)
            stats["pbc_inference"] = inf.to_dict()
            width = float(np.max(np.asarray(inf.band["high"]) - np.asarray(inf.band["low"])))
            ratio = float(np.max(np.asarray(inf.se) / np.maximum(np.asarray(inf.se_iid), 1e-300)))
            rows.append(("posprune-pbc", f"max {int(level * 100)}% band width", f"{width:.3e} (cluster/iid SE up to {ratio:.1f}x)"))

            cons = bias_consistency(
                delta_curves, group_sizes=group_sizes, n_repeats=n_repeats, threshold=threshold, ci=level, seed=seed
            )
            stats["consistency"] = cons.to_dict()
            rows.append(("consistency", "verdict", cons.verdict))
            for c in cons.curves:
                r = c.r_median[-1]
                txt = "undefined" if not np.isfinite(r) else f"{r:.3f} [{c.r_low[-1]:.3f}, {c.r_high[-1]:.3f}]"
                rows.append(("consistency", f"r {c.label} (n={c.group_sizes[-1]})", f"{txt} -> {c.verdict}"))
            if cons.settle:
                rows.append(("consistency", "to settle", cons.settle))

            map_curves = delta_curves if fixed_grid else curves_of(delta_all, "bins2d")
            cmp_ = compare_bias_maps(map_curves, folds=folds, seed=seed)
            stats["bias_map"] = cmp_.to_dict()
            rows.append(("bias-map", "held-out best 1-D / 2-D", f"{cmp_.best_1d} / {cmp_.best_2d} -> keep {cmp_.chosen}"))
            params = best_surface_params(cmp_)
            if cmp_.chosen == "2d" and params is not None:
                surf = SurfaceBiasFitter(kind=params[0], degree=params[1]).fit(
                    np.stack([u_all[ok], v_all[ok]], axis=1), delta, groups=groups
                )
                doc_methods["posprune-pbc-2d"] = {
                    "shallow_layer": int(shallow),
                    "deep_layer": int(deep),
                    "coords": "centred",
                    "grid": grid,
                    "fit": surf.to_dict(),
                    "goodness": {"r2": float(surf.r2_), "rmse": float(surf.rmse_), "n_samples": int(n_used)},
                }
                rows.append(("bias-map", "2-D surface R^2", f"{surf.r2_:.4f} ({params[0]}, degree {params[1]})"))

    # ------------------------------------------------------------------------------ PoRe
    if "pore" in wanted:
        if pore_offset not in ("auto", True, False):
            raise PosbiasError(f"pore_offset={pore_offset!r} must be 'auto', True or False")
        attn_curves = curves_of(attn_all, layout_1d) if (statistics or pore_offset == "auto") else None
        form: dict[str, Any] = {"mode": "forced" if pore_offset != "auto" else "auto"}
        if pore_offset == "auto":
            pore_folds = folds if folds is not None else make_folds(
                n_used, min(DEFAULT_FOLDS, n_used) if cv_folds is None else int(cv_folds), seed)
            form.update(select_exponential_form(attn_curves, pore_folds, domain=domain))
            offset = form["chosen"] == "offset"
        else:
            offset = bool(pore_offset)
            form["chosen"] = "offset" if offset else "pure"
        exp_fit = ExponentialBiasFitter(offset=offset, domain=domain).fit(x, mean_attn, groups=groups)
        try:  # the other form, for the report's side-by-side curves
            other = ExponentialBiasFitter(offset=not offset, domain=domain).fit(x, mean_attn, groups=groups)
            form["other"] = other.to_dict()
        except PosbiasError:
            form["other"] = None
        doc_methods["pore"] = {
            "layer": int(pore),
            "domain": domain,
            "fit": exp_fit.to_dict(),
            "goodness": {"r2": float(exp_fit.r2_), "rmse": float(exp_fit.rmse_), "n_samples": int(n_used)},
            "form": form,
        }
        rows.append(("pore", "layer", str(pore)))
        if form["mode"] == "auto":
            mse = ", ".join(f"{n}:{v:.3g}" if v is not None else f"{n}:failed"
                            for n, v in zip(form["forms"], form["cv_mse"]))
            rows.append(("pore", "form", f"{form['chosen']} (held-out MSE {mse}; 1-SE rule favours pure)"))
        else:
            rows.append(("pore", "form", f"{form['chosen']} (forced)"))
        rows.append(("pore", "P(x)", f"a={exp_fit.a_:.4g} b={exp_fit.b_:.4g} c={exp_fit.c_:.4g}"))
        rows.append(("pore", "R^2 vs mean curve", f"{exp_fit.r2_:.4f}"))
        if statistics:
            einf = exponential_inference(exp_fit, attn_curves, n_boot=n_boot, level=level, seed=seed)
            stats["pore_inference"] = einf.to_dict()
            p = einf.params
            pct = int(round(level * 100))
            rows.append(("pore", f"b {pct}% CI (bootstrap {einf.n_boot}, {einf.n_failed} failed)",
                         _fmt_ci(p["b"]["estimate"], p["b"]["low"], p["b"]["high"])))

    # ------------------------------------------------------------------------------ AdaptPrune Gaussian
    if "adaptprune-gaussian" in wanted:
        gfit = GaussianCentreFitter(sigma=gaussian_sigma).fit(
            np.stack([u_all[ok], v_all[ok]], axis=1), mean_attn, groups=groups
        )
        entry: dict[str, Any] = {
            "layer": int(pore),
            "grid": grid,
            "coords": "u, v = linspace(-1, 1, rows), linspace(-1, 1, cols)",
            "fit": gfit.to_dict(),
            "goodness": {"r2": float(gfit.r2_), "rmse": float(gfit.rmse_), "n_samples": int(n_used)},
        }
        if grid is not None:
            entry["sigma_patches"] = list(gfit.sigma_patches((grid[0], grid[1])))
            entry["mask"] = [float(v) for v in gfit.mask((grid[0], grid[1])).ravel()]
        doc_methods["adaptprune-gaussian"] = entry
        rows.append(("adaptprune-gaussian", "sigma (centred units)",
                     f"{gfit.sigma_:.3g} ({gaussian_sigma}); centre peak: {'yes' if gfit.centre_peak_ else 'no'}"))
        rows.append(("adaptprune-gaussian", "R^2 fitted / seed sigma", f"{gfit.r2_:.4f} / {gfit.r2_default_:.4f}"))

    # ------------------------------------------------------------------------------ density
    if statistics:
        region = read_region_density(store_path, np.flatnonzero(keep_mask))
        if region is None:
            stats["density"] = {"status": "not profiled", "message": NOT_PROFILED}
            rows.append(("density", "centre vs edge entropy", NOT_PROFILED))
        else:
            dres = density_test(region[0], region[1], level=level)
            stats["density"] = dres.to_dict()
            rows.append(("density", "centre vs edge entropy", dres.message))
        stats["seed"] = seed
        stats["level"] = float(level)
        stats["samples"] = {
            "used": int(n_used),
            "excluded_non_finite": int(n_excluded),
            "excluded_ids": excluded_ids[:100],
            "layers_checked": [int(v) for v in used_layers],
        }

    order = [m for m in ("posprune-pbc", "pore", "adaptprune-gaussian", "fastv") if m in doc_methods]
    default_method = order[0]
    default_layer = shallow if default_method in ("posprune-pbc", "fastv") else pore
    doc: dict[str, Any] = {
        "schema": "posbias.calibration",
        "schema_version": SCHEMA_VERSION,
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
        "methods": doc_methods,
        "defaults": {"method": default_method, "layer": int(default_layer), "keep": int(keep)},
    }
    if stats:
        doc["statistics"] = stats
    assess_methods(doc_methods, stats)
    calibration = Calibration.from_dict(doc)
    rows.append(("store", "samples used / excluded (NaN/inf) / skipped", f"{n_used} / {n_excluded} / {n_skipped}"))
    return FitResult(calibration=calibration, rows=rows, n_excluded_samples=n_excluded, statistics=stats)
