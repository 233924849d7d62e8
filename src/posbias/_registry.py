"""A name -> declaration table whose built-in entries are imported on first use. stdlib only.

The method registry (:mod:`posbias.runtime.registry`) and the calibration-entry registry
(:mod:`posbias.artifacts.entries`) are instances of :class:`Registry`. Built-in declarations are named as
``"package.module:ATTRIBUTE"`` strings and imported only when a caller asks for them (so the table itself costs
no import); code outside posbias registers declaration objects directly with :meth:`Registry.register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

from posbias.errors import PosbiasError

__all__ = ["Registry", "NamesView"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Registered declarations of one kind, in registration order.

    Parameters
    ----------
    kind : str
        What is registered, for messages (``"pruning method"``).
    cls : type
        The declaration class; every entry must be an instance of it and carry a ``name`` attribute.
    builtins : dict
        ``name -> "package.module:ATTRIBUTE"`` of the declarations shipped with posbias.
    """

    def __init__(self, kind: str, cls: type, builtins: dict[str, str]) -> None:
        self.kind = kind
        self.cls = cls
        self._table: dict[str, str | T] = dict(builtins)

    def register(self, item: T, *, replace: bool = False) -> T:
        """Add ``item`` under ``item.name``; an existing name needs ``replace=True``. Returns ``item``."""
        if not isinstance(item, self.cls):
            raise PosbiasError(f"register a {self.cls.__name__}, not {type(item).__name__}")
        name = getattr(item, "name", None)
        if not isinstance(name, str) or not name or name != name.strip() or "," in name:
            raise PosbiasError(f"{self.kind} name {name!r} must be a non-empty string without commas or outer spaces")
        if name in self._table and not replace:
            raise PosbiasError(f"{self.kind} {name!r} is already registered; pass replace=True to replace it")
        self._table[name] = item
        return item

    def unregister(self, name: str) -> None:
        """Remove ``name`` (no error when absent)."""
        self._table.pop(name, None)

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order (built-ins first)."""
        return tuple(self._table)

    def get(self, name: str) -> T:
        """The declaration registered as ``name``; PosbiasError naming the known ones otherwise."""
        ref = self._table.get(name) if isinstance(name, str) else None
        if ref is None:
            raise PosbiasError(f"unknown {self.kind} {name!r}; use one of {', '.join(self._table)}")
        if isinstance(ref, str):
            module_name, _, attr = ref.partition(":")
            try:
                item = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as exc:
                raise PosbiasError(f"{self.kind} {name!r} cannot be loaded ({ref}: {exc}); reinstall posbias") from exc
            if not isinstance(item, self.cls) or getattr(item, "name", None) != name:
                raise PosbiasError(f"{self.kind} {name!r}: {ref} is not a {self.cls.__name__} named {name!r}")
            self._table[name] = item
            return item
        return ref

    def find(self, name: str) -> T | None:
        """:meth:`get`, or None for a name that is not registered."""
        return self.get(name) if name in self else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._table

    def __iter__(self) -> Iterator[T]:
        for name in self.names():
            yield self.get(name)

    def __len__(self) -> int:
        return len(self._table)


class NamesView(Sequence):
    """A read-only tuple-like view of a registry's names that follows later registrations (``PRUNE_METHODS``)."""

    def __init__(self, registry: Registry[Any]) -> None:
        self._registry = registry

    def __getitem__(self, index: Any) -> Any:
        return self._registry.names()[index]

    def __len__(self) -> int:
        return len(self._registry)

    def __contains__(self, name: object) -> bool:
        return name in self._registry

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (tuple, list, NamesView)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._registry.names())

    def __add__(self, other: Any) -> tuple[str, ...]:
        return self._registry.names() + tuple(other)

    def __repr__(self) -> str:
        return repr(self._registry.names())
