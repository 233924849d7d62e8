"""Vision importance for ARP, recomputed in torch from the vision tower's own projections.

The architecture (:class:`~posbias.models.base.Architecture`) names the vision attention modules whose maps
define the importance, recomputes their queries and keys from each module's input
(:meth:`~posbias.models.base.Architecture.vision_query_key`) and maps the records to the LLM's visual-token
order (:meth:`~posbias.models.base.Architecture.vision_importance_tokens`); the records are the shared
kernels the profiler stores in ``/tokens/vision_importance``:

- ``"cls"`` (LLaVA / CLIP): the [CLS] query's attention over the patches at the vision feature layer(s),
  head mean (PosPrune Eq. 2; :func:`posbias.kernels.cls_attention_row`).
- ``"colmean"`` (Qwen2-VL, Qwen2.5-VL, no [CLS]): the mean attention each patch receives from all patches
  of its image (VisionZip's rule PosPrune follows; :func:`posbias.kernels.attention_column_mean`), averaged
  over the merge unit and put in raster order (Qwen2.5-VL: through the tower's own window index).

Only torch is imported; the hooks are plain ``nn.Module`` hooks, removed by :meth:`VisionImportance.detach`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from posbias.errors import PosbiasError
from posbias.kernels import vision_record

if TYPE_CHECKING:
    from posbias.models.base import Architecture

__all__ = ["VisionImportance"]


class VisionImportance:
    """Hooks that record a (V,) vision importance per forward, in the LLM's visual-token order.

    Parameters
    ----------
    arch : Architecture
        The model's architecture (:func:`posbias.models.registry.architecture_of`).
    """

    def __init__(self, arch: "Architecture") -> None:
        self.arch = arch
        self.kind = str(arch.vision_importance_kind)
        self._importance: torch.Tensor | None = None  # (V,) float32 after a forward
        self._pending: tuple[list[torch.Tensor], dict[str, Any]] | None = None
        self._handles: list[Any] = []
        self._slot_of: dict[int, int] = {}
        self._records: dict[int, torch.Tensor] = {}
        self._context: dict[str, Any] = {}

    @property
    def importance(self) -> torch.Tensor | None:
        """(V,) float32 of the latest vision forward, mapped to the LLM's token order on first read (an
        architecture may need the prompt's layout, which the pruner knows by then: LLaVA-NeXT)."""
        if self._importance is None and self._pending is not None:
            records, context = self._pending
            self._pending = None
            with torch.no_grad():
                self._importance = self.arch.vision_importance_tokens(records, context).float()  # (V,)
        return self._importance

    @importance.setter
    def importance(self, value: torch.Tensor | None) -> None:
        self._importance = value
        self._pending = None

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> None:
        tower = self.arch.vision_tower()
        modules = self.arch.vision_importance_modules()
        if self.kind not in ("cls", "colmean"):
            raise PosbiasError(f"architecture {self.arch.model_type!r} has no vision importance; pass params={{'arp': False}}")
        self._slot_of = {id(m): i for i, m in enumerate(modules)}
        try:
            self._handles.append(tower.register_forward_pre_hook(self._tower_pre, with_kwargs=True))
            for m in modules:
                self._handles.append(m.register_forward_pre_hook(self._module_pre, with_kwargs=True))
            self._handles.append(tower.register_forward_hook(self._tower_post))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._records = {}
        self.importance = None

    # ------------------------------------------------------------------ hooks
    def _tower_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        self._records = {}
        self._context = self.arch.vision_context(args, kwargs)

    def _module_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        slot = self._slot_of.get(id(module))
        if slot is None:
            return
        with torch.no_grad():
            q, k, scale, bounds = self.arch.vision_query_key(module, args, kwargs)  # (H, N, D) x2
            self._records[slot] = vision_record(self.kind, q, k, scale, bounds)  # (N,)

    def _tower_post(self, module: Any, args: tuple, output: Any) -> None:
        if len(self._records) != len(self._slot_of):
            return  # not a full vision forward (nothing to map)
        records = [self._records[i] for i in range(len(self._slot_of))]
        self.importance = None
        self._pending = (records, self._context)  # mapped when read (:attr:`importance`)
        self._records = {}
        self._context = {}
