"""Selection overhead of the seeds' greedy selectors vs plain top-k (CPU, torch).

Usage: python benchmarks/bench_selection.py [--repeats 20] [--dim 576]

Cases: N=576, k=64 (LLaVA-1.5 grid) and N=2304, k=256 (a 48x48 grid). Features/keys have ``--dim``
dimensions (576 = the demo decoder's hidden size; keys use 3 KV heads x 64 = 192). Times are medians over
``--repeats`` runs, interleaved per repeat so that machine load affects all selectors alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from posbias.runtime.methods import arp_select, mmr_select, soft_nms_select, topk_select

__all__ = ["main"]


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return 1000.0 * (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dim", type=int, default=576, help="hidden size of the MMR features")
    ap.add_argument("--key-dim", type=int, default=192, help="key size of the soft-NMS keys")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats} (ms)")
    print(f"{'N':>5} {'k':>4} {'top-k':>8} {'MMR':>8} {'soft-NMS':>9} {'ARP':>8}")
    for n, k in ((576, 64), (2304, 256)):
        side = int(n ** 0.5)
        idx = torch.arange(n)
        rows, cols = idx // side, idx % side
        scores = torch.rand(n, generator=g)  # (N,)
        feats = torch.randn(n, args.dim, generator=g)  # (N, D)
        keys = torch.randn(n, args.key_dim, generator=g)  # (N, Dk)
        times: dict[str, list[float]] = {"topk": [], "mmr": [], "nms": [], "arp": []}
        for _ in range(args.repeats + 2):
            times["topk"].append(_time(lambda: topk_select(scores, k)))
            times["mmr"].append(_time(lambda: mmr_select(scores, feats, k)))
            times["nms"].append(_time(lambda: soft_nms_select(scores, rows, cols, keys, k)))
            times["arp"].append(_time(lambda: arp_select(scores, rows, cols, (side, side))))
        med = {name: statistics.median(v[2:]) for name, v in times.items()}  # drop 2 warm-up runs
        print(f"{n:>5} {k:>4} {med['topk']:>8.3f} {med['mmr']:>8.3f} {med['nms']:>9.3f} {med['arp']:>8.3f}")


if __name__ == "__main__":
    main()
