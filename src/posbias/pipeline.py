"""The stages of a calibration run as library calls: profile -> fit -> report, and :func:`run_pipeline` for all three.

- :func:`profile` (:class:`ProfileConfig`): run a model over samples into a store (``profile.h5``);
- :func:`fit` (:class:`FitConfig`): fit every calibration entry of a store, with its statistics, into a
  :class:`~posbias.artifacts.Calibration` (one function per entry, registered in :data:`FIT_ENTRIES`; the
  statistics blocks that read several entries' data in :data:`STATISTICS_BLOCKS`);
- :func:`report` (:class:`ReportConfig`): the HTML (and PDF) report of a store and its calibration;
- :func:`run_pipeline`: the three in a row, into one folder (what ``profile-bias`` with no subcommand runs).

Exporting a calibration next to a model's weights is :func:`posbias.artifacts.export_to` (``profile-bias export``).
The CLI is a thin shell over these functions: it parses its options into the configs and prints.
Layer indices are 0-based decoder layer indices everywhere in posbias.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from posbias.errors import PosbiasError
from posbias.fitters.layers import DEFAULT_SHALLOW_LAYER, REFERENCE_DEEP_LAYER, REFERENCE_DEPTH, default_layers  # noqa: F401

__all__ = [
    "STORE_FILENAME",
    "REPORT_FILENAME",
    "PDF_FILENAME",
    "default_layers",
    "FitConfig",
    "FitData",
    "FitOutput",
    "FitResult",
    "FIT_ENTRIES",
    "FIT_METHODS",
    "STATISTICS_BLOCKS",
    "fit_entry",
    "statistics_block",
    "fit",
    "fit_calibration",
    "resolve_keep",
    "positions_for_domain",
    "parse_degree",
    "ProfileConfig",
    "profile",
    "ReportConfig",
    "report",
    "PipelineResult",
    "run_pipeline",
    "removing_empty_dir",
]

STORE_FILENAME = "profile.h5"
REPORT_FILENAME = "report.html"
PDF_FILENAME = "report.pdf"

#: kept visual tokens recorded in a calibration when none is given (at most the store's visual tokens)
DEFAULT_KEEP = 64


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
    """``"auto"`` or an integer degree 1..5."""
    from posbias.fitters.polynomial import MAX_DEGREE

    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = int(value)
        except ValueError:
            raise PosbiasError(f"degree={value!r}: use 'auto' (cross-validated) or an integer 1..{MAX_DEGREE}") from None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= int(value) <= MAX_DEGREE:
        raise PosbiasError(f"degree={value!r}: use 'auto' (cross-validated) or an integer 1..{MAX_DEGREE}")
    return int(value)


# ---------------------------------------------------------------------------------------------------- fit config


@dataclass(frozen=True)
class FitConfig:
    """Everything the fit stage takes besides the store; validated (and normalised) once, on construction.

    Parameters
    ----------
    methods : sequence of str, optional
        Calibration entries to fit, names of :data:`FIT_ENTRIES` (default: all).
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
    keep : int, optional
        Default number of kept tokens recorded in the artifact (default: 64, or every visual token of a store
        whose samples have fewer; an explicit value must fit the store's samples).
    created : str, optional
        ISO timestamp to record (default: now, UTC).
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

    methods: tuple[str, ...] | None = None
    shallow_layer: int | None = None
    deep_layer: int | None = None
    pore_layer: int | None = None
    degree: int | str = "auto"
    domain: str = "auto"
    pore_offset: bool | str = "auto"
    keep: int | None = None
    created: str | None = None
    seed: int = 0
    statistics: bool = True
    group_sizes: tuple[int, ...] | None = None
    n_repeats: int = 200
    consistency_threshold: float | None = None
    cv_folds: int | None = None
    n_boot: int = 200
    gaussian_sigma: str | float = "default"
    level: float = 0.95

    def __post_init__(self) -> None:
        from posbias.fitters.consistency import DEFAULT_THRESHOLD

        put = object.__setattr__
        wanted = tuple(FIT_ENTRIES) if self.methods is None else tuple(str(m) for m in self.methods)
        unknown = [m for m in wanted if m not in FIT_ENTRIES]
        if unknown or not wanted:
            raise PosbiasError(f"methods={','.join(wanted)}: unknown {unknown}; choose from {','.join(FIT_ENTRIES)}")
        put(self, "methods", wanted)
        put(self, "degree", parse_degree(self.degree))
        if self.domain not in ("auto", "index", "normalized"):
            raise PosbiasError(f"domain={self.domain!r} is not one of 'auto', 'index', 'normalized'")
        if not (self.pore_offset == "auto" or isinstance(self.pore_offset, bool)):
            raise PosbiasError(f"pore_offset={self.pore_offset!r} must be 'auto', True or False")
        if not 0.0 < float(self.level) < 1.0:
            raise PosbiasError(f"level={self.level}: a confidence level must be in (0, 1), e.g. 0.95")
        for name in ("shallow_layer", "deep_layer", "pore_layer", "keep", "cv_folds"):
            if getattr(self, name) is not None:
                put(self, name, int(getattr(self, name)))
        if self.group_sizes is not None:
            put(self, "group_sizes", tuple(int(g) for g in self.group_sizes))
        put(self, "seed", int(self.seed))
        put(self, "statistics", bool(self.statistics))
        put(self, "consistency_threshold",
            DEFAULT_THRESHOLD if self.consistency_threshold is None else float(self.consistency_threshold))


def resolve_keep(keep: int | None, store_path: str | Path) -> int:
    """The kept-token count to record: ``keep``, or 64 (at most the visual tokens of the store's samples) when
    None; refuses a value the store's samples cannot have, before anything is fitted or written."""
    from posbias.profiler.store import ProfileStore

    with ProfileStore(store_path) as st:
        most = int(st.n_visual.max()) if st.n_samples else None
    if keep is None:
        return DEFAULT_KEEP if most is None else min(DEFAULT_KEEP, most)
    if keep < 1 or (most is not None and keep > most):
        limit = f"1..{most}" if most is not None else "a positive number"
        raise PosbiasError(f"keep={keep}: the samples of {store_path} have at most {most} visual tokens; choose {limit}")
    return int(keep)


# ---------------------------------------------------------------------------------------------------- fit data


@dataclass
class FitData:
    """What the fit functions read from one store: per-token arrays over the T tokens of the S samples.

    Built once by :func:`fit`; the ``*_all`` arrays hold every token, the others only the tokens of the samples
    kept (a sample with any non-finite value in the layers used is excluded whole: fp16 overflow).
    """

    config: FitConfig
    store_path: Path
    shallow: int
    deep: int
    pore: int
    domain: str
    fixed_grid: bool
    grid: list[int] | None  # [rows, cols] of every sample, None when grids differ
    token_sample: np.ndarray  # (T,) sample of each token
    token_index: np.ndarray  # (T,) raster index of each token
    ok: np.ndarray  # (T,) bool, token of a kept sample
    keep_mask: np.ndarray  # (S,) bool, sample kept
    x_all: np.ndarray  # (T,) position in the fit's domain
    u_all: np.ndarray  # (T,) centred column coordinate
    v_all: np.ndarray  # (T,) centred row coordinate
    delta_all: np.ndarray  # (T,) A_shallow - A_deep
    attn_all: np.ndarray  # (T,) attention at the PoRe layer
    sources: list[str]
    n_used: int
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def layout_1d(self) -> str:
        return "grid" if self.fixed_grid else "bins1d"

    @property
    def x(self) -> np.ndarray:
        return self.x_all[self.ok]  # (T',)

    @property
    def groups(self) -> np.ndarray:
        return self.token_sample[self.ok]  # (T',)

    @property
    def delta(self) -> np.ndarray:
        return self.delta_all[self.ok]  # (T',)

    @property
    def mean_attn(self) -> np.ndarray:
        return self.attn_all[self.ok]  # (T',)

    @property
    def uv(self) -> np.ndarray:
        return np.stack([self.u_all[self.ok], self.v_all[self.ok]], axis=1)  # (T', 2)

    def curves(self, quantity: str, layout: str) -> Any:
        """Per-sample curves (:class:`~posbias.fitters.curves.SampleCurves`) of ``"delta"`` or ``"attn"``, built once."""
        from posbias.fitters.curves import build_sample_curves

        key = f"curves/{quantity}/{layout}"
        if key not in self._cache:
            values = {"delta": self.delta_all, "attn": self.attn_all}[quantity]
            self._cache[key] = build_sample_curves(
                values, self.token_sample, self.keep_mask, self.sources, x=self.x_all, u=self.u_all, v=self.v_all,
                layout=layout, raster_index=self.token_index if layout == "grid" else None,
                grid=(self.grid[0], self.grid[1]) if self.grid is not None else None,
            )
        return self._cache[key]

    def folds(self) -> np.ndarray:
        """(S',) fold of each kept sample for every cross-validation of the fit (one seeded assignment)."""
        from posbias.fitters.selection import DEFAULT_FOLDS, make_folds

        if "folds" not in self._cache:
            cv = self.config.cv_folds
            n_folds = min(DEFAULT_FOLDS, self.n_used) if cv is None else int(cv)
            self._cache["folds"] = make_folds(self.n_used, n_folds, self.config.seed)
        return self._cache["folds"]


@dataclass
class FitOutput:
    """What the fit functions write: calibration entries, statistics blocks and summary rows, in order."""

    methods: dict[str, Any] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def row(self, name: str, what: str, value: str) -> None:
        self.rows.append((name, what, value))


FitFunction = Callable[[FitData, FitOutput], None]


@dataclass(frozen=True)
class _Step:
    name: str
    function: FitFunction
    entry: bool  # a calibration entry (else a statistics block)
    needs: str | None = None  # the entry a statistics block reads
    preference: int = 100  # rank as the calibration's default method (lowest first)


#: calibration entries by name (the names of ``methods`` in the calibration JSON), in the order they are fitted
FIT_ENTRIES: dict[str, FitFunction] = {}
#: statistics blocks by name (run only with ``statistics=True`` and when the entry they read is fitted)
STATISTICS_BLOCKS: dict[str, FitFunction] = {}
_STEPS: list[_Step] = []  # every entry and block, in the order they run (registration order)


def fit_entry(name: str, *, preference: int = 100) -> Callable[[FitFunction], FitFunction]:
    """Register ``function(data, out)`` as the fit of calibration entry ``name``; it writes ``out.methods[name]``.

    ``preference`` ranks the entries for the calibration's default method (lowest first); an entry's default
    layer is its ``layer`` (else its ``shallow_layer``).
    """

    def register(function: FitFunction) -> FitFunction:
        if name in FIT_ENTRIES:
            raise PosbiasError(f"fit entry {name!r} is registered twice")
        FIT_ENTRIES[name] = function
        _STEPS.append(_Step(name, function, entry=True, preference=preference))
        return function

    return register


def statistics_block(name: str, *, needs: str | None = None) -> Callable[[FitFunction], FitFunction]:
    """Register ``function(data, out)`` as statistics block ``name``, run after the steps registered before it
    when statistics are asked for and (with ``needs``) that entry is fitted."""

    def register(function: FitFunction) -> FitFunction:
        if name in STATISTICS_BLOCKS:
            raise PosbiasError(f"statistics block {name!r} is registered twice")
        STATISTICS_BLOCKS[name] = function
        _STEPS.append(_Step(name, function, entry=False, needs=needs))
        return function

    return register


def _fmt_ci(est: float, lo: float, hi: float) -> str:
    return f"{est:.4g} [{lo:.4g}, {hi:.4g}]"


def _goodness(fitter: Any, data: FitData) -> dict[str, Any]:
    return {"r2": float(fitter.r2_), "rmse": float(fitter.rmse_), "n_samples": int(data.n_used)}


# ---------------------------------------------------------------------------------------------------- fit entries


@fit_entry("fastv", preference=3)
def fit_fastv(data: FitData, out: FitOutput) -> None:
    """FastV has nothing to fit: its entry records the scoring layer (the shallow layer)."""
    out.methods["fastv"] = {"layer": int(data.shallow)}


@fit_entry("posprune-pbc", preference=0)
def fit_posprune_pbc(data: FitData, out: FitOutput) -> None:
    """PosPrune's PBC polynomial of A_shallow - A_deep (degree by cross-validation), with its intervals."""
    from posbias.fitters import PolynomialBiasFitter
    from posbias.fitters.inference import polynomial_inference
    from posbias.fitters.selection import select_polynomial_degree

    cfg = data.config
    selection = None
    if cfg.statistics or cfg.degree == "auto":
        curves = data.curves("delta", data.layout_1d)
        selection = select_polynomial_degree(curves, folds=data.folds(), seed=cfg.seed)
        selection.mode = "auto" if cfg.degree == "auto" else "forced"
        out.statistics["pbc_degree"] = selection.to_dict()
    chosen = selection.chosen if cfg.degree == "auto" else int(cfg.degree)  # type: ignore[union-attr]
    pbc = PolynomialBiasFitter(degree=chosen, domain=data.domain).fit(data.x, data.delta, groups=data.groups)
    out.methods["posprune-pbc"] = {
        "shallow_layer": int(data.shallow),
        "deep_layer": int(data.deep),
        "domain": data.domain,
        "fit": pbc.to_dict(),
        "goodness": _goodness(pbc, data),
    }
    out.row("posprune-pbc", "layers (shallow - deep)", f"{data.shallow} - {data.deep}")
    if selection is not None:
        cv = ", ".join(f"{d}:{m:.3g}" for d, m in zip(selection.degrees, selection.cv_mse))
        how = f"auto ({selection.n_folds}-fold CV, 1-SE rule)" if cfg.degree == "auto" else "forced"
        out.row("posprune-pbc", "degree", f"{chosen} {how}; CV MSE {cv}")
    else:
        out.row("posprune-pbc", "degree", f"{chosen} forced")
    out.row("posprune-pbc", "domain", data.domain)
    out.row("posprune-pbc", "R^2 vs mean curve", f"{pbc.r2_:.4f}")
    out.row("posprune-pbc", "RMSE", f"{pbc.rmse_:.3e}")
    if cfg.statistics:
        inf = polynomial_inference(pbc, data.x, data.delta, data.groups, level=cfg.level)
        out.statistics["pbc_inference"] = inf.to_dict()
        width = float(np.max(np.asarray(inf.band["high"]) - np.asarray(inf.band["low"])))
        ratio = float(np.max(np.asarray(inf.se) / np.maximum(np.asarray(inf.se_iid), 1e-300)))
        out.row("posprune-pbc", f"max {int(cfg.level * 100)}% band width", f"{width:.3e} (cluster/iid SE up to {ratio:.1f}x)")


@statistics_block("consistency", needs="posprune-pbc")
def statistics_consistency(data: FitData, out: FitOutput) -> None:
    """Is the PBC bias the same in disjoint sample groups and across sources (Pearson r of group mean curves)?"""
    from posbias.fitters.consistency import bias_consistency

    cfg = data.config
    cons = bias_consistency(
        data.curves("delta", data.layout_1d), group_sizes=cfg.group_sizes, n_repeats=cfg.n_repeats,
        threshold=cfg.consistency_threshold, ci=cfg.level, seed=cfg.seed,
    )
    out.statistics["consistency"] = cons.to_dict()
    out.row("consistency", "verdict", cons.verdict)
    for c in cons.curves:
        r = c.r_median[-1]
        txt = "undefined" if not np.isfinite(r) else f"{r:.3f} [{c.r_low[-1]:.3f}, {c.r_high[-1]:.3f}]"
        out.row("consistency", f"r {c.label} (n={c.group_sizes[-1]})", f"{txt} -> {c.verdict}")
    if cons.settle:
        out.row("consistency", "to settle", cons.settle)


@statistics_block("bias_map", needs="posprune-pbc")
def statistics_bias_map(data: FitData, out: FitOutput) -> None:
    """1-D curve against 2-D bias map (held-out error); a 2-D surface entry ``posprune-pbc-2d`` when it wins."""
    from posbias.fitters.surface import SurfaceBiasFitter, best_surface_params, compare_bias_maps

    cmp_ = compare_bias_maps(data.curves("delta", "grid" if data.fixed_grid else "bins2d"), folds=data.folds(),
                             seed=data.config.seed)
    out.statistics["bias_map"] = cmp_.to_dict()
    out.row("bias-map", "held-out best 1-D / 2-D", f"{cmp_.best_1d} / {cmp_.best_2d} -> keep {cmp_.chosen}")
    params = best_surface_params(cmp_)
    if cmp_.chosen == "2d" and params is not None:
        surf = SurfaceBiasFitter(kind=params[0], degree=params[1]).fit(data.uv, data.delta, groups=data.groups)
        out.methods["posprune-pbc-2d"] = {
            "shallow_layer": int(data.shallow),
            "deep_layer": int(data.deep),
            "coords": "centred",
            "grid": data.grid,
            "fit": surf.to_dict(),
            "goodness": _goodness(surf, data),
        }
        out.row("bias-map", "2-D surface R^2", f"{surf.r2_:.4f} ({params[0]}, degree {params[1]})")


@fit_entry("pore", preference=1)
def fit_pore(data: FitData, out: FitOutput) -> None:
    """PoRe's exponential of the mean attention (pure or offset form), with bootstrap intervals."""
    from posbias.fitters import ExponentialBiasFitter
    from posbias.fitters.exponential import select_exponential_form
    from posbias.fitters.inference import exponential_inference

    cfg = data.config
    x, mean_attn, groups = data.x, data.mean_attn, data.groups
    attn_curves = data.curves("attn", data.layout_1d) if (cfg.statistics or cfg.pore_offset == "auto") else None
    form: dict[str, Any] = {"mode": "forced" if cfg.pore_offset != "auto" else "auto"}
    if cfg.pore_offset == "auto":
        form.update(select_exponential_form(attn_curves, data.folds(), domain=data.domain))
        offset = form["chosen"] == "offset"
    else:
        offset = bool(cfg.pore_offset)
        form["chosen"] = "offset" if offset else "pure"
    exp_fit = ExponentialBiasFitter(offset=offset, domain=data.domain).fit(x, mean_attn, groups=groups)
    try:  # the other form, for the report's side-by-side curves
        other = ExponentialBiasFitter(offset=not offset, domain=data.domain).fit(x, mean_attn, groups=groups)
        form["other"] = other.to_dict()
    except PosbiasError:
        form["other"] = None
    out.methods["pore"] = {
        "layer": int(data.pore),
        "domain": data.domain,
        "fit": exp_fit.to_dict(),
        "goodness": _goodness(exp_fit, data),
        "form": form,
    }
    out.row("pore", "layer", str(data.pore))
    if form["mode"] == "auto":
        mse = ", ".join(f"{n}:{v:.3g}" if v is not None else f"{n}:failed" for n, v in zip(form["forms"], form["cv_mse"]))
        out.row("pore", "form", f"{form['chosen']} (held-out MSE {mse}; pure unless the offset beats it by more than one SE)")
    else:
        out.row("pore", "form", f"{form['chosen']} (forced)")
    out.row("pore", "P(x)", f"a={exp_fit.a_:.4g} b={exp_fit.b_:.4g} c={exp_fit.c_:.4g}")
    out.row("pore", "R^2 vs mean curve", f"{exp_fit.r2_:.4f}")
    if cfg.statistics:
        einf = exponential_inference(exp_fit, attn_curves, n_boot=cfg.n_boot, level=cfg.level, seed=cfg.seed)
        out.statistics["pore_inference"] = einf.to_dict()
        p = einf.params
        pct = int(round(cfg.level * 100))
        out.row("pore", f"b {pct}% CI (bootstrap {einf.n_boot}, {einf.n_failed} failed)",
                _fmt_ci(p["b"]["estimate"], p["b"]["low"], p["b"]["high"]))


@fit_entry("adaptprune-gaussian", preference=2)
def fit_adaptprune_gaussian(data: FitData, out: FitOutput) -> None:
    """AdaptPrune's Gaussian centre weight on the mean attention map (its released sigma, or fitted)."""
    from posbias.fitters.gaussian import GaussianCentreFitter

    sigma = data.config.gaussian_sigma
    gfit = GaussianCentreFitter(sigma=sigma).fit(data.uv, data.mean_attn, groups=data.groups)
    entry: dict[str, Any] = {
        "layer": int(data.pore),
        "grid": data.grid,
        "coords": "u, v = linspace(-1, 1, rows), linspace(-1, 1, cols)",
        "fit": gfit.to_dict(),
        "goodness": _goodness(gfit, data),
    }
    if data.grid is not None:
        grid = (data.grid[0], data.grid[1])
        entry["sigma_patches"] = list(gfit.sigma_patches(grid))
        entry["mask"] = [float(v) for v in gfit.mask(grid).ravel()]
    out.methods["adaptprune-gaussian"] = entry
    out.row("adaptprune-gaussian", "sigma (centred units)",
            f"{gfit.sigma_:.3g} ({sigma}); centre peak: {'yes' if gfit.centre_peak_ else 'no'}")
    out.row("adaptprune-gaussian", "R^2 fitted / AdaptPrune's sigma", f"{gfit.r2_:.4f} / {gfit.r2_default_:.4f}")


@statistics_block("density")
def statistics_density(data: FitData, out: FitOutput) -> None:
    """Centre against edge semantic density (region log-determinants), when the store holds them."""
    from posbias.fitters.density import NOT_PROFILED, density_test, read_region_density

    region = read_region_density(data.store_path, np.flatnonzero(data.keep_mask))
    if region is None:
        out.statistics["density"] = {"status": "not profiled", "message": NOT_PROFILED}
        out.row("density", "centre vs edge entropy", NOT_PROFILED)
    else:
        dres = density_test(region[0], region[1], level=data.config.level)
        out.statistics["density"] = dres.to_dict()
        out.row("density", "centre vs edge entropy", dres.message)


#: the calibration entries shipped with posbias (fastv has nothing to fit; it only records its layer)
FIT_METHODS: tuple[str, ...] = tuple(FIT_ENTRIES)


# ---------------------------------------------------------------------------------------------------- fit stage


@dataclass
class FitResult:
    """A fitted calibration and the numbers worth printing about it."""

    calibration: Any  # posbias.artifacts.Calibration
    rows: list[tuple[str, str, str]]  # (method, what, value) summary lines
    n_excluded_samples: int
    statistics: dict[str, Any] = field(default_factory=dict)  # the calibration's "statistics" section


def _read_fit_data(store_path: Path, config: FitConfig) -> tuple[FitData, dict[str, Any]]:
    """(the fit data of a store, what the calibration records about the store and model)."""
    from posbias.fitters.curves import centred_coords, token_geometry
    from posbias.profiler.store import ProfileStore

    with ProfileStore(store_path) as store:
        n_layers = store.n_layers
        d_shallow, d_deep = default_layers(n_layers)
        shallow = d_shallow if config.shallow_layer is None else config.shallow_layer
        deep = d_deep if config.deep_layer is None else config.deep_layer
        pore = shallow if config.pore_layer is None else config.pore_layer
        for name, value in (("shallow_layer", shallow), ("deep_layer", deep), ("pore_layer", pore)):
            _check_layer(name, value, n_layers)
        if shallow == deep:
            raise PosbiasError(f"shallow_layer and deep_layer are both {shallow}; PBC needs two different layers")
        if store.n_samples < 2:
            raise PosbiasError(f"store {store_path} holds {store.n_samples} sample(s); fitting needs at least 2: profile more samples")
        grids = np.asarray(store.grids)  # (S, 2)
        multi_tile = bool(store.multi_tile)  # any-resolution layouts (LLaVA-NeXT, InternVL): no one raster grid
        fixed_grid = bool(np.all(grids == grids[0])) and not multi_tile
        domain = ("index" if fixed_grid else "normalized") if config.domain == "auto" else config.domain
        if domain == "index" and not fixed_grid:
            raise PosbiasError(f"store {store_path} mixes visual grids; the raster-index domain needs one grid: use domain='normalized'")
        used_layers = sorted({shallow, deep, pore})
        attn = store.layers(used_layers)  # (T, k) float32
        cols = {layer: j for j, layer in enumerate(used_layers)}
        token_sample = store.token_sample()  # (T,)
        token_index, tok_grid, cand = token_geometry(store)  # (T,), (T, 2), (T,)
        tok_rows, tok_cols = np.asarray(store.rows), np.asarray(store.cols)  # (T,) each
        if not cand.all():  # separators (any-resolution layouts) are never pruning candidates: not fitted
            attn, token_sample, token_index = attn[cand], token_sample[cand], token_index[cand]
            tok_rows, tok_cols, tok_grid = tok_rows[cand], tok_cols[cand], tok_grid[cand]
        token_n = np.asarray(store.n_visual)[token_sample]  # (T,)
        # a sample with any non-finite value in the layers used is excluded whole (fp16 overflow)
        bad_token = ~np.all(np.isfinite(attn), axis=1)  # (T,)
        bad_sample = np.zeros(store.n_samples, dtype=bool)  # (S,)
        bad_sample[token_sample[bad_token]] = True
        n_excluded = int(bad_sample.sum())
        if store.n_samples - n_excluded < 2:
            raise PosbiasError(
                f"store {store_path}: {n_excluded} of {store.n_samples} samples have NaN/inf attention at layers "
                f"{used_layers}; re-profile in float32"
            )
        u_all, v_all = centred_coords(tok_rows, tok_cols, tok_grid[:, 0], tok_grid[:, 1])  # (T,) each, own tile
        data = FitData(
            config=config, store_path=store_path, shallow=shallow, deep=deep, pore=pore, domain=domain,
            fixed_grid=fixed_grid, grid=[int(grids[0, 0]), int(grids[0, 1])] if fixed_grid else None,
            token_sample=token_sample, token_index=token_index, ok=~bad_sample[token_sample], keep_mask=~bad_sample,
            x_all=positions_for_domain(token_index, token_n, domain), u_all=u_all, v_all=v_all,
            delta_all=attn[:, cols[shallow]].astype(np.float64) - attn[:, cols[deep]].astype(np.float64),
            attn_all=attn[:, cols[pore]].astype(np.float64), sources=list(store.sources),
            n_used=int(store.n_samples - n_excluded),
        )
        attrs = store.attrs
        about = {
            "model": {
                "id": str(attrs["model_id"]),
                "revision": str(attrs["model_revision"]) if attrs.get("model_revision") else None,
                "fingerprint": str(attrs["model_fingerprint"]),
                "adapter": str(attrs["adapter"]),
                "n_layers": int(n_layers),
                "rope_dims": int(attrs["rope_dims"]),
                "grid": data.grid,
            },
            "store": {
                "file": Path(store_path).name,
                "n_samples": int(store.n_samples),
                "n_skipped": int(len(store.skipped())),
                "sources": {str(k): int(v) for k, v in sorted(store.sources_count().items())},
                "seed": int(attrs["seed"]),
            },
            "excluded_ids": [store.sample_ids[i] for i in np.flatnonzero(bad_sample)],
            "used_layers": used_layers,
        }
    return data, about


def fit(store_path: str | Path, config: FitConfig | None = None) -> FitResult:
    """Fit the calibration entries of ``config.methods`` (and their statistics) on a store; return the calibration.

    Runs every registered entry and statistics block in registration order (:data:`FIT_ENTRIES`,
    :data:`STATISTICS_BLOCKS`), then records the store, the model and the default method.
    """
    import posbias
    from posbias.artifacts import Calibration
    from posbias.artifacts.calibration import SCHEMA_VERSION, utc_now
    from posbias.artifacts.quality import assess_methods

    config = FitConfig() if config is None else config
    store_path = Path(store_path)
    keep = resolve_keep(config.keep, store_path)
    data, about = _read_fit_data(store_path, config)
    out = FitOutput()
    for step in _STEPS:
        if step.entry and step.name in config.methods:
            step.function(data, out)
        elif not step.entry and config.statistics and (step.needs is None or step.needs in config.methods):
            step.function(data, out)
    n_samples, n_skipped = about["store"]["n_samples"], about["store"]["n_skipped"]
    n_excluded = n_samples - data.n_used
    if config.statistics:
        out.statistics["seed"] = config.seed
        out.statistics["level"] = float(config.level)
        out.statistics["samples"] = {
            "used": int(data.n_used),
            "excluded_non_finite": int(n_excluded),
            "excluded_ids": about["excluded_ids"][:100],
            "layers_checked": [int(v) for v in about["used_layers"]],
        }
    rank = {s.name: s.preference for s in _STEPS if s.entry}
    default_method = min((m for m in out.methods if m in rank), key=lambda m: rank[m])
    default_entry = out.methods[default_method]
    doc: dict[str, Any] = {
        "schema": "posbias.calibration",
        "schema_version": SCHEMA_VERSION,
        "created": config.created or utc_now(),
        "posbias_version": posbias.__version__,
        "model": about["model"],
        "store": about["store"],
        "methods": out.methods,
        "defaults": {"method": default_method, "layer": int(default_entry.get("layer", default_entry.get("shallow_layer"))),
                     "keep": int(keep)},
    }
    if out.statistics:
        doc["statistics"] = out.statistics
    assess_methods(out.methods, out.statistics)
    calibration = Calibration.from_dict(doc)
    out.row("store", "samples used / excluded (NaN/inf) / skipped", f"{data.n_used} / {n_excluded} / {n_skipped}")
    return FitResult(calibration=calibration, rows=out.rows, n_excluded_samples=n_excluded, statistics=out.statistics)


def fit_calibration(store_path: str | Path, config: FitConfig | None = None, **options: Any) -> FitResult:
    """:func:`fit` with the :class:`FitConfig` fields as keyword arguments (``config`` and ``options`` merged)."""
    import dataclasses

    if options:
        config = dataclasses.replace(config, **options) if config is not None else FitConfig(**options)
    return fit(store_path, config)


# ---------------------------------------------------------------------------------------------------- profile stage

#: folder of the per-rank stores of a sharded (torchrun) run, inside the run's folder
SHARDS_DIRNAME = "shards"
#: samples profiled when neither ``n`` nor a quota on every source is given
DEFAULT_N = 32


@dataclass(frozen=True)
class ProfileConfig:
    """What the profile stage takes besides the output folder.

    Parameters
    ----------
    model : str
        Model alias, hub id or local checkpoint folder (:func:`posbias.models.load_adapter`).
    device, dtype : str
        Torch device and weights dtype.
    data : sequence of str
        Sample sources ``NAME[:PATH][@N]`` (:mod:`posbias.data.registry`).
    n : int, optional
        Samples to profile (default 32, or the sum of the quotas when every source has one).
    seed : int
        Seed of the deterministic subsample (recorded in the store).
    signals : str
        ``"all"``, ``"attn"`` or a comma list of optional signals (docs/store.md).
    per_head : bool
        Also store per-head attention rows.
    region_grid : int
        n of the n x n region grid of ``region_logdet``.
    resume, overwrite : bool
        Continue the store in the folder / replace it (not both).
    progress, verbose : bool
        Progress bar; a line per committed sample.
    """

    model: str = "demo-llava"
    device: str = "cpu"
    dtype: str = "float32"
    data: tuple[str, ...] = ("embedded",)
    n: int | None = None
    seed: int = 0
    signals: str = "all"
    per_head: bool = False
    region_grid: int = 6
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    verbose: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", tuple(str(d) for d in self.data) or ("embedded",))
        if self.n is not None and int(self.n) < 1:
            raise PosbiasError(f"n={self.n}: the number of samples must be at least 1")
        if self.resume and self.overwrite:
            raise PosbiasError("resume=True and overwrite=True contradict each other; choose one of them")


def _sample_stream(config: ProfileConfig) -> Any:
    """The sample stream of ``config``; validates the sources before any model loads."""
    from posbias.data.registry import iter_samples, resolve_with_quotas, split_quotas

    specs, quotas = split_quotas(list(config.data))
    n = config.n
    if n is None:
        n = None if quotas is not None and all(q is not None for q in quotas) else DEFAULT_N
    sources, quotas = resolve_with_quotas(specs, quotas)
    return iter_samples(sources, n=n, seed=config.seed, quotas=quotas)


def _capture(config: ProfileConfig, adapter: Any) -> Any | None:
    """The capture object for the requested signals (None: plain last-token attention)."""
    signals = str(config.signals or "attn")
    if signals.strip() in ("", "attn") and not config.per_head:
        return None
    from posbias.profiler.signals import SignalCapture

    return SignalCapture(adapter, signals=signals, per_head=bool(config.per_head), region_grid=int(config.region_grid))


def _print_summary(summary: Any, store_path: Path, echo: Callable[..., None]) -> None:
    echo(
        f"profiled {summary.n_profiled} samples in {summary.seconds:.1f} s "
        f"({summary.samples_per_second:.2f} samples/s) -> {store_path}"
        + (f" (resumed: {summary.n_resumed} already stored)" if summary.n_resumed else "")
    )
    if summary.skipped:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(summary.skip_reasons().items()))
        echo(f"skipped {len(summary.skipped)} sample(s) ({kinds}):")
        for sid, reason in summary.skipped:
            echo(f"  {sid}: {reason}")
    if summary.non_finite_samples:
        echo(f"warning: {summary.non_finite_samples} sample(s) have NaN/inf attention (fp16 overflow?); fits exclude them")


