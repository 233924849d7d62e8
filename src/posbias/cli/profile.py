"""``profile-bias profile``: run the model over samples and write the store.

Crash-safe: every finished sample is committed to disk before the next one starts; ``--resume``
continues an interrupted run. Under ``torchrun`` the samples are sharded across ranks and rank 0 merges
the shards (docs/store.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from posbias.cli.common import HelpFormatter, add_model_options, add_sample_options, check_out_dir, default_out, removing_empty_dir
from posbias.atomic import check_writable, ensure_folder
from posbias.errors import PosbiasError

__all__ = ["add_parser", "add_arguments", "run", "run_profile", "SHARDS_DIRNAME", "DEFAULT_N"]

SHARDS_DIRNAME = "shards"
DEFAULT_N = 32

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


def _plan(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """(sample stream, the --data options) of ``args``; validates the sources before any model loads."""
    from posbias.data.registry import iter_samples, resolve_with_quotas, split_quotas

    options = list(args.data or ["embedded"])
    specs, quotas = split_quotas(options)
    n = args.n
    if n is None:
        n = None if quotas is not None and all(q is not None for q in quotas) else DEFAULT_N
    elif n < 1:
        raise PosbiasError(f"--n {n}: the number of samples must be at least 1")
    sources, quotas = resolve_with_quotas(specs, quotas)
    return iter_samples(sources, n=n, seed=args.seed, quotas=quotas), options


def _capture(args: argparse.Namespace, adapter: Any) -> Any | None:
    """The capture object for the requested signals (None: plain last-token attention)."""
    signals = str(getattr(args, "signals", "attn") or "attn")
    per_head = bool(getattr(args, "per_head", False))
    if signals.strip() in ("", "attn") and not per_head:
        return None
    from posbias.profiler.signals import SignalCapture

    return SignalCapture(adapter, signals=signals, per_head=per_head, region_grid=int(getattr(args, "region_grid", 6)))


def _print_summary(summary: Any, store_path: Path) -> None:
    print(
        f"profiled {summary.n_profiled} samples in {summary.seconds:.1f} s "
        f"({summary.samples_per_second:.2f} samples/s) -> {store_path}"
        + (f" (resumed: {summary.n_resumed} already stored)" if summary.n_resumed else "")
    )
    if summary.skipped:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(summary.skip_reasons().items()))
        print(f"skipped {len(summary.skipped)} sample(s) ({kinds}):")
        for sid, reason in summary.skipped:
            print(f"  {sid}: {reason}")
    if summary.non_finite_samples:
        print(f"warning: {summary.non_finite_samples} sample(s) have NaN/inf attention (fp16 overflow?); fits exclude them")


def _device(args: argparse.Namespace, local_rank: int, distributed: bool) -> str:
    dev = str(args.device)
    if distributed and dev == "cuda":
        return f"cuda:{local_rank}"
    return dev


def run_profile(args: argparse.Namespace, out_dir: Path) -> Path:
    """Load the model and samples named in ``args`` and profile them into ``out_dir``/profile.h5.

    With ``args.resume`` the run continues the store in ``out_dir``. Under torchrun (``WORLD_SIZE`` > 1)
    each rank profiles its shard into ``out_dir/shards/rankR.h5`` and rank 0 merges them.
    """
    from posbias.models import load_adapter
    from posbias.pipeline import STORE_FILENAME
    from posbias.profiler.run import dist_info, profile_samples
    from posbias.profiler.store import store_exists

    resume = bool(getattr(args, "resume", False))
    overwrite = bool(getattr(args, "overwrite", False))
    if resume and overwrite:
        raise PosbiasError("--resume and --overwrite contradict each other; pass one of them")
    stream, options = _plan(args)
    info = dist_info()
    store_path = out_dir / STORE_FILENAME
    if info.distributed:
        return _run_sharded(args, out_dir, stream, options, info)
    if (out_dir / SHARDS_DIRNAME).is_dir() and not overwrite:
        raise PosbiasError(
            f"--out {out_dir} holds the shards of an unfinished torchrun run; resume it under torchrun, "
            f"merge them with 'profile-bias merge {out_dir}/{SHARDS_DIRNAME} --out {out_dir}', or pass --overwrite"
        )
    if store_exists(store_path) and not resume and not overwrite:
        raise PosbiasError(
            f"--out {out_dir} holds an interrupted or finished run; pass --resume to continue it or --overwrite to start again"
        )
    if overwrite and (out_dir / SHARDS_DIRNAME).is_dir():
        shutil.rmtree(out_dir / SHARDS_DIRNAME)
    if out_dir.is_dir():
        check_writable(out_dir)  # a read-only or full folder is found before the model loads
    adapter = load_adapter(args.model, device=args.device, dtype=args.dtype)
    # created only now, so a bad option or model leaves no empty folder behind; machine faults are one line
    check_writable(ensure_folder(out_dir, create=True))
    verbose = bool(getattr(args, "verbose", False))
    print(f"profiling {len(stream)} sample(s) of {args.model} into {store_path} (the bar shows the time per sample "
          "and the time left; Ctrl-C stops, --resume continues)", flush=True)
    summary = profile_samples(
        adapter,
        stream,
        store_path,
        seed=args.seed,
        total=len(stream),
        overwrite=True,
        resume=resume,
        progress=not args.no_progress,
        extra_attrs={"n_requested": int(len(stream)), "data": ",".join(options)},
        capture=_capture(args, adapter),
        on_sample=(lambda sid: print(f"committed {sid}", flush=True)) if verbose else None,
    )
    _print_summary(summary, store_path)
    return store_path


def _run_sharded(args: argparse.Namespace, out_dir: Path, stream: Any, options: list[str], info: Any) -> Path:
    from posbias.data.registry import SampleStream
    from posbias.models import load_adapter
    from posbias.pipeline import STORE_FILENAME
    from posbias.profiler.run import distributed_context, profile_samples, shard_items
    from posbias.profiler.store import ProfileStore, merge_stores, remove_store, store_exists

    resume = bool(getattr(args, "resume", False))
    overwrite = bool(getattr(args, "overwrite", False))
    store_path = out_dir / STORE_FILENAME
    shard_dir = out_dir / SHARDS_DIRNAME
    shard_paths = sorted(shard_dir.glob("rank*.h5")) if shard_dir.is_dir() else []
    existing = store_exists(store_path) or any(store_exists(p) for p in shard_paths)
    # every rank checks the same files, so every rank fails the same way (nobody waits at a barrier)
    if existing and not resume and not overwrite:
        raise PosbiasError(
            f"--out {out_dir} holds an interrupted or finished run; pass --resume to continue it or --overwrite to start again"
        )
    plan_ids = stream.ids
    with distributed_context(info) as barrier:
        done: set[str] = set()
        if resume:
            for p in [store_path, *shard_paths]:
                if store_exists(p):
                    with ProfileStore(p) as st:
                        done |= set(st.sample_ids) | {row[0] for row in st.skipped()}
        barrier()  # everyone has read the old state before anyone writes or deletes
        if overwrite and info.rank == 0:
            remove_store(store_path)
            if shard_dir.is_dir():
                shutil.rmtree(shard_dir)
        barrier()
        remaining = [(src, i) for src, i in stream.plan if src.sample_id(i) not in done]
        mine = SampleStream(shard_items(remaining, info.rank, info.world_size))
        my_store = shard_dir / f"rank{info.rank:03d}.h5"
        shard_dir.mkdir(parents=True, exist_ok=True)
        adapter = load_adapter(args.model, device=_device(args, info.local_rank, True), dtype=args.dtype)
        summary = profile_samples(
            adapter,
            mine,
            my_store,
            seed=args.seed,
            total=len(mine),
            overwrite=not resume,
            resume=resume,
            progress=not args.no_progress and info.rank == 0,
            extra_attrs={
                "n_requested": int(len(plan_ids)),
                "data": ",".join(options),
                "shard_rank": info.rank,
                "shard_world_size": info.world_size,
            },
            capture=_capture(args, adapter),
        )
        print(f"[rank {info.rank}/{info.world_size}] ", end="", file=sys.stdout)
        _print_summary(summary, my_store)
        barrier()  # every shard is compacted
        if info.rank == 0:
            inputs = sorted(shard_dir.glob("rank*.h5"))
            if store_exists(store_path):
                inputs = [store_path, *inputs]
            merge_stores(inputs, store_path, order=plan_ids, dedupe=True, overwrite=True)
            for p in sorted(shard_dir.glob("rank*.h5")):
                remove_store(p)
            shutil.rmtree(shard_dir, ignore_errors=True)
            with ProfileStore(store_path) as st:
                print(f"merged {len(inputs)} store(s): {st.n_samples} samples, {len(st.skipped())} skipped -> {store_path}")
        barrier()
    return store_path


def run(args: argparse.Namespace) -> int:
    from posbias.pipeline import STORE_FILENAME

    if args.out is None:
        args.out = default_out(args.model)
    out_dir = check_out_dir(args.out, [STORE_FILENAME], args.overwrite or args.resume)
    with removing_empty_dir(out_dir):
        run_profile(args, out_dir)
    return 0
