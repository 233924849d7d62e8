"""Fault-injection figures of docs/reliability.md: fault class x command, and the real-layout readers.

Usage: ``python benchmarks/faults.py [--kills 4] [--seed 0] [--commands fit,solve] [--json out.json]``
(root is needed for the tmpfs classes; without it they are reported as not run).

Every writing command (profile, utr, fit, solve, evaluate, report, merge, export) runs on the tiny random
LLaVA from a copy of finished outputs (tests/faults_kit.py) under each fault class:

* ``sigkill``: SIGKILL of the process group at ``--kills`` random times within the command's clean
  duration, plus just before the first fsync and just before the first rename of an output;
* ``full disk``: a small tmpfs filled to 0 and to 64 KiB free before the command starts;
* ``read-only``: the tmpfs remounted read-only;
* ``injected``: ENOSPC on fsync, EDQUOT on write, EACCES and EIO on rename (the call fails);
* ``file size``: RLIMIT_FSIZE of 4 KiB and 1 MiB (the kernel refuses to grow files: EFBIG);
* ``vanished``: the output folder removed while the command runs, or replaced by a file.

A run *lost or corrupted data* when a pre-existing output is gone, or is neither byte-identical to
before nor a whole file of its kind (JSON that parses, HTML that ends, PDF with its trailer, a store that
opens). A *traceback* is Python's "Traceback (most recent call last)" on stderr. After each class the
command runs once more without the fault and must succeed ("recovered").
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import faults_kit as fk  # noqa: E402

__all__ = ["main"]

INJECTED = [
    {"errno": "ENOSPC", "on": "fsync", "at": 1},
    {"errno": "EDQUOT", "on": "write", "at": 1},
    {"errno": "EACCES", "on": "replace", "at": 1},
    {"errno": "EIO", "on": "replace", "at": 1},
]


def _record(rows: dict, cls: str, command: str, o: fk.Outcome, problems: list[str]) -> None:
    r = rows.setdefault((cls, command), {"runs": 0, "lost": 0, "tracebacks": 0, "killed": 0, "exit": {}, "notes": []})
    r["runs"] += 1
    r["lost"] += bool(problems)
    r["tracebacks"] += o.traceback
    r["killed"] += o.killed
    key = "killed" if o.killed else str(o.rc)
    r["exit"][key] = r["exit"].get(key, 0) + 1
    if problems:
        r["notes"].append("; ".join(problems))


def _one(z: fk.Zygote, base: fk.Base, command: str, d: Path, rows: dict, cls: str, *, fault=None, delay=None,
         before_run=None, during=None) -> tuple[list, list[Path]]:
    argv, outs, again = fk.setup_case(command, base, d, pdf=(command == "report"))
    before = {p: fk.digest(p) for p in outs}
    if before_run is not None:
        before_run(d)
    if during is not None:
        import threading

        threading.Timer(delay or 0.0, during, args=(d,)).start()
        delay = None
    o = z.run(argv, fault=fault, kill_after=delay)
    problems = fk.judge(before)
    if during is not None:  # the fault itself removed the old outputs: only a half-written new one counts
        problems = [p for p in problems if "corrupted" in p]
    _record(rows, cls, command, o, problems)
    return again, outs


def _recover(z: fk.Zygote, again: list, outs: list[Path], rows: dict, cls: str, command: str) -> None:
    o = z.run(again)
    ok = o.rc == 0 and all(fk.whole(p) for p in outs)
    rows[(cls, command)]["recovered"] = rows[(cls, command)].get("recovered", True) and ok


def run_matrix(commands: list[str], kills: int, seed: int, work: Path) -> dict:
    rng = random.Random(seed)
    z = fk.Zygote(work / "zygote")
    rows: dict = {}
    try:
        base = fk.make_base(z, work / "base", pdf=True)
        mount = fk.can_mount()
        for command in commands:
            n = 0

            def case() -> Path:
                nonlocal n
                n += 1
                return work / command / f"c{n}"

            argv, outs, again = fk.setup_case(command, base, case(), pdf=(command == "report"))
            t0 = time.perf_counter()
            clean = z.run(argv)
            duration = time.perf_counter() - t0
            if clean.rc != 0:
                raise RuntimeError(f"{command} fails without a fault: {clean.stderr[-1500:]}")
            for point in ("fsync", "replace"):
                again, outs = _one(z, base, command, case(), rows, "sigkill", fault={"kill": point, "at": 1})
            for _ in range(kills):
                again, outs = _one(z, base, command, case(), rows, "sigkill", delay=rng.uniform(0.0, duration * 1.1))
            _recover(z, again, outs, rows, "sigkill", command)
            for fault in INJECTED:
                again, outs = _one(z, base, command, case(), rows, "injected", fault=fault)
            _recover(z, again, outs, rows, "injected", command)
            for size in (4096, 1 << 20):
                again, outs = _one(z, base, command, case(), rows, "file size", fault={"fsize": size})
            _recover(z, again, outs, rows, "file size", command)
            again, outs = _one(z, base, command, case(), rows, "vanished", delay=rng.uniform(0.0, duration),
                               during=lambda d: shutil.rmtree(d, ignore_errors=True))

            def blocker(d: Path) -> None:
                shutil.rmtree(d, ignore_errors=True)
                d.write_text("a file where the folder was")

            again, outs = _one(z, base, command, case(), rows, "vanished", delay=rng.uniform(0.0, duration), during=blocker)
            if mount:
                for leave in (0, 65536):
                    with fk.tmpfs(case(), size_mb=24) as disk:
                        d = disk / "out"
                        again, outs = _one(z, base, command, d, rows, "full disk",
                                           before_run=lambda _d, leave=leave: fk.fill(disk, leave=leave))
                        (disk / ".filler").unlink()
                        _recover(z, again, outs, rows, "full disk", command)
                with fk.tmpfs(case(), size_mb=24) as disk:
                    d = disk / "out"
                    again, outs = _one(z, base, command, d, rows, "read-only",
                                       before_run=lambda _d, disk=disk: fk.remount(disk, "ro"))
                    fk.remount(disk, "rw")
                    _recover(z, again, outs, rows, "read-only", command)
            print(f"{command}: done ({duration:.1f} s clean)", file=sys.stderr, flush=True)
    finally:
        z.close()
    return rows


def readers(work: Path) -> list[tuple[str, int, int, int]]:
    """(layout, question rows on disk, records read, unique ids) for the real-layout fixtures."""
    import contextlib
    import io

    import test_faults_readers as tr

    from posbias.data import get_source
    from posbias.data.registry import resolve_with_quotas

    out = []
    lmms = tr.lmms_lab_pope(work / "readers" / "lmms")
    coco, images = tr.original_pope(work / "readers" / "orig")
    cases = [
        ("lmms-lab/POPE root (data/ + Full/)", [f"pope:{lmms}"], 18),
        ("lmms-lab/POPE data/ only", [f"pope:{lmms / 'data'}"], 9),
        ("original POPE output/coco/ (3 question files + co_occur + ground_truth_objects)", [f"pope:{coco}:{images}"], 9),
        ("POPE parquet (Full/random) + original jsonl", [f"pope:{lmms / 'Full' / 'random-00000-of-00001.parquet'}",
                                                         f"pope:{coco}:{images}"], 12),
    ]
    for label, specs, on_disk in cases:
        with contextlib.redirect_stderr(io.StringIO()):
            sources, _ = resolve_with_quotas(specs, None) if len(specs) > 1 else ([get_source(specs[0])], None)
        src = sources[0]
        keys = [src.key(i) for i in range(len(src))]
        out.append((label, on_disk, len(keys), len(set(keys))))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=4, help="random-time SIGKILLs per command")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commands", default=",".join(fk.COMMANDS))
    p.add_argument("--json", default=None, help="also write the raw counts here")
    args = p.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="posbias-faults-") as tmp:
        work = Path(tmp)
        rows = run_matrix([c for c in args.commands.split(",") if c], args.kills, args.seed, work)
        reader_rows = readers(work)
    classes = ["sigkill", "full disk", "read-only", "injected", "file size", "vanished"]
    print("| fault class | command | faults injected | lost or corrupted | tracebacks | exits | recovered |")
    print("|---|---|---:|---:|---:|---|---|")
    total = {"runs": 0, "lost": 0, "tracebacks": 0}
    for cls in classes:
        for command in args.commands.split(","):
            r = rows.get((cls, command))
            if r is None:
                continue
            exits = ", ".join(f"{k}: {v}" for k, v in sorted(r["exit"].items()))
            rec = {True: "yes", False: "NO"}.get(r.get("recovered"), "-")
            print(f"| {cls} | {command} | {r['runs']} | {r['lost']} | {r['tracebacks']} | {exits} | {rec} |")
            for k in total:
                total[k] += r[k]
    print(f"\ntotal: {total['runs']} faults, {total['lost']} runs lost or corrupted data, "
          f"{total['tracebacks']} printed a traceback ({time.perf_counter() - start:.0f} s)")
    print("\n| layout | question rows on disk | records read | unique ids |")
    print("|---|---:|---:|---:|")
    for label, on_disk, read, unique in reader_rows:
        print(f"| {label} | {on_disk} | {read} | {unique} |")
    notes = [(k, r["notes"]) for k, r in rows.items() if r["notes"]]
    for (cls, command), ns in notes:
        print(f"LOST {cls}/{command}: {ns}")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{c}|{m}": r for (c, m), r in rows.items()}, indent=1))
    return 1 if total["lost"] or total["tracebacks"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