def profile(config: ProfileConfig, out_dir: str | Path, *, echo: Callable[..., None] = print) -> Path:
    """Load the model and samples of ``config`` and profile them into ``out_dir``/profile.h5; return its path.

    With ``config.resume`` the run continues the store in ``out_dir``. Under torchrun (``WORLD_SIZE`` > 1)
    each rank profiles its shard into ``out_dir/shards/rankR.h5`` and rank 0 merges them. ``echo`` prints the
    progress lines.
    """
    import shutil

    from posbias.atomic import check_writable, ensure_folder
    from posbias.models import load_adapter
    from posbias.profiler.run import dist_info, profile_samples
    from posbias.profiler.store import store_exists

    out_dir = Path(out_dir)
    stream = _sample_stream(config)
    info = dist_info()
    store_path = out_dir / STORE_FILENAME
    if info.distributed:
        return _profile_sharded(config, out_dir, stream, info, echo)
    if (out_dir / SHARDS_DIRNAME).is_dir() and not config.overwrite:
        raise PosbiasError(
            f"{out_dir} holds the shards of an unfinished torchrun run; resume it under torchrun, merge them "
            f"('profile-bias merge {out_dir}/{SHARDS_DIRNAME} --out {out_dir}') or start again (overwrite=True)"
        )
    if store_exists(store_path) and not config.resume and not config.overwrite:
        raise PosbiasError(f"{out_dir} holds an interrupted or finished run; continue it (resume=True) or start again (overwrite=True)")
    if config.overwrite and (out_dir / SHARDS_DIRNAME).is_dir():
        shutil.rmtree(out_dir / SHARDS_DIRNAME)
    if out_dir.is_dir():
        check_writable(out_dir)  # a read-only or full folder is found before the model loads
    adapter = load_adapter(config.model, device=config.device, dtype=config.dtype)
    # created only now, so a bad option or model leaves no empty folder behind; machine faults are one line
    check_writable(ensure_folder(out_dir, create=True))
    echo(f"profiling {len(stream)} sample(s) of {config.model} into {store_path} (the bar shows the time per sample "
         "and the time left; Ctrl-C stops, --resume continues)", flush=True)
    summary = profile_samples(
        adapter,
        stream,
        store_path,
        seed=config.seed,
        total=len(stream),
        overwrite=True,
        resume=config.resume,
        progress=config.progress,
        extra_attrs={"n_requested": int(len(stream)), "data": ",".join(config.data)},
        capture=_capture(config, adapter),
        on_sample=(lambda sid: echo(f"committed {sid}", flush=True)) if config.verbose else None,
    )
    _print_summary(summary, store_path, echo)
    return store_path


