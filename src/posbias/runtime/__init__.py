"""posbias.runtime: score, select and prune visual tokens from a calibration.

Imports only torch, stdlib and posbias.artifacts/errors (never numpy-based fitters, scipy, h5py, and
transformers only through the model object it is handed and :mod:`posbias._hf_compat`).
"""

from __future__ import annotations

from posbias.artifacts.calibration import CALIBRATION_FILENAME, Calibration
from posbias.runtime.methods import (
    arp_select,
    gaussian_centre_weight,
    mmr_select,
    release_workspace,
    soft_nms_select,
    topk_select,
)
from posbias.runtime.prune import Pruner, PruneRecord, enable_pruning
from posbias.runtime.quality import CalibrationQualityWarning
from posbias.runtime.scoring import (
    METHODS,
    method_layer,
    predict_bias,
    predict_exponential,
    predict_polynomial,
    score_tokens,
    token_positions,
)
from posbias.runtime.select import select_tokens
from posbias.runtime.spec import PARAMS, PRUNE_METHODS, MethodSpec, resolve_method

__all__ = [
    "CALIBRATION_FILENAME",
    "Calibration",
    "CalibrationQualityWarning",
    "METHODS",
    "MethodSpec",
    "PARAMS",
    "PRUNE_METHODS",
    "PruneRecord",
    "Pruner",
    "arp_select",
    "enable_pruning",
    "gaussian_centre_weight",
    "method_layer",
    "mmr_select",
    "predict_bias",
    "predict_exponential",
    "predict_polynomial",
    "release_workspace",
    "resolve_method",
    "score_tokens",
    "select_tokens",
    "soft_nms_select",
    "token_positions",
    "topk_select",
]
