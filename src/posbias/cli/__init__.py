"""``profile-bias``: the command line. Thin: parse, call the library, print.

``profile-bias [options]`` with no subcommand runs the whole pipeline (profile -> fit -> report);
``profile-bias {profile,fit,export,report} ...`` runs one stage on files from the others.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from posbias.errors import PosbiasError

__all__ = ["main", "build_parser", "unknown_command", "SUBCOMMANDS"]

SUBCOMMANDS = ("profile", "fit", "export", "report", "solve", "evaluate", "merge", "utr")
PROG = "profile-bias"


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(top-level parser for the whole pipeline, parser with the stage subcommands)."""
    from posbias.cli import evaluate, export, fit, merge, profile, report, run, solve, utr
    from posbias.cli.common import HelpFormatter

    top = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Calibrate the positional bias of a VLM's visual-token attention. With no subcommand, run the "
            "whole pipeline: profile the model on samples into OUT/profile.h5, fit the bias curves into "
            "OUT/posbias_calibration.json, and render OUT/report.html. Subcommands run one stage: "
            + ", ".join(SUBCOMMANDS)
            + f" (see '{PROG} SUBCOMMAND --help')."
        ),
        formatter_class=HelpFormatter,
    )
    run.add_arguments(top)
    stages = argparse.ArgumentParser(prog=PROG, formatter_class=HelpFormatter)
    sub = stages.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for module in (profile, fit, export, report, solve, evaluate, merge, utr):
        module.add_parser(sub)
    return top, stages


def unknown_command(word: str) -> str:
    """The one-line message for a mistyped subcommand: the closest valid one and the whole list."""
    import difflib

    close = difflib.get_close_matches(word, SUBCOMMANDS, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    return (
        f"unknown command {word!r}; {hint}commands: {', '.join(SUBCOMMANDS)} "
        f"(or none: '{PROG} --model M' runs the whole pipeline)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``profile-bias`` console script; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere (or POSBIAS_DEBUG=1): errors show their traceback (docs/reliability.md)
    debug = "--debug" in args_list or os.environ.get("POSBIAS_DEBUG", "") not in ("", "0")
    args_list = [a for a in args_list if a != "--debug"]
    top, stages = build_parser()
    if args_list and args_list[0] in SUBCOMMANDS:
        args = stages.parse_args(args_list)
    elif args_list and not args_list[0].startswith("-"):
        print(f"{PROG}: error: {unknown_command(args_list[0])}", file=sys.stderr)
        return 2
    else:
        args = top.parse_args(args_list)
    try:
        return int(args.func(args) or 0)
    except (PosbiasError, OSError, RuntimeError) as err:
        from posbias.atomic import environment_fault

        shown = err if isinstance(err, PosbiasError) else environment_fault(err)
        if shown is None:  # an OSError that is no fault of the machine: a bug, with its traceback
            raise
        if debug:
            import traceback

            traceback.print_exception(err, file=sys.stderr)
        print(f"{PROG}: error: {' '.join(str(shown).split())}", file=sys.stderr)
        return int(shown.exit_code)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
