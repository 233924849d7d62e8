"""Resolve a pruning method's parameters: artifact first, explicit overrides second, errors before compute."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posbias.artifacts.calibration import Calibration
from posbias.artifacts.fingerprint import model_fingerprint
from posbias.errors import PosbiasError
from posbias.runtime.registry import DEFAULT_K, layer_from_k  # noqa: F401 (public here too)
from posbias.runtime.registry import METHOD_NAMES, EntryView, ParamsView, Resolving, get_method

__all__ = ["PRUNE_METHODS", "PARAMS", "CALIBRATION_ENTRY", "DEFAULT_K", "MethodSpec", "resolve_method", "n_decoder_layers",
           "layer_from_k"]


#: selection methods of the pruner (a live view of :mod:`posbias.runtime.registry`)
PRUNE_METHODS = METHOD_NAMES

#: method -> tunable parameters and their defaults (the papers' released constants), from the registry
PARAMS = ParamsView()

#: method -> calibration entry that holds its fitted parameters (None: needs none), from the registry
CALIBRATION_ENTRY = EntryView()


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
        if get_method(self.method).budget == "schedule":
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

    spec_of = get_method(method)
    # parameters: defaults <- artifact entry under the method's own name <- explicit overrides
    values = dict(spec_of.params)
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

    entry_name = spec_of.entry
    entry: dict[str, Any] = {}
    if entry_name is not None:
        if calibration is None:
            raise PosbiasError(f"method {method!r} needs a calibration with {entry_name!r}; pass calibration=Calibration.load(...)")
        entry = calibration.method(entry_name)  # one-line error listing what is available

    # budget
    by_keep = spec_of.budget == "keep"
    if (keep is None) == (ratio is None):
        if keep is None and ratio is None and calibration is not None and by_keep:
            keep = int(calibration.defaults["keep"])
        elif keep is not None:
            raise PosbiasError("pass either keep=K or ratio=r, not both")
        elif by_keep:
            raise PosbiasError("pass keep=K (visual tokens kept) or ratio=r (fraction kept)")
    fixed = _fixed_visual_count(model)
    if keep is not None:
        _check_int("keep", keep, 1)
        if fixed is not None and keep > fixed:
            raise PosbiasError(f"keep={keep} exceeds the {fixed} visual tokens of this model; pass keep <= {fixed}")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
            raise PosbiasError(f"ratio={ratio!r} must be a number in (0, 1] (fraction of visual tokens kept)")
        ratio = float(ratio)

    # layer: the method's rule unless given
    if layer is None:
        layer = spec_of.default_layer(calibration, entry)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n_layers - 2:
        _layer_error(layer, n_layers)

    # the method's own validation (may add derived values), then its multi-layer plan
    state = Resolving(calibration=calibration, entry=entry, values=values, overrides=dict(params or {}), keep=keep,
                      ratio=ratio, layer=int(layer), n_layers=n_layers, fixed_visual=fixed, schedule=schedule)
    if spec_of.check is not None:
        spec_of.check(state)
    sched: list[int] = []
    score_layers: frozenset[int] = frozenset({int(layer)})
    if spec_of.plan is not None:
        sched, score_layers, layer = spec_of.plan(state)
    arp = bool(spec_of.vision_side(values)) if spec_of.vision_side is not None else False
    return MethodSpec(method=method, layer=int(layer), keep=keep, ratio=ratio, params=values, entry=entry,
                      schedule=sched, score_layers=score_layers, arp=arp)


def _layer_error(layer: Any, n_layers: int) -> None:
    raise PosbiasError(
        f"layer={layer!r} is outside the model: tokens can be dropped after decoder layers 0..{n_layers - 2} "
        f"(the model has {n_layers})"
    )
