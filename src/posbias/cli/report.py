"""``profile-bias report``: render the HTML and/or PDF report of a store, its calibration and an evaluation."""

from __future__ import annotations

import argparse

from posbias.cli.common import HelpFormatter
import time
from pathlib import Path

from posbias.cli.common import refuse_existing

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="render the HTML and PDF report",
        description="Render a self-contained HTML report (figures embedded, no scripts, no network) and/or a "
        "multi-page PDF with the same sections, from a store, the calibration fitted on it and optionally an "
        "evaluation JSON. Sections whose data are missing say which command produces them.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--store", required=True, help="profile store (profile.h5)")
    p.add_argument("--calibration", required=True, help="calibration JSON fitted on that store")
    p.add_argument("--evaluation", default=None, help="evaluation JSON from profile-bias evaluate (fidelity section)")
    p.add_argument("--html", default=None, help="HTML file to write")
    p.add_argument("--pdf", default=None, help="PDF file to write")
    p.add_argument("--overwrite", action="store_true", help="replace existing report files")
    p.add_argument("--pictures", type=int, default=3, help="number of store samples drawn with their kept tokens")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from posbias.errors import PosbiasError
    from posbias.reports.html import render_report

    for flag, value in (("--store", args.store), ("--calibration", args.calibration), ("--evaluation", args.evaluation)):
        if value is not None and not Path(value).is_file():
            raise PosbiasError(f"{flag} {value} does not exist; pass the path of an existing file")
    if args.html is None and args.pdf is None:
        raise PosbiasError("nothing to write: pass --html report.html and/or --pdf report.pdf")
    if not 0 <= args.pictures <= 12:
        raise PosbiasError(f"--pictures {args.pictures}: choose 0..12 samples")
    if args.html is not None and args.pdf is not None and Path(args.html).resolve() == Path(args.pdf).resolve():
        raise PosbiasError(f"--html and --pdf name the same file {args.html}; pass two paths")
    refuse_existing([("--html", args.html), ("--pdf", args.pdf)], args.overwrite)
    start = time.perf_counter()
    render_report(args.store, args.calibration, args.html, pdf=args.pdf, evaluation=args.evaluation, n_pictures=args.pictures)
    for label, path in (("html", args.html), ("pdf", args.pdf)):
        if path is not None:
            print(f"report ({label}) -> {path}")
    print(f"report written in {time.perf_counter() - start:.1f} s")
    return 0
