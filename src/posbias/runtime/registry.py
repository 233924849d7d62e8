"""The pruning-method registry: each selection method declared once (torch-free module; methods import torch).

A :class:`SelectionMethod` holds everything posbias needs to know about a method: its name, the calibration
entry it reads (or none), its parameters with their defaults and validation, the rule for its scoring layer,
its scoring and selection, and its report label and colour. :func:`posbias.runtime.spec.resolve_method`,
:class:`posbias.runtime.prune.Pruner`, :mod:`posbias.evaluate` and the reports read the registry instead of
naming methods. The built-in methods are declared in :mod:`posbias.runtime.builtin_methods` and imported on
first use.

Adding a method: declare a :class:`SelectionMethod` and either add one line to ``_BUILTIN`` (shipped methods)
or call :func:`register_method` (anywhere else, e.g. a test or a user's script); see docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from posbias._registry import NamesView, Registry
from posbias.errors import PosbiasError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from posbias.artifacts.calibration import Calibration
    from posbias.runtime.spec import MethodSpec

__all__ = [
    "SelectionMethod",
    "Resolving",
    "Selection",
    "register_method",
    "unregister_method",
    "get_method",
    "find_method",
    "known_methods",
    "default_layer",
    "METHOD_NAMES",
    "ParamsView",
    "EntryView",
    "check_number",
]


@dataclass
class Resolving:
    """What a method's ``layer``, ``check`` and ``plan`` hooks see while :func:`resolve_method` runs.

    Attributes
    ----------
    calibration : Calibration or None
    entry : dict
        The calibration entry the method reads (empty when it reads none).
    values : dict
        The method's parameters after defaults, the artifact and overrides; ``check`` may validate them and add
        derived values in place.
    overrides : dict
        The parameters the caller passed explicitly.
    keep, ratio : int or None, float or None
        The budget (``keep`` may be None for a schedule budget).
    layer : int
        The scoring layer (``plan`` may replace it).
    n_layers : int
        Decoder layers of the model.
    fixed_visual : int or None
        Visual tokens per prompt when the architecture fixes it (a square grid), else None.
    schedule : list of int or None
        An explicit per-layer schedule passed by the caller.
    """

    calibration: Calibration | None
    entry: dict[str, Any]
    values: dict[str, Any]
    overrides: dict[str, Any]
    keep: int | None
    ratio: float | None
    layer: int
    n_layers: int
    fixed_visual: int | None
    schedule: list[int] | None = None


def torch_zeros_like(ids: Any) -> Any:
    """Zeros shaped like ``ids`` (torch is imported with the first selection, not with this module)."""
    import torch

    return torch.zeros_like(ids)


class Selection:
    """What a method's ``score`` / ``select`` sees after a scoring layer: the alive visual tokens of one prompt.

    Attributes
    ----------
    layer : int
        The decoder layer that just ran.
    spec : MethodSpec
        The resolved method (``spec.params``, ``spec.entry``, ``spec.schedule``).
    n_visual : int
        Visual tokens of the prompt before any pruning.
    ids : torch.Tensor
        (V_cur,) int64 ids of the alive visual tokens among the prompt's pruning candidates (separators excluded).
    grid : (rows, cols)
        The first tile's grid (the only one of one-grid layouts).
    rows, cols, tile : torch.Tensor
        (V_cur,) int64 row and column of each alive token in its own tile, and its tile index.
    tiles : tuple of (rows, cols)
        The grid of every tile (one entry for one-grid layouts).
    run_index : torch.Tensor
        (V_cur,) int64 place of each alive token along the prompt's run of visual tokens, separators counted
        (the position the fit uses for bias curves); ``n_run`` is the length of that run.
    n_separators : int
        Separator tokens of the prompt (LLaVA-NeXT's newlines): never candidates, always kept.
    """

    def __init__(self, *, layer: int, spec: MethodSpec, n_visual: int, ids: torch.Tensor, grid: tuple[int, int],
                 attention: Callable[..., torch.Tensor], features: Callable[[], torch.Tensor] | None = None,
                 keys: Callable[[], torch.Tensor] | None = None, rows: torch.Tensor | None = None,
                 cols: torch.Tensor | None = None, tile: torch.Tensor | None = None,
                 tiles: tuple[tuple[int, int], ...] | None = None, run_index: torch.Tensor | None = None,
                 n_run: int | None = None, n_separators: int = 0) -> None:
        self.layer = layer
        self.spec = spec
        self.n_visual = n_visual
        self.ids = ids
        self.grid = grid
        # one-grid layouts: raster ids give the cell; the pruner passes every field for any layout
        self.rows = ids // grid[1] if rows is None else rows
        self.cols = ids % grid[1] if cols is None else cols
        self.tile = torch_zeros_like(ids) if tile is None else tile
        self.tiles = (tuple(grid),) if tiles is None else tuple(tuple(g) for g in tiles)
        self.run_index = ids if run_index is None else run_index
        self.n_run = n_visual if n_run is None else int(n_run)
        self.n_separators = int(n_separators)
        self._attention = attention
        self._features = features
        self._keys = keys

    @property
    def n_alive(self) -> int:
        """V_cur, the visual tokens still alive."""
        return int(self.ids.shape[0])

    @property
    def keep(self) -> int:
        """Tokens the budget keeps (``keep`` or ``ratio`` of the prompt's visual tokens, at most V_cur)."""
        return min(self.spec.keep_for(self.n_visual), self.n_alive)

    @property
    def params(self) -> dict[str, Any]:
        return self.spec.params

    @property
    def entry(self) -> dict[str, Any]:
        return self.spec.entry


    def attention(self, *, agnostic: bool = False) -> torch.Tensor:
        """(V_cur,) float32 head-mean attention of the last prompt token over the alive visual tokens at this
        layer (``agnostic``: UTP's position-agnostic variant, all visual tokens at one RoPE position)."""
        return self._attention(agnostic=agnostic)

    def features(self) -> torch.Tensor:
        """(V_cur, D) hidden states of the alive visual tokens after this layer."""
        if self._features is None:
            raise PosbiasError("this selection has no hidden states; run the method inside the pruner")
        return self._features()

    def keys(self) -> torch.Tensor:
        """(V_cur, Hkv*D) keys (before RoPE) of the alive visual tokens at this layer."""
        if self._keys is None:
            raise PosbiasError("this selection has no attention keys; run the method inside the pruner")
        return self._keys()


@dataclass(frozen=True)
class SelectionMethod:
    """One pruning method.

    Attributes
    ----------
    name : str
        What users pass as ``method=`` / ``--methods``.
    score, select : callable
        ``score(selection) -> (V_cur,) scores``; ``select(selection) -> (k,) int64 indices into the alive visual
        tokens to keep, ascending, or None to prune nothing at this layer``. Give at least one: without
        ``select`` the method keeps the top ``selection.keep`` scores (ties to the lower index).
    entry : str or None
        The calibration entry the method reads (:mod:`posbias.artifacts.entries`); None: needs no calibration.
    params : mapping
        Tunable parameters and their defaults (the papers' released constants); a calibration entry under the
        method's own name may set them, ``params=`` overrides them, other names are refused.
    check : callable, optional
        ``check(resolving)``: validate ``resolving.values`` (PosbiasError, one line) and add derived values.
    layer : callable, optional
        ``layer(calibration, entry) -> int``: the 0-based scoring layer when the caller gives none. Default:
        :func:`default_layer` (the calibration's ``defaults.layer``, else the papers' K=2).
    plan : callable, optional
        ``plan(resolving) -> (schedule, score_layers, layer)`` for methods that prune at several layers.
    budget : {"keep", "schedule"}
        ``"keep"``: ``keep`` or ``ratio`` is required; ``"schedule"``: a per-layer schedule is the budget.
    uses_entry : callable, optional
        ``uses_entry(params) -> bool``: whether these resolved parameters read the entry (quality checks).
    vision_side : callable, optional
        ``vision_side(params) -> bool``: prune before the decoder with PosPrune's ARP (``arp_*`` params).
    label, colour : str, optional
        Report legend label and hex colour; default: those of the calibration entry of the same name.
    """

    name: str
    score: Callable[[Selection], torch.Tensor] | None = None
    select: Callable[[Selection], torch.Tensor | None] | None = None
    entry: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[Resolving], None] | None = None
    layer: Callable[[Calibration | None, dict[str, Any]], int] | None = None
    plan: Callable[[Resolving], tuple[list[int], frozenset[int], int]] | None = None
    budget: str = "keep"
    uses_entry: Callable[[dict[str, Any]], bool] | None = None
    vision_side: Callable[[dict[str, Any]], bool] | None = None
    label: str | None = None
    colour: str | None = None

    def __post_init__(self) -> None:
        if self.score is None and self.select is None:
            raise PosbiasError(f"method {self.name!r} needs a score or a select function")
        if self.budget not in ("keep", "schedule"):
            raise PosbiasError(f"method {self.name!r}: budget={self.budget!r} must be 'keep' or 'schedule'")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def default_layer(self, calibration: Calibration | None, entry: dict[str, Any]) -> int:
        """The scoring layer without an explicit one (see ``layer``)."""
        rule = self.layer or default_layer
        return int(rule(calibration, entry))

    def run(self, selection: Selection) -> torch.Tensor | None:
        """Indices into the alive visual tokens to keep (``select``, else the top ``keep`` of ``score``)."""
        if self.select is not None:
            return self.select(selection)
        from posbias.runtime.methods import topk_select

        assert self.score is not None
        return topk_select(self.score(selection), selection.keep)

    def reads_entry(self, params: dict[str, Any]) -> bool:
        """Whether the method, with these resolved parameters, reads its calibration entry."""
        return self.entry is not None and (self.uses_entry is None or bool(self.uses_entry(params)))

    def report_label(self) -> str:
        from posbias.artifacts.entries import find_entry

        kind = find_entry(self.name)
        return self.label or (kind.label if kind is not None else self.name)

    def report_colour(self) -> str | None:
        from posbias.artifacts.entries import find_entry

        kind = find_entry(self.name)
        return self.colour or (kind.colour if kind is not None else None)


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


def default_layer(calibration: Calibration | None, entry: dict[str, Any]) -> int:
    """The calibration's pruning layer (``defaults.layer``), else the papers' K=2 (scoring layer 1)."""
    return int(calibration.defaults["layer"]) if calibration is not None else layer_from_k(DEFAULT_K)


def check_number(name: str, value: Any, *, low: float, high: float | None = None, low_open: bool = False,
                 hint: str = "") -> float:
    """``value`` as a float when it is a real number in [low, high] ((low, high] with ``low_open``); else a one-line
    PosbiasError naming the parameter and the range (``hint``: the released value)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        rng = (f"in [{low:g}, {high:g}]" if high is not None else f"{'>' if low_open else '>='} {low:g}")
        raise PosbiasError(f"{name}={value!r} must be a number {rng}{f' ({hint})' if hint else ''}")
    return float(value)


_METHODS: Registry[SelectionMethod] = Registry("pruning method", SelectionMethod, {
    "fastv": "posbias.runtime.builtin_methods:FASTV",
    "pore": "posbias.runtime.builtin_methods:PORE",
    "posprune-pbc": "posbias.runtime.builtin_methods:POSPRUNE_PBC",
    "posprune": "posbias.runtime.builtin_methods:POSPRUNE",
    "adaptprune": "posbias.runtime.builtin_methods:ADAPTPRUNE",
    "utp": "posbias.runtime.builtin_methods:UTP",
})

#: live view of the registered method names, built-ins first
METHOD_NAMES = NamesView(_METHODS)


def register_method(method: SelectionMethod, *, replace: bool = False) -> SelectionMethod:
    """Register a pruning method (``replace=True`` to replace an existing name); returns it.

    The method is then accepted by :func:`~posbias.runtime.enable_pruning`, :func:`~posbias.evaluate.evaluate`
    and drawn by the reports with its label and colour. A calibration entry it names must be registered too
    (:func:`posbias.artifacts.entries.register_entry`) unless it is a built-in one.
    """
    return _METHODS.register(method, replace=replace)


def unregister_method(name: str) -> None:
    """Remove a registered method (no error when absent)."""
    _METHODS.unregister(name)


def get_method(name: str) -> SelectionMethod:
    """The method registered as ``name``; PosbiasError listing the known ones otherwise."""
    return _METHODS.get(name)


def find_method(name: str) -> SelectionMethod | None:
    """The method registered as ``name``, or None."""
    return _METHODS.find(name)


def known_methods() -> tuple[str, ...]:
    """Registered method names, built-ins first."""
    return _METHODS.names()


class ParamsView(Mapping):
    """``PARAMS``: method -> a fresh dict of its parameter defaults, following later registrations."""

    def __getitem__(self, name: str) -> dict[str, Any]:
        if name not in _METHODS:
            raise KeyError(name)
        return dict(_METHODS.get(name).params)

    def __iter__(self) -> Iterator[str]:
        return iter(_METHODS.names())

    def __len__(self) -> int:
        return len(_METHODS)


class EntryView(Mapping):
    """``CALIBRATION_ENTRY``: method -> the calibration entry it reads (None: none), following registrations."""

    def __getitem__(self, name: str) -> str | None:
        if name not in _METHODS:
            raise KeyError(name)
        return _METHODS.get(name).entry

    def __iter__(self) -> Iterator[str]:
        return iter(_METHODS.names())

    def __len__(self) -> int:
        return len(_METHODS)
