"""``profile-bias profile``: run the model over samples and write the store."""

from __future__ import annotations

import argparse
from pathlib import Path

from posbias.cli.common import add_model_options, add_sample_options, prepare_out_dir

__all__ = ["add_parser", "add_arguments", "run", "run_profile"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_sample_options(p)
    p.add_argument("--out", default="runs/profile", help="output folder; the store is OUT/profile.h5")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="profile a model into an HDF5 store",
        description="Run the model over the samples and store the last-token attention to every visual token "
        "at every decoder layer in OUT/profile.h5 (format: docs/store.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run_profile(args: argparse.Namespace, out_dir: Path) -> Path:
    """Load the model and samples named in ``args`` and profile them into ``out_dir``/profile.h5."""
    from posbias.data.registry import iter_samples, resolve_sources
    from posbias.models import load_adapter
    from posbias.pipeline import STORE_FILENAME
    from posbias.profiler.run import profile_samples

    if args.n < 1:
        from posbias.errors import PosbiasError

        raise PosbiasError(f"--n {args.n}: the number of samples must be at least 1")
    sources = resolve_sources(args.data or ["embedded"])  # validates paths before the model loads
    adapter = load_adapter(args.model, device=args.device, dtype=args.dtype)
    store_path = out_dir / STORE_FILENAME
    samples = iter_samples(sources, n=args.n, seed=args.seed)
    summary = profile_samples(
        adapter,
        samples,
        store_path,
        seed=args.seed,
        total=len(samples),
        overwrite=True,
        progress=not args.no_progress,
        extra_attrs={"n_requested": int(args.n), "data": ",".join(args.data or ["embedded"])},
    )
    print(
        f"profiled {summary.n_profiled} samples in {summary.seconds:.1f} s "
        f"({summary.samples_per_second:.2f} samples/s) -> {store_path}"
    )
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} sample(s):")
        for sid, reason in summary.skipped:
            print(f"  {sid}: {reason}")
    if summary.non_finite_samples:
        print(f"warning: {summary.non_finite_samples} sample(s) have NaN/inf attention (fp16 overflow?); fits exclude them")
    return store_path


def run(args: argparse.Namespace) -> int:
    from posbias.pipeline import STORE_FILENAME

    out_dir = prepare_out_dir(args.out, [STORE_FILENAME], args.overwrite)
    run_profile(args, out_dir)
    return 0
