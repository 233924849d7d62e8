"""posbias.evaluate: fidelity of pruned models against the full model (may import models, data, profiler)."""

from __future__ import annotations

from posbias.evaluate.fidelity import (
    SCHEMA_NAME,
    SCHEMA_VERSION,
    EvaluationConfig,
    calibration_sample_ids,
    evaluate,
    format_table,
    kl_divergence,
    layer_flops,
    peak_memory,
    pin_mmap_threshold,
    prefill_flops,
    write_evaluation,
)
from posbias.evaluate.paired import paired_comparisons, paired_stats

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "EvaluationConfig",
    "calibration_sample_ids",
    "evaluate",
    "format_table",
    "kl_divergence",
    "layer_flops",
    "peak_memory",
    "pin_mmap_threshold",
    "prefill_flops",
    "write_evaluation",
    "paired_comparisons",
    "paired_stats",
]
