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

__all__ = ["main", "build_parser", "unknown_command", "flag_wording", "SUBCOMMANDS"]

#: import names of the ``posbias[profile]`` extra (the runtime-only install has none of these)
PROFILE_MODULES = ("numpy", "scipy", "statsmodels", "h5py", "highspy", "matplotlib", "PIL", "skimage", "sklearn",
                   "pyarrow", "gguf", "accelerate", "tqdm")
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


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found |= _option_strings(child)
    return found


#: library parameters whose command-line flag is spelled otherwise
_PARAMETER_FLAGS = {"keeps": "keep"}


def flag_wording(message: str, *parsers: argparse.ArgumentParser) -> str:
    """A library message in the command line's words: a parameter that is also an option of ``parsers`` is named
    by its flag (``cv_folds=7`` -> ``--cv-folds 7``, ``overwrite=True`` -> ``--overwrite``, ``shallow_layer``
    -> ``--shallow-layer``); plain words stay (``keep`` alone is not rewritten, ``keep=5`` is)."""
    import re

    options = set().union(*(_option_strings(p) for p in parsers))

    def flag(match: re.Match[str]) -> str:
        name = match["name"]
        option = "--" + _PARAMETER_FLAGS.get(name, name.replace("_", "-"))
        if option not in options or not (match["true"] or match["assign"] or "_" in name):
            return match.group(0)
        return f"{option} " if match["assign"] else option

    pattern = r"(?<![\w./'\"-])(?P<name>[a-z][a-z0-9]*(?:_[a-z0-9]+)*)(?:(?P<true>=True\b)|(?P<assign>=)|(?![\w(=-]))"
    return re.sub(pattern, flag, message)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``profile-bias`` console script; returns the exit status."""
    import importlib.util

    missing = [m for m in PROFILE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        print(f"{PROG}: error: the profiling stack is not installed (missing {', '.join(missing)}); "
              'install it with: pip install "posbias[profile]"', file=sys.stderr)
        return 2
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
        print(f"{PROG}: error: {flag_wording(' '.join(str(shown).split()), top, stages)}", file=sys.stderr)
        return int(shown.exit_code)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
