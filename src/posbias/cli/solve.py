"""``profile-bias solve``: UTP layer-wise retention schedules from a profile store, into a calibration."""

from __future__ import annotations

import argparse

from posbias.cli.common import HelpFormatter

__all__ = ["add_parser", "run"]


def _ratios(text: str) -> list[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--ratios {text!r} must be numbers separated by commas") from exc
    if not vals:
        raise argparse.ArgumentTypeError("--ratios needs at least one ratio")
    return vals


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "solve",
        help="UTP retention schedules (exact HiGHS ILP) into a calibration",
        description="Solve UTP's layer-wise retention ILP for each compression ratio from a store's "
        "attention rows and /samples/utr_loss, and add the schedules to a calibration JSON (docs/utp.md).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--store", required=True, help="profile.h5 with /samples/utr_loss")
    p.add_argument("--ratios", required=True, type=_ratios, help="compression ratios, e.g. 2,4,8,16")
    p.add_argument("--into", required=True, metavar="CALIBRATION", help="calibration JSON to add schedules to")
    p.add_argument("--formulation", default="compact", choices=("compact", "pwl", "tokens"),
                   help="compact: proven optimum of the per-layer tables (exact dynamic program, default); pwl: those "
                   "tables interpolated on --levels keep levels (HiGHS MILP); tokens: UTP's token-level ILP "
                   "(exact for progressive pruning, small V*L only; also run as a reference where S*(L-1)*V <= 2048)")
    p.add_argument("--levels", type=int, default=33, help="keep levels (breakpoints) of --formulation pwl (docs/utp.md)")
    p.add_argument("--mode", default="joint", choices=("joint", "per_sample"),
                   help="joint: one schedule for all samples (their losses summed, what the runtime ships); "
                   "per_sample: one program per sample, then their per-layer mean projected onto the budget")
    p.add_argument("--pa-layers", type=int, default=3, help="leading layers ranked by position-agnostic rows")
    p.add_argument("--min-keep", type=int, default=1, help="tokens every layer keeps at least")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per HiGHS solve")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from posbias.artifacts.calibration import Calibration
    from posbias.atomic import check_writable
    from posbias.errors import PosbiasError
    from posbias.solvers.store import solve_store

    into = Path(args.into)
    if not into.is_file():
        raise PosbiasError(f"calibration {into} does not exist; run 'profile-bias fit' first or check --into")
    bad = [r for r in args.ratios if not (r == r and 1.0 <= r < float("inf"))]
    if bad:
        raise PosbiasError(f"--ratios {bad[0]:g}: a compression ratio is a number >= 1 (2 keeps half the visual tokens)")
    try:
        doc = json.loads(into.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PosbiasError(f"calibration {into} is not JSON ({exc}); pass a file written by 'profile-bias fit'") from exc
    if not isinstance(doc, dict):
        raise PosbiasError(f"calibration {into} holds a JSON {type(doc).__name__}, not a calibration object; "
                           "pass a file written by 'profile-bias fit'")
    Calibration.from_dict(doc, source=str(into))  # a damaged calibration fails now, not after the solves
    check_writable(into.parent)
    schedules = solve_store(args.store, args.ratios, formulation=args.formulation, mode=args.mode,
                            pa_layers=args.pa_layers, min_keep=args.min_keep, time_limit=args.time_limit,
                            levels=args.levels)
    doc.setdefault("schedules", {}).update(schedules)
    cal = Calibration.from_dict(doc, source=str(into))
    cal.save(into)  # atomic: the old calibration stays whole until the new one is on disk
    for key, e in schedules.items():
        sched = e["schedule"]
        shown = "not written (no schedule within budget)" if sched is None else ",".join(map(str, sched))
        tok = "" if e.get("objective_tokens") is None else \
            f" token-level={e['objective_tokens']:.6g} ({e['tokens_status']})"
        print(f"ratio {key}: status={e['status']} gap={e['gap']} objective={e['objective']} "
              f"progressive={e['objective_progressive']}{tok} "
              f"time={e['solve_seconds']:.3f}s samples={e['n_samples']} metric={e['metric']} r={shown}")
    return 0
