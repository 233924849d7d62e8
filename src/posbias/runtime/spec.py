"""Resolve a pruning method's parameters: artifact first, explicit overrides second, errors before compute."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posbias.artifacts.calibration import Calibration
from posbias.artifacts.fingerprint import model_fingerprint
from posbias.errors import PosbiasError

__all__ = ["PRUNE_METHODS", "PARAMS", "CALIBRATION_ENTRY", "DEFAULT_K", "MethodSpec", "resolve_method", "n_decoder_layers",
           "layer_from_k"]

#: the papers' pruning layer K (FastV, AdaptPrune, PosPrune, PoRe on FastV: K=2 in their released code)
DEFAULT_K = 2


def layer_from_k(k: int) -> int:
    """posbias's ``layer`` for a paper's ``K``.

    FastV's ``K`` (and AdaptPrune's, PosPrune's "second layer", PoRe's FastV base) counts the decoder layers that run
    on all tokens: tokens are scored with the last token's attention in 0-based layer ``K - 1`` and are absent from
    0-based layer ``K`` on. posbias's ``layer`` names the scoring layer itself, so ``layer = K - 1`` (K=2: layer 1).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise PosbiasError(f"k={k!r} must be an int >= 1 (the paper's pruning layer K: scored at layer K-1, pruned from K)")
    return k - 1

#: selection methods of the pruner
PRUNE_METHODS: tuple[str, ...] = ("fastv", "pore", "posprune-pbc", "posprune", "adaptprune", "utp")

#: method -> tunable parameters and their defaults (the seeds' / anchors' constants)
PARAMS: dict[str, dict[str, Any]] = {
    "fastv": {},
    "pore": {},
    "posprune-pbc": {},
    "posprune": {"mmr_lambda": 0.9, "arp": True, "arp_centre_ratio": 0.25, "arp_edge_ratio": 0.5, "arp_blocks": 6},
    # released adapt_nms_2d: every token within Euclidean distance <= 5 (distance_limit=5); window=5, radius=None
    # gives the 5 x 5 square of earlier posbias versions
    "adaptprune": {"sigma_d": 1.5, "sigma_s": 0.05, "window": 11, "radius": 5.0, "gaussian": True,
                   "gaussian_sigma": None},
    "utp": {"pa_layers": 3, "ratio": None},
}

#: method -> calibration entry that holds its fitted parameters (None: needs none)
CALIBRATION_ENTRY: dict[str, str | None] = {
    "fastv": None,
    "pore": "pore",
    "posprune-pbc": "posprune-pbc",
    "posprune": "posprune-pbc",
    "adaptprune": "adaptprune-gaussian",
    "utp": None,
}


def n_decoder_layers(model: Any) -> int:
    """Decoder layers of a transformers VLM (its architecture's answer)."""
    from posbias.models.registry import architecture_of

    return architecture_of(model).n_layers


def _fixed_grid(model: Any) -> tuple[int, int] | None:
    """The token grid when the architecture fixes it (LLaVA: (image/patch) squared), else None."""
    from posbias.models.registry import architecture_of

    return architecture_of(model).fixed_grid()


def _fixed_visual_count(model: Any) -> int | None:
    """Visual tokens per prompt when the architecture fixes it (LLaVA: (image/patch)^2), else None."""
    from posbias.models.registry import architecture_of

    return architecture_of(model).fixed_visual_count()


@dataclass
class MethodSpec:
    """A fully resolved pruning configuration.

    Attributes
    ----------
    method : str
    layer : int
        0-based decoder layer whose attention scores the tokens; they are dropped after it (the papers' ``K`` is
        ``layer + 1``, see :func:`layer_from_k`).
    keep, ratio : int or None, float or None
        Budget: exactly one is set.
    params : dict
        Method parameters after defaults, artifact values and overrides.
    entry : dict
        The calibration entry the method reads (empty for fastv / utp).
    schedule : list of int
        UTP schedule (L,), ``schedule[0] == V`` (empty for other methods).
    score_layers : frozenset of int
        Decoder layers whose attention is scored.
    arp : bool
        Vision-side ARP before the decoder (posprune).
    """

    method: str
    layer: int
    keep: int | None
    ratio: float | None
    params: dict[str, Any]
    entry: dict[str, Any] = field(default_factory=dict)
    schedule: list[int] = field(default_factory=list)
    score_layers: frozenset[int] = frozenset()
    arp: bool = False

    def keep_for(self, n_visual: int) -> int:
        """Tokens kept for a prompt with ``n_visual`` visual tokens."""
        if self.keep is not None:
            return int(self.keep)
        assert self.ratio is not None
        return max(1, int(round(self.ratio * n_visual)))

    def check_budget(self, n_visual: int, *, after: str = "") -> None:
        """PosbiasError unless the budget fits ``n_visual`` tokens (called before any compute)."""
        if self.method == "utp":
            if self.schedule and int(self.schedule[0]) != n_visual:
                raise PosbiasError(
                    f"the UTP schedule starts with {self.schedule[0]} visual tokens but the prompt has {n_visual}; "
                    "solve a schedule for this image size or pass schedule=..."
                )
            return
        k = self.keep_for(n_visual)
        if k > n_visual:
            where = f" after {after}" if after else ""
            raise PosbiasError(
                f"keep={k} exceeds the {n_visual} visual tokens{where}; pass keep <= {n_visual}"
                + (" or disable ARP with params={'arp': False}" if after else "")
            )


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        rng = f"{low}..{high}" if high is not None else f">= {low}"
        raise PosbiasError(f"{name}={value!r} must be an int in {rng}")
    return value


