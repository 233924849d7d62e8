"""Helpers for tests and benchmarks, not used by the library itself: reference implementations to check the
fast paths against, and synthetic stores with a known bias.

- :func:`write_synthetic_store`: a real HDF5 store (written with the store writer) with an injected bias;
- :func:`brute_force`: the best UTP schedule by enumeration (reference for the MILP solver);
- :func:`info_loss_naive`: UTP's information loss by L full forwards (reference for
  :func:`posbias.profiler.utr.info_loss`);
- :func:`next_keep`, :func:`schedule_masks`: progressive nested top-k of a UTP schedule over all layers at once
  (reference for the runtime's per-layer pruning).

Every heavy import (torch, h5py, the store) happens inside the function that needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from posbias.errors import PosbiasError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["write_synthetic_store", "brute_force", "info_loss_naive", "next_keep", "schedule_masks"]

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


def brute_force(
    metrics: Sequence[np.ndarray], losses: np.ndarray, budget: int, *, min_keep: int = 1
) -> tuple[np.ndarray, float]:
    """(best schedule, its summed progressive loss) by enumerating :func:`~posbias.solvers.utp.iter_schedules`."""
    from posbias.solvers.utp import iter_schedules, simulate_loss

    v, n_layers = np.asarray(metrics[0]).shape
    best, best_val = None, np.inf
    for sched in iter_schedules(v, n_layers, budget, min_keep=min_keep):
        val = sum(simulate_loss(m, ell, sched) for m, ell in zip(metrics, losses, strict=True))
        if val < best_val - 1e-12:
            best, best_val = sched, val
    if best is None:
        raise PosbiasError("no admissible schedule; check the budget")
    return best, float(best_val)


def info_loss_naive(adapter: Any, inputs: dict[str, Any], *, return_features: bool = False) -> Any:
    """Information loss ``ell`` (L,) by L full forwards (reference for :func:`info_loss`).

    Forward i runs the unmodified model except that, from layer i on, text queries cannot attend to
    visual keys (the causal mask of those layers is edited): the text tokens then compute exactly what
    they would with the visual tokens removed from layer i on. Needs a tensor mask, so it runs the model
    with eager attention for the duration of the call.
    """
    import torch

    from posbias.profiler.utr import _check_inputs, _record_full, feature_angle

    text, vis = _check_inputs(adapter, inputs)
    lm = adapter.language_model()
    layers = list(lm.layers)
    model = adapter.model
    _, _, g, _ = _record_full(adapter, inputs)
    s = int(inputs["input_ids"].shape[1])
    dtype = adapter.model.get_input_embeddings().weight.dtype
    dev = g.device
    neg = torch.finfo(dtype).min
    base = torch.full((s, s), neg, dtype=dtype, device=dev).triu(1)  # (S, S) additive causal
    blocked = base.clone()
    ti = torch.as_tensor(text, device=dev)
    vi = torch.as_tensor(vis, device=dev)
    blocked[ti.unsqueeze(1), vi.unsqueeze(0)] = neg  # text queries cannot see visual keys
    base4 = base[None, None]  # (1, 1, S, S)
    blocked4 = blocked[None, None]  # (1, 1, S, S)

    feats = []
    for start in range(len(layers)):

        def pre_hook(idx: int):
            def hook(module: Any, args: tuple, kwargs: dict) -> tuple:
                kwargs = dict(kwargs)
                kwargs["attention_mask"] = blocked4 if idx >= start else base4
                return args, kwargs

            return hook

        handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        final: list[Any] = [None]
        handles.append(lm.norm.register_forward_hook(lambda m, a, o: final.__setitem__(0, o.detach())))
        old = _set_eager(model)
        try:
            with torch.inference_mode():
                model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            _restore_attn(model, old)
            for h in handles:
                h.remove()
        feats.append(final[0][0, -1].double().cpu().numpy())
    f = np.stack(feats)  # (L, D) float64
    g_np = g.double().cpu().numpy()  # (D,)
    ell = feature_angle(f, g_np)
    return (ell, f, g_np) if return_features else ell


def _set_eager(model: Any) -> Any:
    """Switch the decoder to eager attention; returns the previous implementation name."""
    from posbias._hf_compat import attention_implementation, set_attention_implementation

    lm = model.model.language_model
    old = attention_implementation(lm)
    set_attention_implementation(lm, "eager")
    return old


def _restore_attn(model: Any, old: Any) -> None:
    from posbias._hf_compat import set_attention_implementation

    if old is not None:
        set_attention_implementation(model.model.language_model, old)


def next_keep(alive: torch.Tensor, scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices kept at the next layer (a reference for the runtime's UTP schedule).


    Parameters
    ----------
    alive : torch.Tensor
        (n,) int64 ascending indices of the visual tokens kept at the previous layer.
    scores : torch.Tensor
        (n,) float scores of those tokens at the previous layer (e.g. its last-token attention,
        position-agnostic in the first layers when configured).
    keep : int
        Tokens to keep, ``0 <= keep <= n``.

    Returns
    -------
    torch.Tensor
        (keep,) int64 ascending subset of ``alive``.
    """
    import torch

    n = int(alive.shape[0])
    if not 0 <= int(keep) <= n or scores.shape != alive.shape:
        raise ValueError(f"keep={keep} must lie in [0, {n}] and scores must match alive {tuple(alive.shape)}")
    order = torch.sort(-scores.double(), stable=True).indices  # (n,) best first, ties by position
    return torch.sort(alive[order[: int(keep)]]).values  # (keep,)


def schedule_masks(scores: torch.Tensor, schedule: Sequence[int]) -> torch.Tensor:
    """(L, V) bool keep masks of a schedule given every layer's scores over all V tokens (offline use).

    Parameters
    ----------
    scores : torch.Tensor
        (V, L) per-layer scores; column i-1 ranks the tokens for layer i.
    schedule : sequence of int
        (L,) kept tokens per layer, non-increasing, ``schedule[0] == V``.
    """
    import torch

    v, n_layers = scores.shape
    if len(schedule) != n_layers or int(schedule[0]) != v:
        raise ValueError(f"schedule of length {len(schedule)} starting {schedule[0]} does not fit scores {tuple(scores.shape)}")
    masks = torch.zeros(n_layers, v, dtype=torch.bool)  # (L, V)
    alive = torch.arange(v)  # (n,)
    masks[0] = True
    for i in range(1, n_layers):
        alive = next_keep(alive, scores[alive, i - 1], int(schedule[i]))
        masks[i, alive] = True
    return masks
