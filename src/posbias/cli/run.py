"""``profile-bias`` with no subcommand: the whole pipeline, profile -> fit -> report (:func:`posbias.pipeline.run_pipeline`)."""

from __future__ import annotations

import argparse
import time

from posbias.cli.common import add_fit_options, check_out_dir, default_out

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
    from posbias.cli.fit import fit_config, print_fit
    from posbias.cli.profile import profile_config
    from posbias.pipeline import PDF_FILENAME, REPORT_FILENAME, STORE_FILENAME, ReportConfig, run_pipeline

    start = time.perf_counter()
    if args.out is None:
        args.out = default_out(args.model)
    out_dir = check_out_dir(
        args.out, [STORE_FILENAME, CALIBRATION_FILENAME, REPORT_FILENAME, PDF_FILENAME], args.overwrite or args.resume
    )
    result = run_pipeline(out_dir, profile_config(args), fit_config(args), ReportConfig(), on_fit=print_fit)
    print(f"report -> {result.html} and {result.pdf}")
    names = ", ".join([STORE_FILENAME, CALIBRATION_FILENAME, REPORT_FILENAME, PDF_FILENAME])
    print(f"done in {time.perf_counter() - start:.1f} s; everything is in {out_dir}/: {names} (open {result.html} in a browser)")
    return 0
