"""posbias.runtime: score and select visual tokens from a calibration. Imports only torch, stdlib and
posbias.artifacts/errors (never numpy-based fitters, scipy, h5py, ...)."""

from __future__ import annotations

from posbias.artifacts.calibration import CALIBRATION_FILENAME, Calibration
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

__all__ = [
    "CALIBRATION_FILENAME",
    "Calibration",
    "METHODS",
    "method_layer",
    "predict_bias",
    "predict_exponential",
    "predict_polynomial",
    "score_tokens",
    "select_tokens",
    "token_positions",
]
