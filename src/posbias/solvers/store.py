"""Schedules from a profile store: the ``solve`` stage as a library call (docs/utp.md)."""

from __future__ import annotations

from collections import Counter

import numpy as np

__all__ = ["solve_store"]


def solve_store(store_path: str, ratios: list[float], *, formulation: str = "compact", mode: str = "joint",
                pa_layers: int = 3, min_keep: int = 1, time_limit: float = 60.0, levels: int | None = 33) -> dict[str, dict]:
    """Schedules for every ratio from a store; returns the calibration's ``schedules`` section."""
    from posbias.errors import PosbiasError
    from posbias.profiler.store import ProfileStore
    from posbias.solvers.utp import UTPSolver, ranking_metric

    with ProfileStore(store_path) as store:
        loss = store.utr_loss  # (S, L) or None
        if loss is None:
            raise PosbiasError(
                f"store {store_path} has no /samples/utr_loss; run 'profile-bias utr --store {store_path}' first"
            )
        if store.n_samples == 0:
            raise PosbiasError(f"store {store_path} has no samples; run 'profile-bias profile' first")
        use_pa = store.has_attn_pa and pa_layers > 0
        metric_name = f"attn_pa[:{pa_layers}]+attn" if use_pa else "attn (no /tokens/attn_pa in the store)"
        v_common = Counter(store.n_visual.tolist()).most_common(1)[0][0]
        ids, metrics, ells = [], [], []
        for i in range(store.n_samples):
            if int(store.n_visual[i]) != v_common or not np.isfinite(loss[i, 1:]).all():
                continue
            attn = store.sample_attn(i)  # (V, L) float32
            if not np.isfinite(attn).all():
                continue
            pa = store.sample_attn_pa(i) if use_pa else None
            metrics.append(ranking_metric(attn, pa, pa_layers=pa_layers))
            ells.append(loss[i])
            ids.append(store.sample_ids[i])
    if not ids:
        raise PosbiasError(
            f"store {store_path} has no sample with finite utr_loss and attention rows; "
            f"run 'profile-bias utr --store {store_path}' (or re-profile)"
        )
    out: dict[str, dict] = {}
    for ratio in ratios:
        solver = UTPSolver(ratio=ratio, formulation=formulation, levels=levels, mode=mode, min_keep=min_keep,
                           time_limit=time_limit).fit(metrics, np.asarray(ells))
        entry = solver.to_dict()
        entry["metric"] = metric_name
        entry["samples"] = ids
        out[f"{ratio:g}"] = entry
    return out
