"""Cost of the full signal set per sample vs a plain forward, on demo-llava (or demo-qwen2.5-vl).

Compares, interleaved in one run (so machine noise hits every side alike), the median wall time of

- ``plain``: one ordinary sdpa forward (``adapter.forward_last_logits``), no capture;
- ``attn``: the attention-only capture (``SignalCapture(signals="attn")``);
- ``all``: the full signal set (attn, attn_pa, vision_importance, region_logdet + region_logdet_vision),
  everything a profiling run computes per sample, arrays on the CPU as numpy.
- ``all+heads``: the full set plus per-head rows.

Target (issue 3): ``all / plain <= 1.3``. Both wall time and process CPU time are reported; on a shared
machine the CPU time of a single-threaded run (``--threads 1``, the default) is the steadier measure.

Run: python benchmarks/bench_signals.py [--model demo-llava] [--repeats 9] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

__all__ = ["main"]


def _inputs(adapter):
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.astronaut())
    inputs = adapter.prepare(image, "What is the person in the picture wearing, and what is behind her?")
    return inputs, adapter.layout(inputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo-llava")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from posbias.models import load_adapter
    from posbias.profiler.signals import SignalCapture

    adapter = load_adapter(args.model)
    inputs, layout = _inputs(adapter)
    captures = {
        "attn": SignalCapture(adapter, signals="attn"),
        "all": SignalCapture(adapter, signals="all"),
        "all+heads": SignalCapture(adapter, signals="all", per_head=True),
    }

    def plain() -> None:
        adapter.forward_last_logits(inputs)

    def runner(cap: SignalCapture):
        def fn() -> None:
            with cap:  # entering/leaving (swapping implementations, hooks) is part of the cost
                cap.run(inputs, layout)
        return fn

    sides = {"plain": plain, **{k: runner(c) for k, c in captures.items()}}
    for fn in sides.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.repeats):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # alternate order against drift
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            sides[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    results = {
        "model": args.model,
        "threads": torch.get_num_threads(),
        "seq_len": layout.seq_len,
        "n_visual": layout.n_visual,
        "repeats": args.repeats,
        "median_wall_s": med_wall,
        "median_cpu_s": med_cpu,
        "wall_ratio_to_plain": {k: med_wall[k] / med_wall["plain"] for k in sides},
        "cpu_ratio_to_plain": {k: med_cpu[k] / med_cpu["plain"] for k in sides},
        "wall_s": wall,
        "cpu_s": cpu,
    }
    print(f"signal cost on {args.model} ({layout.seq_len} tokens, {layout.n_visual} visual, "
          f"{results['threads']} thread(s), median of {args.repeats}, interleaved):")
    print(f"  {'side':<10} {'wall ms':>9} {'x plain':>8} {'cpu ms':>9} {'x plain':>8}")
    for name in sides:
        print(f"  {name:<10} {med_wall[name] * 1000:9.1f} {results['wall_ratio_to_plain'][name]:8.3f} "
              f"{med_cpu[name] * 1000:9.1f} {results['cpu_ratio_to_plain'][name]:8.3f}")
    ratio = results["cpu_ratio_to_plain"]["all"]
    print(f"target: all / plain <= 1.3 (cpu time) -> {ratio:.3f}, {'met' if ratio <= 1.3 else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
