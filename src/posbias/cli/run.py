"""``profile-bias`` with no subcommand: the whole pipeline, profile -> fit -> report."""

from __future__ import annotations

import argparse
import time

from posbias.cli.common import add_fit_options, check_out_dir, default_out, removing_empty_dir

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from posbias.cli import profile

    profile.add_arguments(p)
    for action in p._actions:
        if action.dest == "out":
            action.help = "output folder of the run (default: runs/<model alias or folder name>, e.g. runs/demo-llava)"
    add_fit_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from posbias.artifacts import CALIBRATION_FILENAME
    from posbias.cli.fit import run_fit
    from posbias.cli.profile import run_profile
    from posbias.pipeline import REPORT_FILENAME, STORE_FILENAME
    from posbias.reports.html import render_report

    start = time.perf_counter()
    pdf_name = "report.pdf"
    if args.out is None:
        args.out = default_out(args.model)
    out_dir = check_out_dir(
        args.out, [STORE_FILENAME, CALIBRATION_FILENAME, REPORT_FILENAME, pdf_name], args.overwrite or args.resume
    )
    with removing_empty_dir(out_dir):
        store = run_profile(args, out_dir)
    calibration = run_fit(args, store, out_dir / CALIBRATION_FILENAME)
    report = render_report(store, calibration, out_dir / REPORT_FILENAME, pdf=out_dir / pdf_name)
    print(f"report -> {report} and {out_dir / pdf_name}")
    names = ", ".join([STORE_FILENAME, CALIBRATION_FILENAME, REPORT_FILENAME, pdf_name])
    print(f"done in {time.perf_counter() - start:.1f} s; everything is in {out_dir}/: {names} (open {report} in a browser)")
    return 0
