"""Benchmark: HTML + PDF report of an 800-sample store (576 tokens, 32 layers) — target under 30 s.

Writes a synthetic store with a known bias (posbias.testing) and region log-dets, fits it
(statistics included; not timed), then times ``render_report`` (HTML and PDF) in a fresh process, imports
included, and in-process stage by stage.

    python benchmarks/bench_report.py [--samples 800] [--keep-files DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__: list[str] = []


def _add_region(f) -> None:  # extra= hook of write_synthetic_store: (S, 6, 6) log-dets, centre higher
    s = f["samples/id"].shape[0]
    rng = np.random.default_rng(1)
    base = rng.normal(0.0, 1.0, (s, 6, 6))
    base[:, 1:5, 1:5] += 0.6
    f.create_dataset("samples/region_logdet", data=base, maxshape=(None, 6, 6), chunks=True)


def build(folder: Path, n: int) -> tuple[Path, Path]:
    from posbias.testing import write_synthetic_store
    from posbias.pipeline import fit_calibration

    store = folder / "profile.h5"
    write_synthetic_store(store, n_samples=n, sources=("mme", "pope"), extra=_add_region,
                          shallow_bias=lambda x, u, v: 3e-4 * (x / 575.0) ** 2 + 1e-4 * np.exp(-(u**2 + v**2)))
    cal = folder / "posbias_calibration.json"
    fit_calibration(store, n_repeats=50, n_boot=50).calibration.save(cal)
    return store, cal


def _compare(cmd: list[str], other_src: Path, rounds: int) -> None:
    """Cold report with this checkout and with ``other_src``, alternating, ``rounds`` times each; medians, ratio."""
    import os
    import statistics

    mine_src = str(Path(__file__).resolve().parent.parent / "src")
    # the other checkout fits the store itself (its calibration format may differ); not timed
    store = Path(cmd[cmd.index("--store") + 1])
    other_cal = store.with_name("calibration_other.json")
    env_other = dict(os.environ, PYTHONPATH=str(other_src))
    subprocess.run([sys.executable, "-m", "posbias.cli", "fit", "--store", str(store), "--out", str(other_cal),
                    "--n-repeats", "50", "--n-boot", "50", "--overwrite"], check=True, capture_output=True, env=env_other)
    other_cmd = list(cmd)
    other_cmd[other_cmd.index("--calibration") + 1] = str(other_cal)
    times: dict[str, list[float]] = {"this": [], "other": []}
    for _ in range(rounds):
        for label, src, c in (("other", str(other_src), other_cmd), ("this", mine_src, cmd)):
            env = dict(os.environ, PYTHONPATH=src)
            t = time.perf_counter()
            subprocess.run(c, check=True, capture_output=True, env=env)
            times[label].append(time.perf_counter() - t)
    a, b = statistics.median(times["this"]), statistics.median(times["other"])
    print(f"interleaved cold reports, median of {rounds}: this {a:.2f} s, {other_src} {b:.2f} s, ratio {a / b:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=800)
    ap.add_argument("--keep-files", default=None, help="write the store, calibration and reports here")
    ap.add_argument("--against", default=None, metavar="SRC",
                    help="also time the cold report of another checkout's src/ folder, interleaved, and print the ratio")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --against")
    args = ap.parse_args()
    tmp = None if args.keep_files else tempfile.TemporaryDirectory()
    folder = Path(args.keep_files or tmp.name)  # type: ignore[union-attr]
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    store, cal = build(folder, args.samples)
    print(f"built {args.samples}-sample store + calibration in {time.perf_counter() - t:.1f} s (not part of the target)")

    cmd = [sys.executable, "-m", "posbias.cli", "report", "--store", str(store), "--calibration", str(cal),
           "--html", str(folder / "report.html"), "--pdf", str(folder / "report.pdf")]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    cold = time.perf_counter() - t
    print(f"cold CLI report (fresh process, imports included, HTML + PDF): {cold:.2f} s  (target < 30 s)")
    if args.against:
        _compare(cmd, Path(args.against), args.rounds)

    from posbias.reports.data import collect
    from posbias.reports.html import render_html
    from posbias.reports.pdf import render_pdf
    from posbias.reports.sections import build_sections

    t = time.perf_counter()
    data = collect(store, cal)
    t_collect = time.perf_counter() - t
    t = time.perf_counter()
    sections = build_sections(data)
    t_sections = time.perf_counter() - t
    t = time.perf_counter()
    render_html(sections, "bench", folder / "warm.html")
    t_html = time.perf_counter() - t
    t = time.perf_counter()
    render_pdf(sections, "bench", folder / "warm.pdf")
    t_pdf = time.perf_counter() - t
    print(f"warm stages: collect {t_collect:.2f} s ({', '.join(f'{k} {v:.2f}' for k, v in data.timings.items())}), "
          f"sections {t_sections:.2f} s, HTML {t_html:.2f} s, PDF {t_pdf:.2f} s, total {t_collect + t_sections + t_html + t_pdf:.2f} s")
    print(f"sizes: HTML {(folder / 'report.html').stat().st_size / 1e6:.2f} MB, PDF {(folder / 'report.pdf').stat().st_size / 1e6:.2f} MB")
    if tmp is not None:
        tmp.cleanup()
    return 0 if cold < 30.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
