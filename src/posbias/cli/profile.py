"""``profile-bias profile``: run the model over samples and write the store.

Crash-safe: every finished sample is committed to disk before the next one starts; ``--resume``
continues an interrupted run. Under ``torchrun`` the samples are sharded across ranks and rank 0 merges
the shards (docs/store.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from posbias.cli.common import HelpFormatter, add_model_options, add_sample_options, check_out_dir, default_out, removing_empty_dir
from posbias.pipeline import DEFAULT_N, SHARDS_DIRNAME, STORE_FILENAME, ProfileConfig

__all__ = ["add_parser", "add_arguments", "run", "run_profile", "profile_config", "SHARDS_DIRNAME", "DEFAULT_N"]

_DATA_HELP = (
    "sample source NAME[:PATH][@N]; repeat for several. NAME: embedded (photos shipped with installed packages), "
    "mme:PATH (lmms-eval parquet or the release folder), pope:PATH[:IMAGES] (lmms-eval parquet, or jsonl question "
    "files + COCO val2014 images), coco:IMAGES[:ANNOTATIONS]. @N draws N samples from that source (@all: every "
    "record); with a quota on every --data and no --n, the run is the sum of the quotas"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_sample_options(p)
    for action in p._actions:  # the shared --data/--n options, described for this command
        if action.dest == "data":
            action.help = _DATA_HELP
            action.metavar = "NAME[:PATH][@N]"
        if action.dest == "n":
            action.help = f"number of samples (deterministic subsample; default {DEFAULT_N}, or the sum of the quotas)"
    p.set_defaults(n=None)
    # torchrun's own parser takes '--n' as an abbreviation of its options: this alias passes through it
    p.add_argument("--n-samples", dest="n", type=int, default=argparse.SUPPRESS, help="same as --n (use it under torchrun)")
    p.add_argument(
        "--out", default=None, help="output folder; the store is OUT/profile.h5 (default: runs/<model alias or folder name>)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("-v", "--verbose", action="store_true", help="print a line per sample once it is committed to disk")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted (or smaller) run in --out: keep its samples, profile only the missing ones",
    )
    g = p.add_argument_group("signals")
    g.add_argument(
        "--capture",
        "--signals",
        dest="signals",
        default="all",
        help="signals to capture: 'all', 'attn' (attention only), or a comma-separated list of attn_pa, "
        "vision_importance, region_logdet (docs/store.md). Under torchrun spell it --capture: torchrun takes "
        "--signals for its own --signals-to-handle",
    )
    g.add_argument("--per-head", action="store_true", help="also store per-head attention rows /tokens/attn_heads")
    g.add_argument("--region-grid", type=int, default=6, help="n of the n x n region grid of region_logdet")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="profile a model into an HDF5 store",
        description="Run the model over the samples and store the last-token attention to every visual token "
        "at every decoder layer in OUT/profile.h5 (format: docs/store.md). Crash-safe: --resume continues an "
        "interrupted run. Under 'torchrun --nproc-per-node K -m posbias.cli profile ...' the samples are sharded "
        "across the K ranks and rank 0 merges the shards.",
        formatter_class=HelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def profile_config(args: argparse.Namespace) -> ProfileConfig:
    """The profile stage's options parsed from the command line."""
    return ProfileConfig(
        model=args.model, device=args.device, dtype=args.dtype, data=tuple(args.data or ("embedded",)), n=args.n,
        seed=args.seed, signals=str(getattr(args, "signals", "attn") or "attn"),
        per_head=bool(getattr(args, "per_head", False)), region_grid=int(getattr(args, "region_grid", 6)),
        resume=bool(getattr(args, "resume", False)), overwrite=bool(getattr(args, "overwrite", False)),
        progress=not args.no_progress, verbose=bool(getattr(args, "verbose", False)),
    )


def run_profile(args: argparse.Namespace, out_dir: Path) -> Path:
    """Profile the model and samples named in ``args`` into ``out_dir``/profile.h5 (:func:`posbias.pipeline.profile`)."""
    from posbias.pipeline import profile

    return profile(profile_config(args), out_dir)


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        args.out = default_out(args.model)
    out_dir = check_out_dir(args.out, [STORE_FILENAME], args.overwrite or args.resume)
    with removing_empty_dir(out_dir):
        run_profile(args, out_dir)
    return 0
