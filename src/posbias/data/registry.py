"""Sample-source registry and the deterministic sample plan.

A source is named on the command line as ``NAME`` or ``NAME:PATH`` (``--data embedded``,
``--data mme:/data/MME``). The registry maps each name to a factory that takes the path part (or
``None``) and returns a :class:`~posbias.data.base.SampleSource`; factories are named as
``"module:attribute"`` strings and imported only when used, so an optional dataset reader costs nothing
until someone asks for it.

Which samples a run uses is decided by :func:`plan_samples` before any image is loaded: the same sources,
``n``, ``seed`` (and quotas) always give the same list of sample ids. :func:`iter_samples` then loads them
in that order and yields a :class:`~posbias.data.base.Sample`, or the
:class:`~posbias.data.base.BadSample` a record raised, for each.
"""

from __future__ import annotations

import importlib
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Union

import numpy as np

from posbias.data.base import BadSample, Sample, SampleSource, select_indices
from posbias.errors import PosbiasError

__all__ = [
    "SourceFactory",
    "register_source",
    "known_sources",
    "parse_spec",
    "parse_data_option",
    "split_quotas",
    "get_source",
    "resolve_sources",
    "resolve_with_quotas",
    "UnionSource",
    "plan_samples",
    "SampleStream",
    "iter_samples",
]

#: a factory takes the path part of ``NAME:PATH`` (``None`` for a bare ``NAME``)
SourceFactory = Callable[[Union[str, None]], SampleSource]

_REGISTRY: dict[str, str | SourceFactory] = {
    "embedded": "posbias.data.embedded:EmbeddedSource.from_spec",
    "mme": "posbias.data.mme:MMESource.from_spec",
    "pope": "posbias.data.pope:POPESource.from_spec",
    "coco": "posbias.data.coco:COCOSource.from_spec",
}


def register_source(name: str, factory: str | SourceFactory, *, replace: bool = False) -> None:
    """Register a source name.

    Parameters
    ----------
    name : str
        The ``NAME`` of ``--data NAME[:PATH]`` (no ':').
    factory : str or callable
        ``"package.module:attr[.attr]"`` (imported on first use) or a callable ``factory(path_or_None)``.
    replace : bool
        Allow replacing an existing registration.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise PosbiasError(f"source name {name!r} must be a non-empty string without ':'")
    if name in _REGISTRY and not replace:
        raise PosbiasError(f"source {name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[name] = factory


def known_sources() -> list[str]:
    """Registered source names, sorted."""
    return sorted(_REGISTRY)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"mme:/data/MME"`` -> ``("mme", "/data/MME")``; ``"embedded"`` -> ``("embedded", None)``."""
    if not isinstance(spec, str) or not spec.strip():
        raise PosbiasError(f"data source {spec!r}: give a source as NAME or NAME:PATH; known: {', '.join(known_sources())}")
    name, sep, arg = spec.strip().partition(":")
    if sep and not arg:
        raise PosbiasError(f"data source {spec}: the path after ':' is empty; use {name} or {name}:PATH")
    return name, (arg if sep else None)


_QUOTA_RE = re.compile(r"^(?P<spec>.+?)@(?P<quota>[^@/]*)$")


def parse_data_option(option: str) -> tuple[str, int | None]:
    """``"mme:/data/MME@200"`` -> ``("mme:/data/MME", 200)``; without ``@N`` the quota is ``None``.

    The quota is the number of samples to draw from that source (``@all`` for every record).
    """
    if not isinstance(option, str) or not option.strip():
        raise PosbiasError(f"data source {option!r}: give a source as NAME[:PATH][@N]; known: {', '.join(known_sources())}")
    m = _QUOTA_RE.match(option.strip())
    if not m:
        return option.strip(), None
    spec, quota = m.group("spec"), m.group("quota").strip()
    if quota == "all":
        return spec, None
    if not quota.isdigit():
        raise PosbiasError(f"data source {option}: the quota after '@' must be a whole number or 'all', e.g. {spec}@200")
    return spec, int(quota)


def split_quotas(options: Sequence[str]) -> tuple[list[str], list[int | None] | None]:
    """Specs and per-source quotas of several ``--data`` options (quotas ``None`` when no option has one)."""
    pairs = [parse_data_option(o) for o in options]
    specs = [p[0] for p in pairs]
    quotas = [p[1] for p in pairs]
    has_quota = any(_QUOTA_RE.match(o.strip()) for o in options)
    return specs, (quotas if has_quota else None)


