"""``profile-bias report``: render the HTML report of a store and its calibration."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="render the HTML report",
        description="Render a self-contained HTML report (figures embedded, no scripts) from a store and the "
        "calibration fitted on it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--store", required=True, help="profile store")
    p.add_argument("--calibration", required=True, help="calibration JSON fitted on that store")
    p.add_argument("--html", required=True, help="HTML file to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from posbias.errors import PosbiasError
    from posbias.reports.html import render_report

    for flag, value in (("--store", args.store), ("--calibration", args.calibration)):
        if not Path(value).is_file():
            raise PosbiasError(f"{flag} {value} does not exist; pass the path of an existing file")
    out = render_report(args.store, args.calibration, args.html)
    print(f"report -> {out}")
    return 0
