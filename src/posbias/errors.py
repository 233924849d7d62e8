"""User-facing errors.

Every error a user can fix by changing what they passed (a model name, a path, an option, a file of the
wrong schema) is a :class:`PosbiasError` (a :class:`ValueError`) whose message is one line naming the input and
the fix. The CLI prints it as ``profile-bias: error: <message>`` and exits with status 2.

Failures of the machine rather than of the input (a full disk, an exceeded quota, no permission, a
read-only file system, a folder removed while running, a file where a folder should be) are an
:class:`EnvironmentFault`: also one line naming the path, what happened and the fix, but exit status
74 (``EX_IOERR`` of sysexits.h), so scripts can tell "fix your input" (2) from "fix the machine, then
run again" (74). ``--debug`` or ``POSBIAS_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

__all__ = ["PosbiasError", "EnvironmentFault", "EXIT_INPUT", "EXIT_ENVIRONMENT", "ModelUnavailableError", "SchemaError", "FingerprintMismatchError"]


#: exit status of the command line for bad input (a PosbiasError)
EXIT_INPUT = 2
#: exit status of the command line for a failure of the machine (an EnvironmentFault), sysexits' EX_IOERR
EXIT_ENVIRONMENT = 74


class PosbiasError(ValueError):
    """An error caused by user input; the message names the input and the fix.

    A :class:`ValueError` (a bad value passed in), so library callers can catch it as one. Library messages
    name parameters (``cv_folds=7``); the command line names its flags instead (``--cv-folds 7``).
    """

    exit_code = EXIT_INPUT


class EnvironmentFault(PosbiasError):
    """The machine stopped the command (full disk, quota, permission, read-only file system, vanished folder).

    Nothing already written is lost; once the cause is gone the same command (``--resume`` for
    ``profile``) continues.
    """

    exit_code = EXIT_ENVIRONMENT
    errno: int | None = None


class ModelUnavailableError(PosbiasError):
    """The named model cannot be loaded here (unknown alias, not cached, hub unreachable)."""


class SchemaError(PosbiasError):
    """A store or calibration file of another schema or schema version, or one that fails validation."""


class FingerprintMismatchError(PosbiasError):
    """A calibration made for another model (its fingerprint differs)."""
