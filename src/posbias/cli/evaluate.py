"""``profile-bias evaluate``: fidelity of pruning methods against the full model (docs/evaluation.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from posbias.cli.common import HelpFormatter, add_model_options, csv_ints, csv_names, refuse_existing
from posbias.errors import PosbiasError

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="compare pruning methods with the full model (KL, agreement, FLOPs, time, memory)",
        description="Run the full model and the model pruned by each method and budget on samples disjoint from "
        "the calibration's, and report KL(full||pruned) of the first answer token, top-1 and exact answer "
        "agreement, accuracy on yes/no labels, FLOPs (PosPrune Eq. 8), prefill time and peak memory.",
        formatter_class=HelpFormatter,
    )
    add_model_options(p)
    p.add_argument("--calibration", required=True, help="calibration JSON (its store's samples are excluded)")
    p.add_argument("--store", default=None, help="the calibration's profile store (default: next to the calibration)")
    p.add_argument("--methods", type=csv_names, default=["fastv", "pore", "posprune", "adaptprune", "utp"],
                   help="comma-separated methods: fastv, pore, posprune-pbc, posprune, adaptprune, utp")
    p.add_argument("--keep", type=csv_ints, default=[64, 128, 192], help="comma-separated kept visual tokens")
    p.add_argument("--data", action="append", default=None, metavar="SOURCE[:PATH]",
                   help="sample source; repeat for several (default: embedded)")
    p.add_argument("--n", type=int, default=16, help="evaluation samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample plan")
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy answer length for exact agreement")
    p.add_argument("--params", default=None,
                   help='JSON of per-method parameter overrides, e.g. \'{"posprune": {"mmr_lambda": 0.8}}\'')
    p.add_argument("--probe", action="store_true",
                   help="also run the position-invariance probe (a photo patch at a grid of positions; docs/evaluation.md)")
    p.add_argument("--probe-steps", type=int, default=3, help="probe positions per axis")
    p.add_argument("--out", default="evaluation.json", help="evaluation JSON to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-progress", action="store_true", help="no per-sample lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from posbias.artifacts import Calibration
    from posbias.evaluate import EvaluationConfig, evaluate, format_table, pin_mmap_threshold, write_evaluation
    from posbias.models.registry import load_adapter

    params = {}
    if args.params:
        try:
            params = json.loads(args.params)
        except ValueError as exc:
            raise PosbiasError(f"--params is not valid JSON ({exc}); pass e.g. '{{\"posprune\": {{\"mmr_lambda\": 0.8}}}}'") from None
        if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
            raise PosbiasError("--params must be a JSON object {method: {parameter: value}}")
    out = Path(args.out)
    refuse_existing([("--out", out)], args.overwrite)
    cal = Calibration.load(args.calibration)
    config = EvaluationConfig(methods=args.methods, keeps=args.keep, n=args.n, data=args.data or ["embedded"],
                              seed=args.seed, max_new_tokens=args.max_new_tokens, params=params, store=args.store)
    pin_mmap_threshold()  # before the model allocates: RSS peaks then see every large buffer (see its docstring)
    adapter = load_adapter(args.model, device=args.device, dtype=args.dtype)
    doc = evaluate(adapter, cal, config, calibration_path=args.calibration, progress=not args.no_progress)
    print(format_table(doc))
    skipped = doc.get("skipped") or []
    if skipped:
        print(f"skipped {len(skipped)} sample(s) that could not be read (listed under 'skipped' in {out}):")
        for item in skipped:
            print(f"  {item['id']}: {item['reason']}")
    write_evaluation(doc, out)  # before the probe: a probe that fails does not lose the evaluation
    if args.probe:
        from posbias.evaluate.probe import format_probe, position_probe

        try:
            doc["probe"] = position_probe(adapter, cal, config.methods, config.keeps, steps=args.probe_steps,
                                          params=config.params)
        except PosbiasError as exc:
            raise PosbiasError(f"{exc} (the evaluation without the probe is in {out})") from None
        print(format_probe(doc["probe"]))
        write_evaluation(doc, out)
    print(f"evaluation -> {out}")
    return 0