def _profile_sharded(config: ProfileConfig, out_dir: Path, stream: Any, info: Any, echo: Callable[..., None]) -> Path:
    import shutil

    from posbias.data.registry import SampleStream
    from posbias.models import load_adapter
    from posbias.profiler.run import distributed_context, profile_samples, shard_items
    from posbias.profiler.store import ProfileStore, merge_stores, remove_store, store_exists

    store_path = out_dir / STORE_FILENAME
    shard_dir = out_dir / SHARDS_DIRNAME
    shard_paths = sorted(shard_dir.glob("rank*.h5")) if shard_dir.is_dir() else []
    existing = store_exists(store_path) or any(store_exists(p) for p in shard_paths)
    # every rank checks the same files, so every rank fails the same way (nobody waits at a barrier)
    if existing and not config.resume and not config.overwrite:
        raise PosbiasError(f"{out_dir} holds an interrupted or finished run; continue it (resume=True) or start again (overwrite=True)")
    plan_ids = stream.ids
    device = f"cuda:{info.local_rank}" if str(config.device) == "cuda" else str(config.device)
    with distributed_context(info) as barrier:
        done: set[str] = set()
        if config.resume:
            for p in [store_path, *shard_paths]:
                if store_exists(p):
                    with ProfileStore(p) as st:
                        done |= set(st.sample_ids) | {row[0] for row in st.skipped()}
        barrier()  # everyone has read the old state before anyone writes or deletes
        if config.overwrite and info.rank == 0:
            remove_store(store_path)
            if shard_dir.is_dir():
                shutil.rmtree(shard_dir)
        barrier()
        remaining = [(src, i) for src, i in stream.plan if src.sample_id(i) not in done]
        mine = SampleStream(shard_items(remaining, info.rank, info.world_size))
        my_store = shard_dir / f"rank{info.rank:03d}.h5"
        shard_dir.mkdir(parents=True, exist_ok=True)
        adapter = load_adapter(config.model, device=device, dtype=config.dtype)
        summary = profile_samples(
            adapter,
            mine,
            my_store,
            seed=config.seed,
            total=len(mine),
            overwrite=not config.resume,
            resume=config.resume,
            progress=config.progress and info.rank == 0,
            extra_attrs={
                "n_requested": int(len(plan_ids)),
                "data": ",".join(config.data),
                "shard_rank": info.rank,
                "shard_world_size": info.world_size,
            },
            capture=_capture(config, adapter),
        )
        echo(f"[rank {info.rank}/{info.world_size}] ", end="")
        _print_summary(summary, my_store, echo)
        barrier()  # every shard is compacted
        if info.rank == 0:
            inputs = sorted(shard_dir.glob("rank*.h5"))
            if store_exists(store_path):
                inputs = [store_path, *inputs]
            merge_stores(inputs, store_path, order=plan_ids, dedupe=True, overwrite=True)
            for p in sorted(shard_dir.glob("rank*.h5")):
                remove_store(p)
            shutil.rmtree(shard_dir, ignore_errors=True)
            with ProfileStore(store_path) as st:
                echo(f"merged {len(inputs)} store(s): {st.n_samples} samples, {len(st.skipped())} skipped -> {store_path}")
        barrier()
    return store_path


