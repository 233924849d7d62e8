"""posbias.artifacts: the calibration file format, its validator and the model fingerprint. stdlib only."""

from __future__ import annotations

from posbias.artifacts.calibration import (
    CALIBRATION_FILENAME,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    Calibration,
    dumps,
    export_to,
    fastv_entry,
    load_schema,
    pbc_entry,
    pore_entry,
)
from posbias.artifacts.fingerprint import model_fingerprint

__all__ = [
    "CALIBRATION_FILENAME",
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "Calibration",
    "dumps",
    "export_to",
    "fastv_entry",
    "load_schema",
    "model_fingerprint",
    "pbc_entry",
    "pore_entry",
]
