"""Pruned vs unpruned prefill on demo-llava: time ratio against the FLOPs ratio, and peak memory ratio.

Usage: python benchmarks/bench_prefill.py [--keep 64] [--layer 2] [--repeats 5] [--model demo-llava]

FastV selection (plain top-k) after ``--layer`` keeping ``--keep`` of the 576 visual tokens. The two
sides are interleaved per repeat (full, pruned, full, pruned, ...) so that load from other processes on
this shared machine hits both alike; medians are reported. FLOPs follow PosPrune Eq. 8 summed over
decoder layers. Peak memory is the peak RSS growth during the forward (sampled every ms, CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mem import fix_mmap_threshold  # noqa: E402
from posbias.data.registry import get_source  # noqa: E402
from posbias.evaluate import prefill_flops  # noqa: E402
from posbias.evaluate.fidelity import peak_memory  # noqa: E402
from posbias.models.registry import load_adapter  # noqa: E402
from posbias.runtime import enable_pruning  # noqa: E402

__all__ = ["main"]


def main() -> None:
    fix_mmap_threshold()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-llava")
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    ad = load_adapter(args.model)
    model = ad.model
    sample = get_source("embedded").load(0)
    inputs = ad.prepare(sample.image, sample.question)
    layout = ad.layout(inputs)
    cfg = model.config.get_text_config()
    n_layers = int(cfg.num_hidden_layers)

    def full() -> None:
        with torch.inference_mode():
            model(**inputs, logits_to_keep=1)

    pruner = enable_pruning(model, None, method="fastv", keep=args.keep, layer=args.layer)
    pruner.disable()

    def pruned() -> None:
        with pruner, torch.inference_mode():
            model(**inputs, logits_to_keep=1)

    full()
    pruned()  # warm-up
    t_full, t_pr, m_full, m_pr = [], [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter(); full(); t_full.append(time.perf_counter() - t0)  # noqa: E702
        t0 = time.perf_counter(); pruned(); t_pr.append(time.perf_counter() - t0)  # noqa: E702
        m_full.append(peak_memory(full, interval=0.0005)[1])
        m_pr.append(peak_memory(pruned, interval=0.0005)[1])
    rec = pruner.last
    d, m = int(cfg.hidden_size), int(cfg.intermediate_size)
    f_full = prefill_flops([layout.seq_len] * n_layers, d, m)
    f_pr = prefill_flops(rec.tokens_per_layer, d, m)
    tf, tp = statistics.median(t_full), statistics.median(t_pr)
    mf, mp = statistics.median(m_full), statistics.median(m_pr)
    print(f"{args.model}: {layout.seq_len} prompt tokens, {layout.n_visual} visual, keep {args.keep} after layer "
          f"{args.layer}; torch threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"prefill time   full {1000 * tf:8.1f} ms   pruned {1000 * tp:8.1f} ms   ratio {tp / tf:.3f}")
    print(f"FLOPs (Eq. 8)  full {f_full / 1e9:8.2f} G    pruned {f_pr / 1e9:8.2f} G    ratio {f_pr / f_full:.3f}")
    print(f"peak RSS delta full {mf:8.1f} MiB pruned {mp:8.1f} MiB ratio {mp / mf if mf else float('nan'):.3f}")
    print(f"selection inside the pruned prefill: {rec.select_ms:.2f} ms")


if __name__ == "__main__":
    main()
