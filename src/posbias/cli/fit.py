"""``profile-bias fit``: fit the bias curves of a store into a calibration JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from posbias.cli.common import add_fit_options, print_table

__all__ = ["add_parser", "run", "run_fit"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit",
        help="fit bias curves from a store into a calibration JSON",
        description="Fit PosPrune's PBC polynomial and PoRe's exponential on a profile store and write the "
        "calibration artifact (format: docs/calibration.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--store", required=True, help="profile store written by 'profile-bias profile'")
    p.add_argument("--out", required=True, help="calibration JSON to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing calibration file")
    add_fit_options(p)
    p.set_defaults(func=run)


def run_fit(args: argparse.Namespace, store: Path, out: Path) -> Path:
    from posbias.pipeline import fit_calibration

    result = fit_calibration(
        store,
        shallow_layer=args.shallow_layer,
        deep_layer=args.deep_layer,
        pore_layer=args.pore_layer,
        degree=args.degree,
        domain=args.domain,
        pore_offset=not args.pure_exponential,
        keep=args.keep,
    )
    result.calibration.save(out)
    print_table(result.rows, ("method", "quantity", "value"))
    print(f"calibration -> {out}")
    return out


def run(args: argparse.Namespace) -> int:
    from posbias.errors import PosbiasError

    store, out = Path(args.store), Path(args.out)
    if not store.is_file():
        raise PosbiasError(f"--store {store} does not exist; run 'profile-bias profile' first or pass the right path")
    if out.exists() and not args.overwrite:
        raise PosbiasError(f"--out {out} exists; pass --overwrite to replace it or choose another path")
    run_fit(args, store, out)
    return 0