def _pick_schedule(cal: Calibration | None, keep: int | None, ratio_param: Any, n_visual: int | None) -> list[int]:
    doc = cal.to_dict() if cal is not None else {}
    table = doc.get("schedules") or {}
    usable = {k: v for k, v in table.items() if isinstance(v, dict) and v.get("schedule")}
    if not usable:
        raise PosbiasError(
            "method 'utp' needs a layer schedule; the calibration holds none: run `profile-bias solve` "
            "or pass schedule=[...]"
        )
    if ratio_param is not None:
        target = float(ratio_param)
    elif keep is not None and n_visual:
        target = n_visual / float(keep)
    else:
        target = 4.0
    best = min(usable.values(), key=lambda e: (abs(float(e["ratio"]) - target), float(e["ratio"])))
    return [int(x) for x in best["schedule"]]


def resolve_method(
    model: Any,
    calibration: Calibration | None,
    *,
    method: str | None = None,
    keep: int | None = None,
    ratio: float | None = None,
    layer: int | None = None,
    params: dict[str, Any] | None = None,
    schedule: list[int] | None = None,
    check_fingerprint: bool = True,
    k: int | None = None,
) -> MethodSpec:
    """Validate everything that can be validated before a forward and return the :class:`MethodSpec`.

    Raises
    ------
    posbias.errors.PosbiasError
        Fingerprint mismatch, unknown method, a method the calibration has no parameters for, unknown
        parameter names, keep <= 0 (or above the fixed visual count), a layer outside the model.
    """
    if calibration is not None and not isinstance(calibration, Calibration):
        raise PosbiasError(f"calibration must be a posbias Calibration, got {type(calibration).__name__}; use Calibration.load(path)")
    if calibration is not None and check_fingerprint:
        calibration.check_fingerprint(model_fingerprint(model.config.to_dict()), model_id=str(getattr(model, "name_or_path", "")))
    if method is None:
        method = calibration.defaults["method"] if calibration is not None else "fastv"
        if method not in PRUNE_METHODS:
            method = "fastv"
    if method not in PRUNE_METHODS:
        raise PosbiasError(f"unknown pruning method {method!r}; use one of {', '.join(PRUNE_METHODS)}")
    n_layers = n_decoder_layers(model)
    if k is not None:
        if layer is not None:
            raise PosbiasError("pass either layer=... (0-based scoring layer) or k=... (the paper's K = layer + 1), not both")
        layer = layer_from_k(k)
        if layer > n_layers - 2:
            raise PosbiasError(f"k={k} is outside the model: K can be 1..{n_layers - 1} (the model has {n_layers} layers)")

    # parameters: defaults <- artifact entry under the method's own name <- explicit overrides
    values = dict(PARAMS[method])
    own = calibration.methods.get(method, {}) if calibration is not None else {}
    for key in values:
        if key in own:
            values[key] = own[key]
    if params:
        unknown = sorted(set(params) - set(values))
        if unknown:
            allowed = ", ".join(sorted(values)) or "none"
            raise PosbiasError(f"unknown parameter(s) {unknown} for method {method!r}; allowed: {allowed}")
        values.update(params)

    entry_name = CALIBRATION_ENTRY[method]
    entry: dict[str, Any] = {}
    if entry_name is not None:
        if calibration is None:
            raise PosbiasError(f"method {method!r} needs a calibration with {entry_name!r}; pass calibration=Calibration.load(...)")
        entry = calibration.method(entry_name)  # one-line error listing what is available

    # budget
    if (keep is None) == (ratio is None):
        if keep is None and ratio is None and calibration is not None and method != "utp":
            keep = int(calibration.defaults["keep"])
        elif keep is not None:
            raise PosbiasError("pass either keep=K or ratio=r, not both")
        elif method != "utp":
            raise PosbiasError("pass keep=K (visual tokens kept) or ratio=r (fraction kept)")
    if keep is not None:
        _check_int("keep", keep, 1)
        fixed = _fixed_visual_count(model)
        if fixed is not None and keep > fixed:
            raise PosbiasError(f"keep={keep} exceeds the {fixed} visual tokens of this model; pass keep <= {fixed}")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
            raise PosbiasError(f"ratio={ratio!r} must be a number in (0, 1] (fraction of visual tokens kept)")
        ratio = float(ratio)

    # layer
    if layer is None:
        if method in ("pore",):
            layer = int(entry["layer"])
        elif method in ("posprune-pbc", "posprune"):
            layer = int(entry["shallow_layer"])
        elif method == "adaptprune":
            layer = int(calibration.defaults["layer"])  # the calibration's pruning layer (anchors: K=2)
        elif method == "fastv":
            fv = calibration.methods.get("fastv") if calibration is not None else None
            layer = int(fv["layer"]) if fv else (int(calibration.defaults["layer"]) if calibration is not None
                                                 else layer_from_k(DEFAULT_K))
        else:
            layer = 0
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n_layers - 2:
        _layer_error(layer, n_layers)

    sched: list[int] = []
    score_layers: frozenset[int] = frozenset({layer})
    if method == "utp":
        _check_int("pa_layers", values["pa_layers"], 0)
        if schedule is not None:
            sched = [int(x) for x in schedule]
        else:
            sched = _pick_schedule(calibration, keep, values["ratio"], _fixed_visual_count(model))
        if len(sched) != n_layers:
            raise PosbiasError(f"the UTP schedule has {len(sched)} entries but the model has {n_layers} layers; pass one per layer")
        if any(b > a for a, b in zip(sched, sched[1:])) or min(sched) < 0:
            raise PosbiasError(f"the UTP schedule {sched} must be non-increasing and >= 0")
        fixed = _fixed_visual_count(model)
        if fixed is not None and sched[0] != fixed:
            raise PosbiasError(f"the UTP schedule starts with {sched[0]} but the model has {fixed} visual tokens")
        score_layers = frozenset(i for i in range(n_layers - 1) if sched[i + 1] < sched[i])
        layer = min(score_layers) if score_layers else n_layers - 1
    if method == "adaptprune":
        for name in ("sigma_d", "sigma_s"):
            if not isinstance(values[name], (int, float)) or isinstance(values[name], bool) or values[name] <= 0:
                raise PosbiasError(f"{name}={values[name]!r} must be a number > 0")
        w = values["window"]
        if isinstance(w, bool) or not isinstance(w, int) or w < 1 or w % 2 == 0:
            raise PosbiasError(f"window={w!r} must be a positive odd int (released code: 11 with radius 5; 5 alone: a 5 x 5 square)")
        if params and "window" in params and "radius" not in params:
            values["radius"] = None  # an explicit window alone asks for the square (window=5: the former default)
        r = values["radius"]
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not r >= 0):
            raise PosbiasError(f"radius={r!r} must be a number >= 0 or None (released code: 5)")
        sig = values["gaussian_sigma"]
        if sig is None:
            sig = float(entry.get("fit", {}).get("learned", {}).get("sigma_", 1.0))
        values["gaussian_sigma_value"] = float(sig)
    if method == "posprune":
        lam = values["mmr_lambda"]
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
            raise PosbiasError(f"mmr_lambda={lam!r} must be a number in [0, 1] (seed: 0.9)")
        fixed_grid = _fixed_grid(model) if values["arp"] else None
        if fixed_grid is not None:
            # the vision side's quota is fixed when the architecture fixes the grid (LLaVA): check keep fits after ARP now
            from posbias.runtime.methods import arp_quota
            import torch

            side_r, side_c = fixed_grid
            ids = torch.arange(side_r * side_c)
            _, quota = arp_quota(ids // side_c, ids % side_c, (side_r, side_c), blocks=int(values["arp_blocks"]),
                                 centre_ratio=float(values["arp_centre_ratio"]), edge_ratio=float(values["arp_edge_ratio"]))
            after = int(quota.sum())
            if keep is not None and keep > after:
                raise PosbiasError(
                    f"keep={keep} exceeds the {after} visual tokens ARP leaves; pass keep <= {after} "
                    "or disable ARP with params={'arp': False}"
                )
    return MethodSpec(method=method, layer=int(layer), keep=keep, ratio=ratio, params=values, entry=entry,
                      schedule=sched, score_layers=score_layers, arp=bool(method == "posprune" and values["arp"]))


def _layer_error(layer: Any, n_layers: int) -> None:
    raise PosbiasError(
        f"layer={layer!r} is outside the model: tokens can be dropped after decoder layers 0..{n_layers - 2} "
        f"(the model has {n_layers})"
    )
