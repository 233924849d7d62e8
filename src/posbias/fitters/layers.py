"""The default decoder layers of the fits: PosPrune's shallow and deep layers, scaled to a model's depth."""

from __future__ import annotations

from posbias.errors import PosbiasError

__all__ = ["DEFAULT_SHALLOW_LAYER", "REFERENCE_DEEP_LAYER", "REFERENCE_DEPTH", "default_layers"]

#: PosPrune scores with its "2nd" (shallow) layer and prunes there, as FastV's K=2: 0-based layer 1; its deep
#: reference is the "20th" layer of a 32-layer model, 0-based 19 (docs/runtime.md, "Layers and the papers' K")
DEFAULT_SHALLOW_LAYER = 1
REFERENCE_DEEP_LAYER, REFERENCE_DEPTH = 20, 32


def default_layers(n_layers: int) -> tuple[int, int]:
    """(shallow, deep) default layers for a decoder with ``n_layers`` layers.

    shallow = 1 (PosPrune's 2nd layer, FastV's K=2); deep = the 0-based index of the layer at the relative depth
    of the 20th of 32 layers, ``round(20 / 32 * n_layers) - 1``, kept inside the model and above shallow.
    """
    if n_layers < 2:
        raise PosbiasError(f"a decoder with {n_layers} layer(s) has no shallow/deep pair; need at least 2 layers")
    shallow = min(DEFAULT_SHALLOW_LAYER, n_layers - 2)
    deep = int(round(REFERENCE_DEEP_LAYER / REFERENCE_DEPTH * n_layers)) - 1
    deep = min(max(deep, shallow + 1), n_layers - 1)
    return shallow, deep
