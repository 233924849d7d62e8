"""posbias.data: where profiling and evaluation samples come from.

``get_source("embedded")`` returns the photos shipped in installed packages with hand-written
questions; ``get_source("mme:PATH")``, ``"pope:PATH[:IMAGES]"`` and ``"coco:IMAGES[:ANNOTATIONS]"`` read local
copies of the benchmarks (posbias.data.mme / pope / coco); ``iter_samples(sources, n, seed)`` streams a deterministic subsample of one or more sources.
"""

from posbias.data.base import BadSample, Sample, SampleSource, select_indices
from posbias.data.embedded import EmbeddedSource
from posbias.data.registry import (
    SampleStream,
    parse_data_option,
    split_quotas,
    get_source,
    iter_samples,
    known_sources,
    plan_samples,
    register_source,
    resolve_sources,
)

__all__ = [
    "BadSample",
    "Sample",
    "SampleSource",
    "select_indices",
    "EmbeddedSource",
    "SampleStream",
    "parse_data_option",
    "split_quotas",
    "get_source",
    "iter_samples",
    "known_sources",
    "plan_samples",
    "register_source",
    "resolve_sources",
]
