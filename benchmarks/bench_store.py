"""Store figures: size per sample at 576 tokens x 30 layers, one-layer read-back for 800 samples, and the
cost of crash safety (per-sample durable commit, compaction, reading an interrupted store).

Usage: ``python benchmarks/bench_store.py [--samples 800] [--out DIR]``. The attention rows are synthetic
but shaped like real ones (each row a softmax-like distribution over 576 tokens with a recency bias), so
gzip sees realistic float32 mantissas. Timings on a shared machine are noisy; the script reports the
median of ``--repeats`` runs of each read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from posbias.models.base import VisualLayout
from posbias.profiler.store import ProfileStore, ProfileStoreWriter, parts_dir

__all__ = ["main"]

GRID = (24, 24)
N_LAYERS = 30


def _layout() -> VisualLayout:
    r, c = GRID
    idx = np.arange(r * c, dtype=np.int64)  # (V,)
    return VisualLayout(visual_index=35 + idx, rows=idx // c, cols=idx % c, grid=GRID,
                        position_ids=(35 + idx)[:, None], seq_len=35 + r * c + 20)


def _attention(rng: np.random.Generator) -> np.ndarray:
    """(V, L) float32: per layer, the last token's attention mass over the V visual tokens."""
    v = GRID[0] * GRID[1]
    pos = np.linspace(0, 1, v)[:, None]  # (V, 1)
    logits = rng.normal(0, 1.0, (v, N_LAYERS)) + 2.0 * pos * rng.uniform(0, 1, N_LAYERS)  # (V, L)
    w = np.exp(logits)
    w /= w.sum(axis=0, keepdims=True)
    return (w * rng.uniform(0.05, 0.6, N_LAYERS)).astype(np.float32)  # (V, L), part of the mass on text


def _write(path: Path, n: int, *, commit_every: int, stop_before_close: bool = False) -> float:
    rng = np.random.default_rng(0)
    lay = _layout()
    attrs = {"model_id": "bench", "model_fingerprint": "sha256:0", "adapter": "llava", "seed": 0}
    t0 = time.perf_counter()
    w = ProfileStoreWriter(path, n_layers=N_LAYERS, rope_dims=1, attrs=attrs, commit_every=commit_every)
    for i in range(n):
        w.append(sample_id=f"b:{i:05d}", source="b", question="Is there a cat in the image?", answer="yes",
                 layout=lay, attn=_attention(rng))
    if stop_before_close:
        w.commit()
        w._unlock()  # what a killed run leaves: segments, no compaction
        w._closed = True  # and no compaction when garbage-collected
        return time.perf_counter() - t0
    w.close()
    return time.perf_counter() - t0


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=800)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="folder for the stores (default: a temporary folder, deleted)")
    args = ap.parse_args(argv)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_store_"))
    root.mkdir(parents=True, exist_ok=True)
    n = args.samples
    res: dict = {"samples": n, "tokens_per_sample": GRID[0] * GRID[1], "layers": N_LAYERS}
    try:
        path = root / "profile.h5"
        if path.exists():
            path.unlink()
        res["write_s_per_sample_durable"] = _write(path, n, commit_every=1) / n
        size = path.stat().st_size
        res["store_bytes"] = size
        res["bytes_per_sample"] = size / n
        res["raw_attn_bytes_per_sample"] = GRID[0] * GRID[1] * N_LAYERS * 4

        def read_layer() -> None:
            with ProfileStore(path) as st:
                st.layer(2)

        res["open_plus_one_layer_read_s"] = _median_time(read_layer, args.repeats)
        with ProfileStore(path) as st:
            t = time.perf_counter()
            col = st.layer(2)
            res["one_layer_read_s_open_store"] = time.perf_counter() - t
            assert col.shape == (n * GRID[0] * GRID[1],)

        # an interrupted run: per-sample segments, read without compaction, then compacted
        killed = root / "killed.h5"
        for p in (killed,):
            if p.exists():
                p.unlink()
        if parts_dir(killed).exists():
            shutil.rmtree(parts_dir(killed))
        _write(killed, n, commit_every=1, stop_before_close=True)
        res["segments"] = len(list(parts_dir(killed).glob("seg-*")))

        def read_killed() -> None:
            with ProfileStore(killed) as st:
                st.layer(2)

        res["interrupted_open_plus_one_layer_read_s"] = _median_time(read_killed, max(1, args.repeats // 2))
        attrs = {"model_id": "bench", "model_fingerprint": "sha256:0", "adapter": "llava", "seed": 0}
        t = time.perf_counter()
        with ProfileStoreWriter(killed, n_layers=N_LAYERS, rope_dims=1, attrs=attrs, resume=True):
            pass  # close() compacts
        res["compaction_s"] = time.perf_counter() - t
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    for k, v in res.items():
        print(f"{k:42s} {v:.4g}" if isinstance(v, float) else f"{k:42s} {v}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
