"""User-facing errors.

Every error a user can fix by changing what they passed (a model name, a path, an option, a file of the
wrong schema) is a :class:`PosbiasError` whose message is one line naming the input and the fix. The CLI
prints it as ``profile-bias: error: <message>`` and exits with status 2.
"""

from __future__ import annotations

__all__ = ["PosbiasError", "ModelUnavailableError", "SchemaError", "FingerprintMismatchError"]


class PosbiasError(Exception):
    """An error caused by user input; the message names the input and the fix."""


class ModelUnavailableError(PosbiasError):
    """The named model cannot be loaded here (unknown alias, not cached, hub unreachable)."""


class SchemaError(PosbiasError):
    """A store or calibration file of another schema or schema version, or one that fails validation."""


class FingerprintMismatchError(PosbiasError):
    """A calibration made for another model (its fingerprint differs)."""
