"""A small JSON Schema (draft 2020-12) validator for the keywords posbias schemas use. stdlib only.

Supported assertion keywords: ``type`` (a name or a list of names), ``enum``, ``const``, ``properties``,
``required``, ``additionalProperties`` (boolean or schema), ``propertyNames``, ``minProperties``,
``items`` (one schema for all items), ``minItems``, ``maxItems``, ``minimum``, ``maximum``,
``exclusiveMinimum``, ``exclusiveMaximum``, ``minLength``, ``maxLength``, ``pattern``, ``oneOf``,
``anyOf``, ``allOf`` and ``$ref`` to a local JSON pointer (``#/$defs/name``). Annotation keywords
(``$schema``, ``$id``, ``$defs``, ``title``, ``description``, ``$comment``) are ignored. A schema that uses
any other keyword is rejected, so that an unsupported keyword can never be silently skipped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

from posbias.errors import SchemaError

__all__ = ["SUPPORTED_KEYWORDS", "ValidationIssue", "iter_errors", "first_error", "validate", "check_schema", "json_path"]

_ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "title", "description", "$comment"})

#: assertion/applicator keywords this validator implements
SUPPORTED_KEYWORDS: frozenset[str] = frozenset(
    {
        "type", "enum", "const", "properties", "required", "additionalProperties", "propertyNames",
        "minProperties", "items", "minItems", "maxItems", "minimum", "maximum", "exclusiveMinimum",
        "exclusiveMaximum", "minLength", "maxLength", "pattern", "oneOf", "anyOf", "allOf", "$ref",
    }
)

_Path = tuple[Any, ...]


class ValidationIssue(tuple):
    """``(path, message)``: the JSON path (tuple of keys and indices) of the failing value and why."""

    __slots__ = ()

    def __new__(cls, path: _Path, message: str) -> "ValidationIssue":
        return super().__new__(cls, (path, message))

    @property
    def path(self) -> _Path:
        return self[0]

    @property
    def message(self) -> str:
        return self[1]


def json_path(path: _Path) -> str:
    """``("methods", "pore", "fit")`` -> ``"$.methods.pore.fit"``; indices as ``[0]``."""
    out = "$"
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}"
        else:
            out += f"[{part!r}]"
    return out


def _is_type(value: Any, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "integer":
        if isinstance(value, bool):
            return False
        if isinstance(value, int):
            return True
        return isinstance(value, float) and math.isfinite(value) and value.is_integer()
    raise SchemaError(f"schema uses unknown type {name!r}; fix the schema file")


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but True != 1; lists and objects compared deeply."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _resolve(ref: str, root: dict[str, Any]) -> Any:
    if not ref.startswith("#"):
        raise SchemaError(f"schema $ref {ref!r} is not a local reference; only '#/...' pointers are supported")
    node: Any = root
    for raw in ref[1:].split("/")[1:] if ref != "#" else []:
        key = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            raise SchemaError(f"schema $ref {ref!r} points nowhere; fix the schema file")
    return node


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def iter_errors(instance: Any, schema: Any, *, root: Any = None, path: _Path = ()) -> Iterator[ValidationIssue]:
    """Yield every validation issue of ``instance`` against ``schema`` (depth-first, schema key order).

    Parameters
    ----------
    instance : Any
        Parsed JSON value.
    schema : dict or bool
        The (sub)schema.
    root : dict, optional
        The root schema that ``$ref`` pointers resolve against (defaults to ``schema``).
    path : tuple
        JSON path of ``instance`` inside the document.
    """
    if root is None:
        root = schema
    if schema is True:
        return
    if schema is False:
        yield ValidationIssue(path, "no value is allowed here")
        return
    if not isinstance(schema, dict):
        raise SchemaError(f"schema node at {json_path(path)} is not an object or boolean; fix the schema file")
    unknown = set(schema) - SUPPORTED_KEYWORDS - _ANNOTATIONS
    if unknown:
        raise SchemaError(f"schema uses unsupported keywords {sorted(unknown)}; extend posbias.artifacts.validate")

    for key, sub in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key == "$ref":
            yield from iter_errors(instance, _resolve(sub, root), root=root, path=path)
        elif key == "type":
            names = [sub] if isinstance(sub, str) else list(sub)
            if not any(_is_type(instance, n) for n in names):
                yield ValidationIssue(path, f"{_short(instance)} is not of type {' or '.join(names)}")
        elif key == "enum":
            if not any(_equal(instance, v) for v in sub):
                yield ValidationIssue(path, f"{_short(instance)} is not one of {sub}")
        elif key == "const":
            if not _equal(instance, sub):
                yield ValidationIssue(path, f"{_short(instance)} is not {sub!r}")
        elif key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if _is_type(instance, "number"):
                bad = {
                    "minimum": instance < sub,
                    "maximum": instance > sub,
                    "exclusiveMinimum": instance <= sub,
                    "exclusiveMaximum": instance >= sub,
                }[key]
                if bad:
                    yield ValidationIssue(path, f"{_short(instance)} violates {key} {sub}")
        elif key in ("minLength", "maxLength", "pattern"):
            if isinstance(instance, str):
                if key == "minLength" and len(instance) < sub:
                    yield ValidationIssue(path, f"{_short(instance)} is shorter than {sub} characters")
                elif key == "maxLength" and len(instance) > sub:
                    yield ValidationIssue(path, f"{_short(instance)} is longer than {sub} characters")
                elif key == "pattern" and re.search(sub, instance) is None:
                    yield ValidationIssue(path, f"{_short(instance)} does not match {sub!r}")
        elif key in ("items", "minItems", "maxItems"):
            if isinstance(instance, list):
                if key == "items":
                    for i, item in enumerate(instance):
                        yield from iter_errors(item, sub, root=root, path=path + (i,))
                elif key == "minItems" and len(instance) < sub:
                    yield ValidationIssue(path, f"array has {len(instance)} items, fewer than {sub}")
                elif key == "maxItems" and len(instance) > sub:
                    yield ValidationIssue(path, f"array has {len(instance)} items, more than {sub}")
        elif key in ("properties", "required", "additionalProperties", "propertyNames", "minProperties"):
            if isinstance(instance, dict):
                if key == "required":
                    for name in sub:
                        if name not in instance:
                            yield ValidationIssue(path, f"required property {name!r} is missing")
                elif key == "properties":
                    for name, subschema in sub.items():
                        if name in instance:
                            yield from iter_errors(instance[name], subschema, root=root, path=path + (name,))
                elif key == "additionalProperties":
                    known = schema.get("properties", {})
                    extra = [k for k in instance if k not in known]
                    if sub is False:
                        for k in extra:
                            yield ValidationIssue(path + (k,), f"additional property {k!r} is not allowed")
                    else:
                        for k in extra:
                            yield from iter_errors(instance[k], sub, root=root, path=path + (k,))
                elif key == "propertyNames":
                    for k in instance:
                        for issue in iter_errors(k, sub, root=root, path=path):
                            yield ValidationIssue(path, f"property name {k!r}: {issue.message}")
                elif key == "minProperties" and len(instance) < sub:
                    yield ValidationIssue(path, f"object has {len(instance)} properties, fewer than {sub}")
        elif key == "allOf":
            for subschema in sub:
                yield from iter_errors(instance, subschema, root=root, path=path)
        elif key in ("anyOf", "oneOf"):
            n_ok = sum(1 for subschema in sub if first_error(instance, subschema, root=root, path=path) is None)
            if key == "anyOf" and n_ok == 0:
                yield ValidationIssue(path, f"{_short(instance)} matches none of the anyOf alternatives")
            elif key == "oneOf" and n_ok != 1:
                yield ValidationIssue(path, f"{_short(instance)} matches {n_ok} oneOf alternatives, expected exactly 1")


def first_error(instance: Any, schema: Any, *, root: Any = None, path: _Path = ()) -> ValidationIssue | None:
    """The first issue :func:`iter_errors` finds, or ``None`` when ``instance`` is valid."""
    return next(iter_errors(instance, schema, root=root, path=path), None)


def validate(instance: Any, schema: Any, *, what: str = "document") -> None:
    """Raise :class:`SchemaError` naming the JSON path of the first issue.

    Parameters
    ----------
    instance : Any
        Parsed JSON value.
    schema : dict
        Root schema.
    what : str
        How to name the document in the message (usually its file path).
    """
    issue = first_error(instance, schema)
    if issue is not None:
        raise SchemaError(
            f"{what} fails schema validation at {json_path(issue.path)}: {issue.message}; fix that value or regenerate the file"
        )


def check_schema(schema: Any) -> None:
    """Walk a schema and raise :class:`SchemaError` if it uses keywords this validator does not implement."""

    def walk(node: Any) -> None:
        if isinstance(node, bool):
            return
        if not isinstance(node, dict):
            raise SchemaError("schema node is not an object or boolean; fix the schema file")
        unknown = set(node) - SUPPORTED_KEYWORDS - _ANNOTATIONS
        if unknown:
            raise SchemaError(f"schema uses unsupported keywords {sorted(unknown)}; extend posbias.artifacts.validate")
        if "$ref" in node:
            _resolve(node["$ref"], schema)
        for key in ("properties", "$defs"):
            for sub in node.get(key, {}).values():
                walk(sub)
        for key in ("items", "additionalProperties", "propertyNames"):
            if key in node and not isinstance(node[key], bool):
                walk(node[key])
        for key in ("oneOf", "anyOf", "allOf"):
            for sub in node.get(key, []):
                walk(sub)

    walk(schema)
