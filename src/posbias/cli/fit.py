"""``profile-bias fit``: fit the bias curves of a store into a calibration JSON and print its statistics."""

from __future__ import annotations

import argparse
from pathlib import Path

from posbias.cli.common import HelpFormatter, add_fit_options, print_table, refuse_existing
from posbias.pipeline import FitConfig, FitResult, fit

__all__ = ["add_parser", "run", "run_fit", "fit_config", "print_fit"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit",
        help="fit bias curves from a store into a calibration JSON",
        description="Fit PosPrune's PBC polynomial (degree by cross-validation), PoRe's exponential and "
        "AdaptPrune's Gaussian centre weight on a profile store, test the bias for consistency across sample "
        "groups and sources, compare 1-D curves with 2-D bias maps, and write the calibration artifact with "
        "its statistics (format: docs/calibration.md; statistics: docs/statistics.md).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--store", required=True, help="profile store written by 'profile-bias profile'")
    p.add_argument("--out", required=True, help="calibration JSON to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing calibration file")
    p.add_argument("--seed", type=int, default=0, help="seed of the random splits, CV folds and bootstrap")
    add_fit_options(p)
    p.set_defaults(func=run)


def fit_config(args: argparse.Namespace) -> FitConfig:
    """The fit stage's options parsed from the command line."""
    pure = args.pure_exponential or args.pore_form == "pure"
    return FitConfig(
        methods=args.methods,
        shallow_layer=args.shallow_layer,
        deep_layer=args.deep_layer,
        pore_layer=args.pore_layer,
        degree=args.degree,
        domain=args.domain,
        pore_offset="auto" if args.pore_form == "auto" and not pure else args.pore_form == "offset" and not pure,
        keep=args.keep,
        seed=getattr(args, "seed", 0),
        statistics=not args.no_stats,
        group_sizes=args.group_sizes,
        n_repeats=args.n_repeats,
        consistency_threshold=args.consistency_threshold,
        cv_folds=args.cv_folds,
        n_boot=args.n_boot,
        gaussian_sigma=args.gaussian_sigma,
        level=args.level,
    )


def print_fit(result: FitResult, out: Path) -> None:
    """The quality verdicts, the summary table and where the calibration went."""
    print_verdicts(result.calibration.methods)
    print()
    print_table(result.rows, ("method", "quantity", "value"))
    print(f"calibration -> {out}")


def run_fit(args: argparse.Namespace, store: Path, out: Path) -> Path:
    result = fit(store, fit_config(args))
    result.calibration.save(out)
    print_fit(result, out)
    return out


def print_verdicts(methods: dict) -> None:
    """The quality verdict of every fitted entry, one line each (docs/calibration.md, quality)."""
    from posbias.artifacts.quality import quality_of

    rows = [(name, *quality_of(entry)) for name, entry in methods.items() if entry.get("quality")]
    if rows:
        print("quality of the fitted curves (good: use it; weak: usable with care; unusable: the runtime refuses it):")
        print_table(rows, ("method", "verdict", "why"))


def run(args: argparse.Namespace) -> int:
    from posbias.errors import PosbiasError

    from posbias.profiler.store import store_exists

    store, out = Path(args.store), Path(args.out)
    if not store_exists(store):  # a finished store, or the segments of an interrupted run
        raise PosbiasError(f"--store {store} does not exist; run 'profile-bias profile' first or pass the right path")
    if out.is_dir():
        from posbias.artifacts import CALIBRATION_FILENAME

        out = out / CALIBRATION_FILENAME
    refuse_existing([("--out", out)], args.overwrite)
    run_fit(args, store, out)
    return 0
