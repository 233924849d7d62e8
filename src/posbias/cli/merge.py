"""``profile-bias merge``: merge profile stores (e.g. the shards of a torchrun run) into one store."""

from __future__ import annotations

import argparse

from posbias.cli.common import HelpFormatter
from pathlib import Path

from posbias.errors import PosbiasError

__all__ = ["add_parser", "run", "expand_inputs"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge profile stores (shards) into one",
        description="Merge profile stores of one model and seed into OUT/profile.h5: the shards of a torchrun "
        "run (OUT/shards/rank*.h5), or stores profiled separately on several machines. Interrupted stores "
        "(with uncompacted segments) are accepted. Sample ids must be disjoint unless --dedupe.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="STORE",
        help="store files, run folders holding profile.h5, or shard folders holding rank*.h5",
    )
    p.add_argument("--out", required=True, help="output folder (writes OUT/profile.h5) or a .h5 file path")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output store")
    p.add_argument("--dedupe", action="store_true", help="keep the first copy of an id found in several inputs")
    p.set_defaults(func=run)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Store paths for the command-line inputs (a shard folder expands to its ``rank*.h5`` stores)."""
    from posbias.profiler.store import PARTS_SUFFIX, store_exists

    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir() and not (p / "profile.h5").exists() and not p.name.endswith(PARTS_SUFFIX):
            shards = sorted(q for q in p.glob("*.h5") if store_exists(q))
            shards += sorted(q.with_name(q.name[: -len(PARTS_SUFFIX)]) for q in p.glob(f"*.h5{PARTS_SUFFIX}")
                             if not q.with_name(q.name[: -len(PARTS_SUFFIX)]).exists() and store_exists(q.with_name(q.name[: -len(PARTS_SUFFIX)])))
            if not shards and (p / "shards").is_dir():
                return expand_inputs([str(p / "shards")])
            if not shards:
                raise PosbiasError(f"merge: {item} holds no profile store (profile.h5 or *.h5 shards); pass store files or folders")
            out.extend(sorted(set(shards)))
        else:
            if not store_exists(p):
                raise PosbiasError(f"merge: {item} is not a profile store; pass store files written by 'profile-bias profile'")
            out.append(p)
    return out


def run(args: argparse.Namespace) -> int:
    from posbias.atomic import check_writable
    from posbias.pipeline import STORE_FILENAME
    from posbias.profiler.store import ProfileStore, merge_stores

    out = Path(args.out)
    target = out if out.suffix == ".h5" else out / STORE_FILENAME
    inputs = expand_inputs(list(args.inputs))
    if target.parent.is_dir():
        check_writable(target.parent)
    merge_stores(inputs, target, dedupe=args.dedupe, overwrite=args.overwrite)
    with ProfileStore(target) as st:
        print(
            f"merged {len(inputs)} store(s): {st.n_samples} samples, {len(st.skipped())} skipped, "
            f"sources {st.sources_count()} -> {target}"
        )
    return 0
