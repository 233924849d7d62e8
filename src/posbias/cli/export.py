"""``profile-bias export``: ship a calibration next to a model checkpoint."""

from __future__ import annotations

import argparse

from posbias.cli.common import HelpFormatter

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="copy a calibration next to a checkpoint's config.json",
        description="Validate a calibration and write it as MODEL_DIR/posbias_calibration.json, next to the "
        "checkpoint's config.json, where posbias.runtime.Calibration.from_pretrained(MODEL_DIR) finds it. "
        "The checkpoint's config must have the calibration's fingerprint.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--calibration", required=True, help="calibration JSON written by 'profile-bias fit'")
    p.add_argument("--to", required=True, metavar="MODEL_DIR", help="checkpoint folder holding config.json")
    p.add_argument("--overwrite", action="store_true", help="replace a calibration already in MODEL_DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from posbias.artifacts import Calibration, export_to
    from posbias.errors import PosbiasError
    from posbias.atomic import check_writable
    from posbias.artifacts.fingerprint import model_fingerprint

    fingerprint = None
    if Path(args.to).is_dir():
        check_writable(args.to)
    Calibration.load(args.calibration)  # a damaged calibration is named before the checkpoint is read
    if (Path(args.to) / "config.json").is_file():
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(args.to)
        except (ValueError, OSError, KeyError) as exc:
            raise PosbiasError(f"--to {args.to}: config.json is not a transformers model config "
                               f"({' '.join(str(exc).split())[:200]}); pass the folder save_pretrained wrote") from exc
        # the full config (defaults filled in), as the adapter of a loaded model sees it
        fingerprint = model_fingerprint(config.to_dict())
    dest = export_to(args.calibration, args.to, fingerprint=fingerprint, overwrite=args.overwrite)
    print(f"calibration -> {dest}")
    return 0
