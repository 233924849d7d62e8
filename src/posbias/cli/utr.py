"""``profile-bias utr``: fill ``/samples/utr_loss`` (UTP information loss, docs/utp.md) for a store's samples.

A separate stage after ``profile``: it reloads the store's samples from their sources (the ``--data``
options recorded in the store, or the ones given), runs :func:`posbias.profiler.utr.info_loss` on each
(about 1.3 full forwards per sample) and writes the (S, L) array into the closed store. Samples that
already have a finite row are kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse

from posbias.cli.common import HelpFormatter

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "utr",
        help="UTP information loss per sample and layer into a store (for 'solve')",
        description="Compute UTP's per-layer information loss (angle between the last token's final feature "
        "with the visual tokens removed from layer l on and the full model's) for every sample of a store and "
        "write it as /samples/utr_loss, which 'profile-bias solve' needs (docs/utp.md).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--store", required=True, help="profile.h5 written by 'profile-bias profile'")
    p.add_argument("--model", default=None, help="model (default: the store's model_id); must match the store's fingerprint")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model weights dtype")
    p.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="SOURCE[:PATH]",
        help="sample sources holding the store's samples (default: the --data recorded in the store)",
    )
    p.add_argument("--overwrite", action="store_true", help="recompute samples that already have utr_loss")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from posbias.atomic import check_writable
    from posbias.profiler.utr import fill_utr_loss

    if Path(args.store).is_file():
        check_writable(Path(args.store).parent)  # a read-only folder is found before the forwards, not after

    done, kept = fill_utr_loss(
        args.store, model=args.model, data=args.data, device=args.device, dtype=args.dtype,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(f"utr_loss: computed {done} sample(s), kept {kept} -> {args.store} (next: profile-bias solve --store {args.store} ...)")
    return 0