# ---------------------------------------------------------------------------------------------------- report stage


@dataclass(frozen=True)
class ReportConfig:
    """What the report stage takes: which files to write (names inside the run folder) and what else to show."""

    html: str | None = REPORT_FILENAME
    pdf: str | None = PDF_FILENAME
    evaluation: str | None = None  # evaluation JSON (profile-bias evaluate) for the fidelity section
    n_pictures: int = 3

    def __post_init__(self) -> None:
        if self.html is None and self.pdf is None:
            raise PosbiasError("nothing to write: give an html and/or a pdf file name")


def report(store_path: str | Path, calibration_path: str | Path, out_dir: str | Path,
           config: ReportConfig | None = None) -> tuple[Path | None, Path | None]:
    """Write the report of a store and its calibration into ``out_dir``; return (html path, pdf path)."""
    from posbias.reports.html import render_report

    config = ReportConfig() if config is None else config
    out_dir = Path(out_dir)
    html = out_dir / config.html if config.html is not None else None
    pdf = out_dir / config.pdf if config.pdf is not None else None
    written = render_report(store_path, calibration_path, html, pdf=pdf, evaluation=config.evaluation,
                            n_pictures=config.n_pictures)
    return (written if html is not None else None), pdf


# ---------------------------------------------------------------------------------------------------- the pipeline