def _resolve_factory(name: str, factory: str | SourceFactory) -> SourceFactory:
    if callable(factory):
        return factory
    module_name, _, attr_path = factory.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
        for attr in attr_path.split("."):
            obj = getattr(obj, attr)
    except (ImportError, AttributeError) as exc:
        raise PosbiasError(
            f"source {name!r} cannot be loaded ({factory}: {exc}); install its optional dependencies"
        ) from exc
    if not callable(obj):
        raise PosbiasError(f"source {name!r}: factory {factory} is not callable")
    return obj  # type: ignore[return-value]


def get_source(spec: str) -> SampleSource:
    """The source named by ``spec`` (``"embedded"``, later ``"mme:PATH"`` ...).

    Raises
    ------
    posbias.errors.PosbiasError
        For an unknown name (the message lists the known ones) or a path the source rejects.
    """
    name, arg = parse_spec(spec)
    if name not in _REGISTRY:
        raise PosbiasError(f"data source {spec}: unknown sample source {name!r}; known sources: {', '.join(known_sources())}")
    source = _resolve_factory(name, _REGISTRY[name])(arg)
    if not isinstance(source, SampleSource):
        raise PosbiasError(f"source {name!r}: its factory returned {type(source).__name__}, not a SampleSource")
    return source


class UnionSource(SampleSource):
    """One benchmark from several copies or layouts (``--data pope:A.parquet --data pope:questions/``): the
    records of each in turn, a key already read from an earlier copy read once (one line says so)."""

    def __init__(self, name: str, sources: Sequence[SampleSource], specs: Sequence[str]) -> None:
        from posbias.data.files import note

        self.name = name
        self.sources = list(sources)
        self._index: list[tuple[int, int]] = []  # (source, record index)
        seen: set[str] = set()
        repeated = 0
        for k, src in enumerate(self.sources):
            for i in range(len(src)):
                key = src.key(i)
                if key in seen:
                    repeated += 1
                    continue
                seen.add(key)
                self._index.append((k, i))
        if repeated:
            note(f"data sources {' + '.join(specs)}: {repeated} record(s) have the ids of records of an earlier copy; "
                 "each id is read once")

    def __len__(self) -> int:
        return len(self._index)

    def key(self, index: int) -> str:
        k, i = self._index[index]
        return self.sources[k].key(i)

    def load(self, index: int) -> Sample:
        k, i = self._index[index]
        return self.sources[k].load(i)


def resolve_with_quotas(
    specs: Sequence[str], quotas: Sequence[int | None] | None
) -> tuple[list[SampleSource], list[int | None] | None]:
    """:func:`resolve_sources` for ``--data`` specs and their quotas: several specs of one source name
    become one :class:`UnionSource` whose quota is the sum of theirs (``None`` if any is ``None``)."""
    dup = sorted({s for s in specs if list(specs).count(s) > 1})
    if dup:
        raise PosbiasError(f"data sources name source(s) {dup} more than once; give each source once")
    order: list[str] = []
    groups: dict[str, list[int]] = {}
    for k, spec in enumerate(specs):
        name = parse_spec(spec)[0]
        if name not in groups:
            order.append(name)
        groups.setdefault(name, []).append(k)
    sources = resolve_sources([specs[ks[0]] if len(ks) == 1 else [specs[k] for k in ks] for ks in (groups[n] for n in order)])
    if quotas is None:
        return sources, None
    merged: list[int | None] = []
    for n in order:
        qs = [quotas[k] for k in groups[n]]
        merged.append(None if any(q is None for q in qs) else int(sum(q for q in qs if q is not None)))
    return sources, merged


def resolve_sources(specs: Iterable[str | SampleSource | Sequence[str]]) -> list[SampleSource]:
    """Sources for a list of specs (or ready sources); names must be distinct (they prefix sample ids).

    Several specs of one source name with different paths (a parquet copy and a jsonl copy of POPE) are
    combined into one :class:`UnionSource`; the same spec twice is refused.
    """
    items = list(specs)
    strings = [s for s in items if isinstance(s, str)]
    if len(set(strings)) == len(strings) and not any(isinstance(s, (list, tuple)) for s in items):
        by_name: dict[str, list[str]] = {}
        for s in strings:
            by_name.setdefault(parse_spec(s)[0], []).append(s)
        if any(len(v) > 1 for v in by_name.values()):
            combined: list[str | SampleSource | Sequence[str]] = []
            done: set[str] = set()
            for s in items:
                name = parse_spec(s)[0] if isinstance(s, str) else None
                if name is None or len(by_name[name]) == 1:
                    combined.append(s)
                elif name not in done:
                    done.add(name)
                    combined.append(by_name[name])
            items = combined
    sources: list[SampleSource] = []
    for s in items:
        if isinstance(s, SampleSource):
            sources.append(s)
        elif isinstance(s, str):
            sources.append(get_source(s))
        else:
            group = list(s)
            sources.append(UnionSource(parse_spec(group[0])[0], [get_source(g) for g in group], group)
                           if len(group) > 1 else get_source(group[0]))
    if not sources:
        raise PosbiasError("no sample source given; pass a data source NAME[:PATH] (e.g. embedded)")
    names = [s.name for s in sources]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PosbiasError(f"data sources name source(s) {dup} more than once; give each source once")
    return sources


