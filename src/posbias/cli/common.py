"""Options and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from posbias.atomic import check_writable
from posbias.errors import PosbiasError
from posbias.pipeline import removing_empty_dir  # noqa: F401  (re-exported: the CLI's commands use it)

__all__ = [
    "HelpFormatter",
    "add_model_options",
    "add_sample_options",
    "add_fit_options",
    "check_out_dir",
    "default_out",
    "removing_empty_dir",
    "refuse_existing",
    "print_table",
    "csv_ints",
    "csv_names",
]


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default once: appended only where the help text does not already say it.

    No default is shown for required options, flags, options whose default is None (the help says what
    happens then) or suppressed defaults.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        said = re.search(r"\(default[ :]|default:|; default |%\(default\)", text) or f"'{action.default}'" in text
        if said or not action.option_strings:
            return text
        if action.required or any(action.default is v for v in (None, False, True, argparse.SUPPRESS)):
            return text
        if isinstance(action.default, list) and not action.default:
            return text
        shown = ",".join(map(str, action.default)) if isinstance(action.default, list) else "%(default)s"
        return f"{text} (default: {shown})"


def default_out(model: str) -> str:
    """The default run folder of a model: ``runs/<alias>`` for an alias or hub id's last part, ``runs/<folder name>``.

    So that two models never share a default folder (``runs/demo-llava``, ``runs/qwen2.5-vl-7b``).
    """
    name = Path(str(model).rstrip("/\\")).name or "model"
    name = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in name).strip(".-") or "model"
    return str(Path("runs") / name)


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="demo-llava",
        help="model alias (demo-llava, demo-llava-next, demo-qwen2.5-vl, demo-qwen2-vl, llava-1.5-7b, llava-1.5-13b, "
        "llava-v1.6-vicuna-7b, llava-v1.6-mistral-7b, qwen2.5-vl-3b, qwen2.5-vl-7b, qwen2-vl-2b, qwen2-vl-7b, "
        "tiny-llava, tiny-llava-next, tiny-qwen2.5-vl, tiny-qwen2-vl), a Hugging Face hub id, or a local checkpoint "
        "folder",
    )
    g.add_argument("--device", default="cpu", help="torch device to run the model on (cpu, cuda, cuda:1, ...)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model weights dtype")


def add_sample_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("samples")
    g.add_argument("--n", type=int, default=32, help="number of samples to profile (deterministic subsample)")
    g.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="SOURCE[:PATH]",
        help="sample source; repeat for several (default: embedded, the photos shipped with installed packages)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the sample subsampling (recorded in the store)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def csv_ints(text: str) -> list[int]:
    """argparse type: a comma-separated list of integers (at least one)."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 64,128") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one integer, e.g. 25,50,100")
    return values


def csv_names(text: str) -> list[str]:
    """argparse type: a comma-separated list of names."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _sigma(text: str) -> str | float:
    if text in ("default", "fit"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use 'default', 'fit' or a positive number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: sigma must be > 0")
    return value


def add_fit_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fit")
    g.add_argument(
        "--methods",
        type=csv_names,
        default=None,
        help="comma-separated methods to fit (default: all of fastv,pore,posprune-pbc,adaptprune-gaussian)",
    )
    g.add_argument("--shallow-layer", type=int, default=None, help="0-based shallow layer of PBC and scoring layer (default 1: the papers' K=2)")
    g.add_argument(
        "--deep-layer", type=int, default=None, help="0-based deep layer of PBC (default: the relative depth of the 20th of 32 layers, round(20/32*L)-1)"
    )
    g.add_argument("--pore-layer", type=int, default=None, help="layer whose mean attention PoRe fits (default: shallow)")
    g.add_argument(
        "--degree",
        default="auto",
        help="degree of the PBC polynomial: 'auto' (1-5 by k-fold cross-validation over samples) or 1-5 to force it",
    )
    g.add_argument(
        "--domain",
        default="auto",
        choices=["auto", "index", "normalized"],
        help="position variable of the fits: raster index (fixed grids) or i/N (dynamic resolution)",
    )
    g.add_argument("--pore-form", choices=("auto", "pure", "offset"), default="auto",
                   help="PoRe's curve: pure a*exp(bx) as released, a*exp(bx)+c, or auto (pure unless held-out error "
                   "favours the offset; default)")
    g.add_argument("--pure-exponential", action="store_true", help="same as --pore-form pure")
    g.add_argument(
        "--gaussian-sigma",
        type=_sigma,
        default="default",
        help="sigma of AdaptPrune's centre weight in centred units: 'default' (AdaptPrune's released 12 on 24x24, scaled to the "
        "grid), 'fit' (fitted to the mean attention map) or a number",
    )
    g.add_argument("--keep", type=int, default=None,
                   help="default number of kept visual tokens recorded in the calibration (default: 64, or every "
                   "visual token of a model with fewer)")
    s = p.add_argument_group("statistics")
    s.add_argument("--no-stats", action="store_true", help="skip the statistics (consistency, CV table, intervals, 2-D maps)")
    s.add_argument(
        "--group-sizes",
        type=csv_ints,
        default=None,
        help="consistency group sizes, e.g. 25,50,100 (default: 10,25,50,... up to what the store holds)",
    )
    s.add_argument("--n-repeats", type=int, default=200, help="random group splits per group size")
    s.add_argument(
        "--consistency-threshold",
        type=float,
        default=None,
        help="Pearson r a consistent bias must reach at the largest group size (default 0.9, see docs/statistics.md)",
    )
    s.add_argument("--cv-folds", type=int, default=None, help="folds of the cross-validation (default: min(5, samples))")
    s.add_argument("--n-boot", type=int, default=200, help="bootstrap replicates of the PoRe parameter intervals")
    s.add_argument("--level", type=float, default=0.95, help="confidence level of all intervals")


def check_out_dir(out: str, names: list[str], overwrite: bool) -> Path:
    """Check ``out`` without creating it: refuse a file, or a folder holding any of ``names`` unless ``overwrite``."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise PosbiasError(f"--out {out} is a file, not a folder; pass a folder path")
    existing = [n for n in names if (path / n).exists()]
    if existing and not overwrite:
        raise PosbiasError(
            f"--out {out} already holds a run ({', '.join(existing)}); pass --overwrite to replace it or choose another --out"
        )
    return path


def refuse_existing(outputs: list[tuple[str, str | Path | None]], overwrite: bool) -> None:
    """The one --overwrite rule of every command that writes: an existing output file is replaced only with
    --overwrite (checked before any work, so nothing is computed in vain); its folder must exist."""
    for flag, value in outputs:
        if value is None:
            continue
        p = Path(value)
        if p.is_dir():
            raise PosbiasError(f"{flag} {p} is a folder; pass a file path")
        if p.exists() and not overwrite:
            raise PosbiasError(f"{flag} {p} exists; pass --overwrite to replace it or choose another path")
        if not p.parent.is_dir():
            raise PosbiasError(f"{flag} {p}: folder {p.parent} does not exist; create it or choose another path")
        check_writable(p.parent)


def print_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    """Print an aligned text table; the last column is not padded (no trailing spaces)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    widths[-1] = 0

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    print(line(header))
    print("  ".join("-" * (w or len(header[-1])) for w in widths))
    for r in rows:
        print(line(r))
