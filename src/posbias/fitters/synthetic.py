"""Synthetic profile stores with known, injected bias: for tests, benchmarks and sanity checks.

Each sample's attention at layer ``l`` is ``base + bias_l(row, col) + sample effect + noise``:

- ``bias_l`` is a caller function of the raster index x (and the grid coordinates), added at the shallow
  layer (so ``A_shallow - A_deep`` has the injected bias in expectation) or at every layer with a weight;
- the sample effect is a random smooth per-sample curve (a random offset and slope in x): it makes the
  tokens of one sample correlated, as real image semantics do, so that cluster-robust intervals matter;
- the noise is iid normal per token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from posbias.errors import PosbiasError

__all__ = ["write_synthetic_store"]

BiasFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def write_synthetic_store(
    path: str | Path,
    *,
    n_samples: int,
    grid: tuple[int, int] | Sequence[tuple[int, int]] = (24, 24),
    n_layers: int = 32,
    shallow_bias: BiasFn | dict[str, BiasFn] | None = None,
    shallow_layer: int = 1,
    base: float = 1e-3,
    noise: float = 2e-4,
    sample_effect: float = 1e-4,
    sources: Sequence[str] = ("synth",),
    nan_samples: Sequence[int] = (),
    seed: int = 0,
    extra: Callable[[Any], None] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a store with a known bias.

    Parameters
    ----------
    path : path
        File to write.
    n_samples : int
        S.
    grid : (rows, cols) or sequence of them
        One grid for all samples, or one per sample cycled (dynamic resolution).
    n_layers : int
        L.
    shallow_bias : callable or dict, optional
        ``f(x, u, v) -> (V,)`` bias added at ``shallow_layer`` with x the raster index (or i/N for
        dynamic grids, see below), u, v the centred coordinates; a dict maps source name -> function.
        For samples with different grids x is ``i / V``; with one grid it is the raster index.
    shallow_layer : int
        Layer that gets the bias; every other layer is unbiased.
    base, noise, sample_effect : float
        Constant level, per-token noise sd, per-sample random offset/slope sd.
    sources : sequence of str
        Source names, assigned round-robin.
    nan_samples : sequence of int
        Sample indices whose shallow-layer attention gets a NaN and an inf (fp16 overflow).
    seed : int
        RNG seed.
    extra : callable, optional
        ``extra(h5py.File)`` called after writing (to add datasets such as region_logdet).
    overwrite : bool

    Returns
    -------
    Path
    """
    import h5py

    from posbias.models.base import VisualLayout
    from posbias.profiler.store import ProfileStoreWriter

    if int(n_samples) < 1:
        raise PosbiasError("write_synthetic_store: n_samples must be >= 1")
    grids = [tuple(grid)] if isinstance(grid[0], (int, np.integer)) else [tuple(g) for g in grid]  # type: ignore[index, arg-type]
    fixed = len(set(grids)) == 1
    rng = np.random.default_rng(seed)
    path = Path(path)
    attrs = {"model_id": "synthetic", "model_fingerprint": "sha256:" + "0" * 16, "adapter": "llava", "seed": int(seed)}
    nan_set = {int(i) for i in nan_samples}
    with ProfileStoreWriter(path, n_layers=int(n_layers), rope_dims=1, attrs=attrs, overwrite=overwrite) as w:
        for s in range(int(n_samples)):
            r, c = (int(g) for g in grids[s % len(grids)])
            v = r * c
            idx = np.arange(v, dtype=np.int64)  # (V,)
            rows, cols = idx // c, idx % c  # (V,) each
            u = np.linspace(-1, 1, r)[rows] if r > 1 else np.zeros(v)  # (V,)
            vv = np.linspace(-1, 1, c)[cols] if c > 1 else np.zeros(v)  # (V,)
            x = idx.astype(np.float64) if fixed else idx / float(v)  # (V,)
            src = sources[s % len(sources)]
            xn = idx / max(v - 1, 1)  # (V,) in [0, 1]
            effect = rng.normal(0, sample_effect) + rng.normal(0, sample_effect) * (xn - 0.5)  # (V,)
            attn = base + effect[:, None] + rng.normal(0, noise, (v, int(n_layers)))  # (V, L)
            fn = shallow_bias.get(src) if isinstance(shallow_bias, dict) else shallow_bias
            # the shallow layer's own per-sample semantics (does not cancel in A_shallow - A_deep)
            attn[:, shallow_layer] += rng.normal(0, sample_effect) + rng.normal(0, sample_effect) * (xn - 0.5)
            if fn is not None:
                attn[:, shallow_layer] += np.asarray(fn(x, u, vv), dtype=np.float64)
            if s in nan_set:
                attn[0, shallow_layer] = np.nan
                attn[1 % v, shallow_layer] = np.inf
            layout = VisualLayout(
                visual_index=np.arange(5, 5 + v, dtype=np.int64),
                rows=rows,
                cols=cols,
                grid=(r, c),
                position_ids=np.arange(5, 5 + v, dtype=np.int64)[:, None],
                seq_len=5 + v + 10,
            )
            w.append(sample_id=f"{src}:{s:05d}", source=src, question="q", answer="a", layout=layout,
                     attn=attn.astype(np.float32))
    if extra is not None:
        with h5py.File(path, "a") as f:
            extra(f)
    return path