def _source_seed(seed: int, name: str) -> int:
    """Per-source seed derived from the run seed and the source name (not its position)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode("utf-8"))]).generate_state(1)
    return int(state[0])


def plan_samples(
    sources: Sequence[SampleSource] | SampleSource,
    n: int | None,
    seed: int,
    *,
    quotas: Sequence[int | None] | None = None,
) -> list[tuple[SampleSource, int]]:
    """The (source, record index) pairs a run uses, in order, without loading anything.

    Without quotas the records of all sources are concatenated (in the given order) and
    :func:`~posbias.data.base.select_indices` picks ``n`` of them: a larger ``n`` extends a smaller one.
    With quotas, source k contributes ``select_indices(len_k, quotas[k], seed_k)`` (``None`` = all of
    it; ``seed_k`` derived from ``seed`` and the source name), the picks are shuffled together with
    ``seed``, and ``n`` (if given) caps the total.

    Parameters
    ----------
    sources : SampleSource or sequence of them
        Distinct source names.
    n : int or None
        Total number of samples; ``None`` or more than available means all.
    seed : int
        Seed of the subsample and its order.
    quotas : sequence of (int or None), optional
        Per-source counts, aligned with ``sources``.
    """
    srcs = [sources] if isinstance(sources, SampleSource) else list(sources)
    srcs = resolve_sources(srcs)
    if n is not None and (isinstance(n, bool) or int(n) < 0):
        raise PosbiasError(f"n={n}: the number of samples must be >= 0")
    sizes = np.array([len(s) for s in srcs], dtype=np.int64)  # (K,)
    if quotas is None:
        starts = np.concatenate([[0], np.cumsum(sizes)])  # (K+1,)
        chosen = select_indices(int(starts[-1]), n, seed)  # (N,) global indices
        which = np.searchsorted(starts, chosen, side="right") - 1  # (N,) source of each pick
        return [(srcs[int(k)], int(g - starts[k])) for g, k in zip(chosen, which, strict=True)]
    if len(quotas) != len(srcs):
        raise PosbiasError(f"{len(quotas)} quotas for {len(srcs)} sources; give one quota per data source")
    picks: list[tuple[SampleSource, int]] = []
    for src, size, quota in zip(srcs, sizes, quotas, strict=True):
        if quota is not None and (isinstance(quota, bool) or int(quota) < 0):
            raise PosbiasError(f"quota {quota} for source {src.name!r} must be >= 0")
        picks += [(src, int(i)) for i in select_indices(int(size), quota, _source_seed(seed, src.name))]
    order = np.random.default_rng(seed).permutation(len(picks))  # (N,)
    merged = [picks[int(i)] for i in order]
    return merged if n is None else merged[: int(n)]


class SampleStream:
    """The planned samples of a run: iterate for Sample/BadSample, ``len()`` for the count, ``ids``.

    Re-iterable: each iteration loads the records again in the same order (sources cache their images).
    """

    def __init__(self, plan: list[tuple[SampleSource, int]]) -> None:
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def ids(self) -> list[str]:
        """Sample ids in order (no image is loaded)."""
        return [src.sample_id(i) for src, i in self.plan]

    def __iter__(self) -> Iterator[Sample | BadSample]:
        for src, i in self.plan:
            try:
                yield src.load(i)
            except BadSample as bad:  # handed to the caller, who records the skip with its reason
                yield bad


def iter_samples(
    sources: Sequence[SampleSource | str] | SampleSource | str,
    n: int | None = None,
    seed: int = 0,
    *,
    quotas: Sequence[int | None] | None = None,
) -> SampleStream:
    """Deterministic stream of samples from ``sources`` (see :func:`plan_samples`).

    Iterating yields, in plan order, each loaded :class:`~posbias.data.base.Sample` or the
    :class:`~posbias.data.base.BadSample` its source raised. ``len(stream)`` is the planned count.

    Examples
    --------
    >>> stream = iter_samples(["embedded"], n=8, seed=0)  # doctest: +SKIP
    >>> for item in stream:  # doctest: +SKIP
    ...     if isinstance(item, BadSample): ...
    """
    if isinstance(sources, (str, SampleSource)):
        sources = [sources]
    srcs = resolve_sources(sources)
    return SampleStream(plan_samples(srcs, n, seed, quotas=quotas))
