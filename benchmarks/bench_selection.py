"""Selection overhead of the seeds' greedy selectors vs plain top-k (CPU, torch).

Usage: python benchmarks/bench_selection.py [--repeats 30] [--dim 576] [--demo]

Cases: N=576, k=64 (LLaVA-1.5 grid) and N=2304, k=256 (a 48x48 grid).

- synthetic (default): uniform scores, i.i.d. Gaussian features (``--dim``, 576 = the demo decoder's hidden size)
  and keys (``--key-dim``, 3 KV heads x 64 = 192).
- ``--demo``: the inputs the runtime pruner hands the selectors after layer 2, taken from real forwards of the
  demo models on the four first embedded photos: the last token's attention row at layer 2 (relevance / score),
  the hidden states after layer 2 (MMR features) and layer 2's ``k_proj`` keys (soft-NMS keys);
  demo-llava gives N=576, demo-qwen2.5-vl at 1344x1344 pixels N=2304. These are far from i.i.d.: mean pairwise
  cosine 0.8-0.96, heavy-tailed attention, so suppression and diversity act on many tokens.

Times are medians over ``--repeats`` runs, interleaved per repeat so that machine load affects all selectors
alike (this 2-core machine is shared and its speed drifts by tens of percent between minutes).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator

import torch

from posbias.runtime.methods import arp_select, mmr_select, soft_nms_select, topk_select

__all__ = ["main"]

Case = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int], int]


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return 1000.0 * (time.perf_counter() - t0)


def synthetic_cases(dim: int, key_dim: int) -> Iterator[Case]:
    g = torch.Generator().manual_seed(0)
    for n, k in ((576, 64), (2304, 256)):
        side = int(n ** 0.5)
        idx = torch.arange(n)
        scores = torch.rand(n, generator=g)  # (N,)
        feats = torch.randn(n, dim, generator=g)  # (N, D)
        keys = torch.randn(n, key_dim, generator=g)  # (N, Dk)
        yield "synthetic", scores, feats, keys, idx // side, idx % side, (side, side), k


def demo_cases(layer: int = 2, photos: int = 4) -> Iterator[Case]:
    """Selector inputs from real forwards of the demo models (see the module docstring)."""
    from posbias.data.embedded import PHOTOS, load_photo
    from posbias.models import load_adapter
    from posbias.profiler.capture import capture_attention

    for name, pixels, k in (("demo-llava", None, 64), ("demo-qwen2.5-vl", 1344 * 1344, 256)):
        ad = load_adapter(name)
        if pixels:
            ad.set_pixel_limits(min_pixels=pixels, max_pixels=pixels)
        lm_layer = ad.language_model().layers[layer]
        for p in PHOTOS[:photos]:
            inputs = ad.prepare(load_photo(p.origin), "Describe the picture.")
            lay = ad.layout(inputs)
            vis = torch.as_tensor(lay.visual_index)
            attn = torch.as_tensor(capture_attention(ad, inputs, lay, layers=[layer])[:, 0])  # (V,)
            with torch.inference_mode():
                out = ad.model(**inputs, output_hidden_states=True, logits_to_keep=1)
                h_in = out.hidden_states[layer][0, vis]  # (V, D) input of the layer
                feats = out.hidden_states[layer + 1][0, vis].float().clone()  # (V, D) after the layer
                keys = lm_layer.self_attn.k_proj(lm_layer.input_layernorm(h_in)).float().clone()  # (V, Hkv*Dh)
            yield (f"{name}:{p.name}", attn.float(), feats, keys, torch.as_tensor(lay.rows),
                   torch.as_tensor(lay.cols), tuple(lay.grid), k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--dim", type=int, default=576, help="hidden size of the synthetic MMR features")
    ap.add_argument("--key-dim", type=int, default=192, help="key size of the synthetic soft-NMS keys")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--demo", action="store_true", help="inputs from real demo-model forwards (~1 min to build)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = list(demo_cases()) if args.demo else list(synthetic_cases(args.dim, args.key_dim))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats} (ms)")
    print(f"{'case':34s} {'N':>5} {'k':>4} {'top-k':>8} {'MMR':>8} {'soft-NMS':>9} {'NMS r=5':>8} {'ARP':>8}")
    for label, scores, feats, keys, rows, cols, grid, k in cases:
        n = int(scores.shape[0])
        times: dict[str, list[float]] = {"topk": [], "mmr": [], "nms": [], "disc": [], "arp": []}
        for _ in range(args.repeats + 2):
            times["topk"].append(_time(lambda: topk_select(scores, k)))
            times["mmr"].append(_time(lambda: mmr_select(scores, feats, k)))
            times["nms"].append(_time(lambda: soft_nms_select(scores, rows, cols, keys, k)))  # 5 x 5 square
            # the released neighbourhood (AdaptPrune's default in the pruner): Euclidean distance <= 5
            times["disc"].append(_time(lambda: soft_nms_select(scores, rows, cols, keys, k, window=11, radius=5)))
            times["arp"].append(_time(lambda: arp_select(scores, rows, cols, grid)))
        med = {name: statistics.median(v[2:]) for name, v in times.items()}  # drop 2 warm-up runs
        print(f"{label:34s} {n:>5} {k:>4} {med['topk']:>8.3f} {med['mmr']:>8.3f} {med['nms']:>9.3f} "
              f"{med['disc']:>8.3f} {med['arp']:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
