"""Wall time of the README's demo run: profile-bias --model demo-llava --n 32, end to end.

Run: python benchmarks/bench_demo_run.py [--n 32] [--model demo-llava]
Reports whether the demo model was already cached (first use builds it from the SmolLM2 gguf).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="demo-llava")
    ap.add_argument("--n", type=int, default=32)
    args = ap.parse_args()
    from posbias.models.demo import demo_folder

    cached = demo_folder(args.model).is_dir()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "posbias.cli", "--model", args.model, "--n", str(args.n), "--out", str(out), "--no-progress"],
            capture_output=True,
            text=True,
            env=dict(os.environ),
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr)
            raise SystemExit(proc.returncode)
        print(proc.stdout.strip())
    print(f"\ndemo run: profile-bias --model {args.model} --n {args.n}: {wall:.1f} s wall "
          f"(demo model {'cached' if cached else 'built on first use'}; goal < 180 s)")


if __name__ == "__main__":
    main()
