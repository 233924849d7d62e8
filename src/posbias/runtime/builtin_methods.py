"""The pruning methods posbias ships, declared once each (registered in :mod:`posbias.runtime.registry`).

torch + stdlib + posbias.artifacts only, like the rest of the runtime. Scores:

- ``fastv``:        attention A of the last prompt token (FastV);
- ``pore``:         A / P(x), P the calibration's exponential (PoRe);
- ``posprune-pbc``: A - ΔA(x), ΔA the calibration's polynomial (PosPrune's position-bias correction);
- ``posprune``:     PBC scores, then Maximal Marginal Relevance over the hidden states, after ARP on the vision
  side (PosPrune);
- ``adaptprune``:   A times the Gaussian centre weight, then adaptive soft-NMS over grid distance and key
  similarity (AdaptPrune);
- ``utp``:          position-agnostic attention for the first ``pa_layers`` layers, pruned to a per-layer
  schedule solved offline (UTP).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from posbias.errors import PosbiasError
from posbias.runtime.methods import arp_quota, gaussian_centre_weight, mmr_select, soft_nms_select, topk_select
from posbias.runtime.registry import Resolving, Selection, SelectionMethod, check_number
from posbias.runtime.scoring import predict_bias, token_positions

__all__ = ["FASTV", "PORE", "POSPRUNE_PBC", "POSPRUNE", "ADAPTPRUNE", "UTP"]


# ---------------------------------------------------------------------------------------------- layer rules
def _entry_layer(key: str):
    """Layer rule: the entry's ``key`` (``layer``, or PBC's ``shallow_layer``)."""
    def rule(calibration: Any, entry: dict[str, Any]) -> int:
        return int(entry[key])

    return rule


def _fastv_layer(calibration: Any, entry: dict[str, Any]) -> int:
    """FastV's own entry when the calibration has one, else the calibration's pruning layer, else K=2."""
    from posbias.runtime.registry import default_layer

    own = calibration.methods.get("fastv") if calibration is not None else None
    return int(own["layer"]) if own else default_layer(calibration, entry)


# ---------------------------------------------------------------------------------------------- scores
def _bias(s: Selection) -> torch.Tensor:
    """(V_cur,) float64 fitted positional bias of the alive tokens (the entry's curve at their positions)."""
    # position = place along the visual run (separators counted), as the fit places stored tokens
    x = token_positions(s.n_alive, s.entry["domain"], n_visual=s.n_run, positions=s.run_index)
    return predict_bias(s.entry["fit"], x)


def _fastv_score(s: Selection) -> torch.Tensor:
    return s.attention()


def _pore_score(s: Selection) -> torch.Tensor:
    return s.attention().double() / _bias(s)


def _pbc_score(s: Selection) -> torch.Tensor:
    return s.attention().double() - _bias(s)


# ---------------------------------------------------------------------------------------------- PosPrune
def _posprune_select(s: Selection) -> torch.Tensor:
    picks = mmr_select(_pbc_score(s), s.features(), s.keep, lam=float(s.params["mmr_lambda"]))
    return torch.sort(picks).values


def _posprune_check(r: Resolving) -> None:
    check_number("mmr_lambda", r.values["mmr_lambda"], low=0.0, high=1.0, hint="PosPrune: 0.9")
    if r.values["arp"] and r.fixed_visual is not None:
        # the vision side's quota is fixed for a fixed square grid: check keep fits after ARP now
        side = math.isqrt(r.fixed_visual)
        ids = torch.arange(side * side)
        _, quota = arp_quota(ids // side, ids % side, (side, side), blocks=int(r.values["arp_blocks"]),
                             centre_ratio=float(r.values["arp_centre_ratio"]), edge_ratio=float(r.values["arp_edge_ratio"]))
        after = int(quota.sum())
        if r.keep is not None and r.keep > after:
            raise PosbiasError(
                f"keep={r.keep} exceeds the {after} visual tokens ARP leaves; pass keep <= {after} "
                "or disable ARP with params={'arp': False}"
            )


# ---------------------------------------------------------------------------------------------- AdaptPrune
def _centre_weight(s: Selection) -> torch.Tensor:
    """(V_cur,) Gaussian centre weight of each token on its own tile's grid (each tile has its own centre): the
    calibration's fitted mask on its own grid for one-tile layouts, else w(u, v) with sigma."""
    rows, cols, tiles = s.rows, s.cols, s.tiles
    mask = s.entry.get("mask")
    if len(tiles) == 1 and mask is not None and s.entry.get("grid") is not None \
            and list(s.entry["grid"]) == list(tiles[0]) and s.params.get("gaussian_sigma") is None:
        full = torch.tensor(mask, dtype=torch.float32)  # (R*C,) raster
        return full[rows * tiles[0][1] + cols]
    sigma = float(s.params["gaussian_sigma_value"])
    if len(tiles) == 1:
        return gaussian_centre_weight(rows, cols, tiles[0], sigma)
    out = torch.empty(rows.shape[0], dtype=torch.float32)
    for t, grid in enumerate(tiles):
        here = s.tile == t
        if bool(here.any()):
            out[here] = gaussian_centre_weight(rows[here], cols[here], grid, sigma).float()  # the shared kernel
    return out


def _adaptprune_select(s: Selection) -> torch.Tensor:
    score = s.attention().float()
    if s.params["gaussian"]:
        score = score * _centre_weight(s)
    p = s.params
    # windows never cross a tile boundary: suppression acts within each tile only
    picks = soft_nms_select(score, s.rows, s.cols, s.keys(), s.keep, sigma_d=float(p["sigma_d"]),
                            sigma_s=float(p["sigma_s"]), window=int(p["window"]), radius=p["radius"],
                            groups=s.tile if len(s.tiles) > 1 else None)
    return torch.sort(picks).values


def _adaptprune_check(r: Resolving) -> None:
    values = r.values
    for name in ("sigma_d", "sigma_s"):
        check_number(name, values[name], low=0.0, low_open=True)
    w = values["window"]
    if isinstance(w, bool) or not isinstance(w, int) or w < 1 or w % 2 == 0:
        raise PosbiasError(f"window={w!r} must be a positive odd int (released code: 11 with radius 5; 5 alone: a 5 x 5 square)")
    if "window" in r.overrides and "radius" not in r.overrides:
        values["radius"] = None  # an explicit window alone asks for the square (window=5: the former default)
    rad = values["radius"]
    if rad is not None and (isinstance(rad, bool) or not isinstance(rad, (int, float)) or not rad >= 0):
        raise PosbiasError(f"radius={rad!r} must be a number >= 0 or None (released code: 5)")
    sig = values["gaussian_sigma"]
    if sig is None:
        sig = float(r.entry.get("fit", {}).get("learned", {}).get("sigma_", 1.0))
    values["gaussian_sigma_value"] = float(sig)


# ---------------------------------------------------------------------------------------------- UTP
def _utp_select(s: Selection) -> torch.Tensor | None:
    schedule = s.spec.schedule
    # the schedule counts every visual token; separators are always among the kept ones
    target = schedule[s.layer + 1] - s.n_separators if s.layer + 1 < len(schedule) else s.n_alive
    target = max(0, min(int(target), s.n_alive))
    if target >= s.n_alive:
        return None
    scores = s.attention(agnostic=s.layer < int(s.params["pa_layers"]))
    return topk_select(scores, target) if target > 0 else torch.zeros(0, dtype=torch.int64)


def _utp_check(r: Resolving) -> None:
    pa = r.values["pa_layers"]
    if isinstance(pa, bool) or not isinstance(pa, int) or pa < 0:
        raise PosbiasError(f"pa_layers={pa!r} must be an int in >= 0")


def _pick_schedule(r: Resolving) -> list[int]:
    doc = r.calibration.to_dict() if r.calibration is not None else {}
    table = doc.get("schedules") or {}
    usable = {k: v for k, v in table.items() if isinstance(v, dict) and v.get("schedule")}
    if not usable:
        raise PosbiasError(
            "method 'utp' needs a layer schedule; the calibration holds none: run `profile-bias solve` "
            "or pass schedule=[...]"
        )
    if r.values["ratio"] is not None:
        target = float(r.values["ratio"])
    elif r.keep is not None and r.fixed_visual:
        target = r.fixed_visual / float(r.keep)
    else:
        target = 4.0
    best = min(usable.values(), key=lambda e: (abs(float(e["ratio"]) - target), float(e["ratio"])))
    return [int(x) for x in best["schedule"]]


def _utp_plan(r: Resolving) -> tuple[list[int], frozenset[int], int]:
    sched = [int(x) for x in r.schedule] if r.schedule is not None else _pick_schedule(r)
    n_layers = r.n_layers
    if len(sched) != n_layers:
        raise PosbiasError(f"the UTP schedule has {len(sched)} entries but the model has {n_layers} layers; pass one per layer")
    if any(b > a for a, b in zip(sched, sched[1:])) or min(sched) < 0:
        raise PosbiasError(f"the UTP schedule {sched} must be non-increasing and >= 0")
    if r.fixed_visual is not None and sched[0] != r.fixed_visual:
        raise PosbiasError(f"the UTP schedule starts with {sched[0]} but the model has {r.fixed_visual} visual tokens")
    score_layers = frozenset(i for i in range(n_layers - 1) if sched[i + 1] < sched[i])
    layer = min(score_layers) if score_layers else n_layers - 1
    return sched, score_layers, layer


# ---------------------------------------------------------------------------------------------- declarations
FASTV = SelectionMethod("fastv", score=_fastv_score, layer=_fastv_layer)
PORE = SelectionMethod("pore", score=_pore_score, entry="pore", layer=_entry_layer("layer"))
POSPRUNE_PBC = SelectionMethod("posprune-pbc", score=_pbc_score, entry="posprune-pbc", layer=_entry_layer("shallow_layer"))
POSPRUNE = SelectionMethod(
    "posprune", select=_posprune_select, entry="posprune-pbc", layer=_entry_layer("shallow_layer"),
    params={"mmr_lambda": 0.9, "arp": True, "arp_centre_ratio": 0.25, "arp_edge_ratio": 0.5, "arp_blocks": 6},
    check=_posprune_check, vision_side=lambda p: bool(p["arp"]),
    label="PosPrune (PBC + ARP + MMR)", colour="#00573F",  # dark green: PBC's green, extended
)
# released adapt_nms_2d: every token within Euclidean distance <= 5 (distance_limit=5); window=5, radius=None gives
# the 5 x 5 square of earlier posbias versions. Scored at the calibration's pruning layer (the anchors: K=2).
ADAPTPRUNE = SelectionMethod(
    "adaptprune", select=_adaptprune_select, entry="adaptprune-gaussian",
    params={"sigma_d": 1.5, "sigma_s": 0.05, "window": 11, "radius": 5.0, "gaussian": True, "gaussian_sigma": None},
    check=_adaptprune_check, uses_entry=lambda p: p.get("gaussian") is not False,
    label="AdaptPrune (Gaussian + soft-NMS)", colour="#7E3A6E",  # dark purple: the Gaussian's purple, extended
)
UTP = SelectionMethod(
    "utp", select=_utp_select, params={"pa_layers": 3, "ratio": None}, check=_utp_check, plan=_utp_plan,
    budget="schedule", layer=lambda calibration, entry: 0, label="UTP (PA-Att + schedule)", colour="#E69F00",
)