@dataclass
class PipelineResult:
    """The files of one run and the fit's summary."""

    out_dir: Path
    store: Path
    calibration: Path
    fit: FitResult
    html: Path | None
    pdf: Path | None


def run_pipeline(
    out_dir: str | Path,
    profile_config: ProfileConfig | None = None,
    fit_config: FitConfig | None = None,
    report_config: ReportConfig | None = None,
    *,
    echo: Callable[..., None] = print,
    on_fit: Callable[[FitResult, Path], None] | None = None,
) -> PipelineResult:
    """Profile -> fit -> report into one folder: ``profile.h5``, ``posbias_calibration.json``, ``report.html``/``.pdf``.

    ``echo`` prints the profile stage's progress lines; ``on_fit(result, calibration_path)`` is called once the
    calibration is written (the CLI prints its verdicts and table there). A failed profile stage that leaves
    the folder empty removes the folders it created.
    """
    from posbias.artifacts import CALIBRATION_FILENAME

    profile_config = ProfileConfig() if profile_config is None else profile_config
    fit_config = FitConfig() if fit_config is None else fit_config
    report_config = ReportConfig() if report_config is None else report_config
    out_dir = Path(out_dir)
    with removing_empty_dir(out_dir):
        store = profile(profile_config, out_dir, echo=echo)
    result = fit(store, fit_config)
    calibration = out_dir / CALIBRATION_FILENAME
    result.calibration.save(calibration)
    if on_fit is not None:
        on_fit(result, calibration)
    html, pdf = report(store, calibration, out_dir, report_config)
    return PipelineResult(out_dir=out_dir, store=store, calibration=calibration, fit=result, html=html, pdf=pdf)


@contextlib.contextmanager
def removing_empty_dir(path: str | Path) -> Iterator[None]:
    """Remove ``path`` (and the parents created with it) if the block fails and leaves them empty.

    A failed run then leaves no empty output folder behind; a folder that existed before, or that holds
    anything (a partial store to resume), is kept.
    """
    created: list[Path] = []
    p = Path(path).absolute()
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        yield
    except BaseException:
        for q in created:  # innermost first
            try:
                q.rmdir()  # only succeeds when empty
            except OSError:
                break
        raise
