"""``profile-bias``: the command line. Thin: parse, call the library, print.

``profile-bias [options]`` with no subcommand runs the whole pipeline (profile -> fit -> report);
``profile-bias {profile,fit,export,report} ...`` runs one stage on files from the others.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from posbias.errors import PosbiasError

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

#: import names of the ``posbias[profile]`` extra (the runtime-only install has none of these)
PROFILE_MODULES = ("numpy", "scipy", "statsmodels", "h5py", "highspy", "matplotlib", "PIL", "skimage", "sklearn",
                   "pyarrow", "gguf", "accelerate", "tqdm")
SUBCOMMANDS = ("profile", "fit", "export", "report", "solve", "evaluate", "merge", "utr")
PROG = "profile-bias"


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(top-level parser for the whole pipeline, parser with the stage subcommands)."""
    from posbias.cli import evaluate, export, fit, merge, profile, report, run, solve, utr

    top = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Calibrate the positional bias of a VLM's visual-token attention. With no subcommand, run the "
            "whole pipeline: profile the model on samples into OUT/profile.h5, fit the bias curves into "
            "OUT/posbias_calibration.json, and render OUT/report.html. Subcommands run one stage: "
            + ", ".join(SUBCOMMANDS)
            + f" (see '{PROG} SUBCOMMAND --help')."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_arguments(top)
    stages = argparse.ArgumentParser(prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = stages.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for module in (profile, fit, export, report, solve, evaluate, merge, utr):
        module.add_parser(sub)
    return top, stages


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``profile-bias`` console script; returns the exit status."""
    import importlib.util

    missing = [m for m in PROFILE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        print(f"{PROG}: error: the profiling stack is not installed (missing {', '.join(missing)}); "
              'install it with: pip install "posbias[profile]"', file=sys.stderr)
        return 2
    args_list = list(sys.argv[1:] if argv is None else argv)
    top, stages = build_parser()
    if args_list and args_list[0] in SUBCOMMANDS:
        args = stages.parse_args(args_list)
    else:
        args = top.parse_args(args_list)
    try:
        return int(args.func(args) or 0)
    except PosbiasError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
