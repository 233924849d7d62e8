"""The calibration artifact ``posbias_calibration.json``: build, save, load, validate. stdlib only.

The normative description is docs/calibration.md; the machine-checkable part is the JSON Schema
``schemas/calibration.schema.json`` shipped in this package, which every load validates against, followed
by the cross-field checks of :func:`check_semantics` that a schema cannot express.
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

from posbias.artifacts.entries import ENTRY_NAMES, find_entry
from posbias.artifacts.validate import json_path, validate
from posbias.errors import FingerprintMismatchError, PosbiasError, SchemaError

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "CALIBRATION_FILENAME",
    "KNOWN_METHODS",
    "Calibration",
    "dumps",
    "export_to",
    "load_schema",
    "check_semantics",
    "utc_now",
    "fastv_entry",
    "pore_entry",
    "pbc_entry",
]

SCHEMA_NAME = "posbias.calibration"
SCHEMA_VERSION = 2
#: versions this posbias reads (1: before per-entry ``quality``; the rest of the format is unchanged)
READABLE_VERSIONS: tuple[int, ...] = (1, 2)
CALIBRATION_FILENAME = "posbias_calibration.json"
#: registered calibration entries (a live view of :mod:`posbias.artifacts.entries`); other names MAY appear and
#: are passed through
KNOWN_METHODS = ENTRY_NAMES


# ---------------------------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    return resources.files("posbias.artifacts").joinpath("schemas/calibration.schema.json").read_text("utf-8")


def load_schema() -> dict[str, Any]:
    """The shipped JSON Schema (a fresh copy)."""
    return json.loads(_schema_text())


def utc_now() -> str:
    """Current UTC time as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_default(value: Any) -> Any:
    """Accept numpy/torch scalars and arrays by duck typing (no import of either)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(d: dict[str, Any]) -> str:
    """Canonical JSON text: sorted keys, 2-space indent, ``repr`` floats, trailing newline.

    The same input always gives byte-identical output. NaN and infinity are rejected (not valid JSON).

    Parameters
    ----------
    d : dict
        Plain JSON data.

    Returns
    -------
    str
    """
    try:
        text = json.dumps(d, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default)
    except ValueError as exc:
        raise SchemaError(f"calibration contains NaN or infinity ({exc}); fix the fit that produced it") from exc
    except TypeError as exc:
        raise SchemaError(f"calibration contains a value JSON cannot hold ({exc}); convert it to lists/floats") from exc
    return text + "\n"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def check_semantics(d: dict[str, Any], *, what: str = "calibration") -> None:
    """Cross-field rules the schema cannot express; raise :class:`SchemaError` naming the JSON path.

    For every entry registered in :mod:`posbias.artifacts.entries` (other names pass through):

    - every layer index is < ``model.n_layers``;
    - a method's ``domain`` equals its ``fit.params.domain``;
    - the entry's own ``check`` (built-ins: ``posprune-pbc`` / ``posprune-pbc-2d``: ``shallow_layer <
      deep_layer`` and as many ``fit.learned.coef_`` as the curve or surface has terms, an ``auto`` degree of
      ``statistics.pbc_degree`` equal to the fitted one; ``adaptprune-gaussian`` / ``posprune-pbc-2d``:
      ``grid`` equals ``model.grid`` when both are set, and a Gaussian ``mask`` has ``rows * cols`` values).

    Then, for the whole document:

    - ``statistics``: per-candidate lists have one entry per candidate;
    - ``defaults.layer`` is < ``model.n_layers`` and ``defaults.method`` names a method present in ``methods``.
    """

    def fail(path: tuple[Any, ...], msg: str) -> None:
        raise SchemaError(f"{what} is inconsistent at {json_path(path)}: {msg}; regenerate the calibration")

    n_layers = d["model"]["n_layers"]
    methods = d["methods"]
    for name, entry in methods.items():
        kind = find_entry(name)
        if kind is None:
            continue
        for key in ("layer", "shallow_layer", "deep_layer"):
            if key in entry and entry[key] >= n_layers:
                fail(("methods", name, key), f"layer {entry[key]} does not exist (model has {n_layers} layers)")
        if "fit" in entry and "domain" in entry:
            if entry["fit"]["params"]["domain"] != entry["domain"]:
                fail(("methods", name, "domain"), f"{entry['domain']!r} differs from the fit's domain {entry['fit']['params']['domain']!r}")
        if kind.check is not None:
            kind.check(name, entry, d, fail)
    stats = d.get("statistics", {})
    deg = stats.get("pbc_degree")
    if deg is not None:
        n = len(deg["degrees"])
        for key in ("cv_mse", "cv_se", "paired_se"):
            if len(deg[key]) != n:
                fail(("statistics", "pbc_degree", key), f"has {len(deg[key])} entries for {n} degrees")
        if deg["chosen"] not in deg["degrees"] or deg["best"] not in deg["degrees"]:
            fail(("statistics", "pbc_degree", "chosen"), "chosen and best must be among the candidate degrees")
    for i, curve in enumerate(stats.get("consistency", {}).get("curves", [])):
        n = len(curve["group_sizes"])
        for key in ("r_median", "r_mean", "r_low", "r_high", "n_repeats"):
            if len(curve[key]) != n:
                fail(("statistics", "consistency", "curves", i, key), f"has {len(curve[key])} entries for {n} group sizes")
    if d["defaults"]["method"] not in methods:
        fail(("defaults", "method"), f"{d['defaults']['method']!r} is not among methods {sorted(methods)}")
    if d["defaults"]["layer"] >= n_layers:
        fail(("defaults", "layer"), f"layer {d['defaults']['layer']} does not exist (model has {n_layers} layers)")


def _check_document(d: Any, *, what: str) -> None:
    """Schema name/version gate, then schema validation, then semantic checks."""
    if not isinstance(d, dict):
        raise SchemaError(f"{what} is not a JSON object; pass a {CALIBRATION_FILENAME}")
    if d.get("schema") != SCHEMA_NAME:
        raise SchemaError(
            f"{what} has schema {d.get('schema')!r}, not {SCHEMA_NAME!r}; pass a {CALIBRATION_FILENAME} written by posbias"
        )
    version = d.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise SchemaError(
            f"{what} has schema_version {version}, newer than {SCHEMA_VERSION} which this posbias reads; upgrade posbias"
        )
    validate(d, load_schema(), what=what)
    check_semantics(d, what=what)


# ---------------------------------------------------------------------------------------------- method entries
def _goodness(fit: dict[str, Any]) -> dict[str, Any]:
    learned = fit["learned"]
    return {"r2": learned["r2_"], "rmse": learned["rmse_"], "n_samples": learned["n_samples_"]}


def fastv_entry(layer: int) -> dict[str, Any]:
    """``methods["fastv"]``: plain last-token attention at ``layer``."""
    return {"layer": int(layer)}


def pore_entry(fit: dict[str, Any], *, layer: int) -> dict[str, Any]:
    """``methods["pore"]`` from an ``ExponentialBiasFitter.to_dict()`` payload fitted at ``layer``."""
    return {"layer": int(layer), "domain": fit["params"]["domain"], "fit": copy.deepcopy(fit), "goodness": _goodness(fit)}


def pbc_entry(fit: dict[str, Any], *, shallow_layer: int, deep_layer: int) -> dict[str, Any]:
    """``methods["posprune-pbc"]`` from a ``PolynomialBiasFitter.to_dict()`` payload."""
    return {
        "shallow_layer": int(shallow_layer),
        "deep_layer": int(deep_layer),
        "domain": fit["params"]["domain"],
        "fit": copy.deepcopy(fit),
        "goodness": _goodness(fit),
    }


# ---------------------------------------------------------------------------------------------- the class
class Calibration:
    """A validated calibration document.

    Parameters
    ----------
    data : dict
        The document; use :meth:`from_dict`, :meth:`new`, :meth:`load` or :meth:`from_pretrained` rather
        than the constructor, which does not validate.
    source : str
        Where it came from (a path, or ``"<dict>"``); used in error messages.
    """

    def __init__(self, data: dict[str, Any], *, source: str = "<dict>") -> None:
        self._data = data
        self.source = source

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, validate: bool = True, source: str = "<dict>") -> "Calibration":
        """Wrap a (deep-copied) document, validating it unless ``validate=False``."""
        data = copy.deepcopy(d)
        if validate:
            _check_document(data, what=f"calibration {source}")
        return cls(data, source=source)

    @classmethod
    def new(
        cls,
        *,
        model: dict[str, Any],
        store: dict[str, Any],
        methods: dict[str, dict[str, Any]],
        defaults: dict[str, Any] | None = None,
        created: str | None = None,
        posbias_version: str | None = None,
    ) -> "Calibration":
        """Assemble and validate a new document (``created`` defaults to now, UTC).

        ``defaults`` defaults to ``{"method": "posprune-pbc", "layer": 2, "keep": 64}``, with the method
        replaced by the first of posprune-pbc, pore, fastv present when posprune-pbc is absent and the
        layer taken from that method.
        """
        if posbias_version is None:
            from posbias import __version__ as posbias_version  # type: ignore[no-redef]
        if defaults is None:
            order = [m for m in ("posprune-pbc", "pore", "fastv") if m in methods] or sorted(methods)
            name = order[0] if order else "posprune-pbc"
            entry = methods.get(name, {})
            layer = entry.get("layer", entry.get("shallow_layer", 2))
            defaults = {"method": name, "layer": layer, "keep": 64}
        doc = {
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "created": created or utc_now(),
            "posbias_version": posbias_version,
            "model": model,
            "store": store,
            "methods": methods,
            "defaults": defaults,
        }
        # round-trip through canonical JSON so numpy scalars become plain types
        return cls.from_dict(json.loads(dumps(doc)))

    @classmethod
    def loads(cls, text: str, *, source: str = "<string>") -> "Calibration":
        """Parse and validate JSON text."""
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except ValueError as exc:
            raise SchemaError(f"calibration {source} is not valid JSON ({str(exc).splitlines()[0]}); regenerate it") from exc
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """Read and validate a calibration file."""
        p = Path(path)
        if not p.is_file():
            raise SchemaError(f"calibration file {p} does not exist; check the path or create it with `profile-bias`")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SchemaError(f"calibration file {p} cannot be read as UTF-8 text ({exc}); regenerate it") from exc
        return cls.loads(text, source=str(p))

    @classmethod
    def from_pretrained(cls, model_dir_or_file: str | Path) -> "Calibration":
        """Load ``<dir>/posbias_calibration.json`` for a model directory, or the given file."""
        p = Path(model_dir_or_file)
        if p.is_dir():
            target = p / CALIBRATION_FILENAME
            if not target.is_file():
                raise SchemaError(
                    f"model folder {p} has no {CALIBRATION_FILENAME}; calibrate the model and ship the result with "
                    f"'profile-bias export --calibration runs/NAME/{CALIBRATION_FILENAME} --to {p}'"
                )
            return cls.load(target)
        return cls.load(p)

    # ----------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the document."""
        return copy.deepcopy(self._data)

    def dumps(self) -> str:
        """Canonical JSON text (see :func:`dumps`)."""
        return dumps(self._data)

    def save(self, path: str | Path) -> Path:
        """Write canonical JSON to ``path`` (a directory gets ``posbias_calibration.json``); returns the path."""
        p = Path(path)
        if p.is_dir():
            p = p / CALIBRATION_FILENAME
        if not p.parent.is_dir():
            raise PosbiasError(f"cannot save calibration to {p}: directory {p.parent} does not exist; create it first")
        from posbias.atomic import atomic_write_text

        return atomic_write_text(p, self.dumps())

    # ----------------------------------------------------------------- access
    @property
    def model(self) -> dict[str, Any]:
        """``model`` section (copy)."""
        return copy.deepcopy(self._data["model"])

    @property
    def store(self) -> dict[str, Any]:
        """``store`` section (copy)."""
        return copy.deepcopy(self._data["store"])

    @property
    def methods(self) -> dict[str, dict[str, Any]]:
        """``methods`` section (copy)."""
        return copy.deepcopy(self._data["methods"])

    @property
    def defaults(self) -> dict[str, Any]:
        """``defaults`` section (copy)."""
        return copy.deepcopy(self._data["defaults"])

    @property
    def fingerprint(self) -> str:
        """``model.fingerprint``."""
        return str(self._data["model"]["fingerprint"])

    def method(self, name: str) -> dict[str, Any]:
        """The entry of one method (copy); :class:`PosbiasError` listing the available ones if absent."""
        methods = self._data["methods"]
        if name not in methods:
            raise PosbiasError(
                f"calibration {self.source} has no method {name!r}; available: {sorted(methods)}; "
                "pick one of those or recalibrate with that method"
            )
        return copy.deepcopy(methods[name])

    def check_fingerprint(self, fingerprint: str, *, model_id: str = "") -> None:
        """Raise :class:`FingerprintMismatchError` unless ``fingerprint`` equals the calibration's."""
        mine = self.fingerprint
        if fingerprint != mine:
            who = f"model {model_id}" if model_id else "the model"
            raise FingerprintMismatchError(
                f"calibration {self.source} was made for {self._data['model']['id']} (fingerprint {mine}) but "
                f"{who} has fingerprint {fingerprint}; calibrate this model or load its own calibration"
            )

    def __repr__(self) -> str:
        return (
            f"Calibration(model={self._data['model']['id']!r}, fingerprint={self.fingerprint!r}, "
            f"methods={sorted(self._data['methods'])})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Calibration) and self._data == other._data

    __hash__ = None  # type: ignore[assignment]


def export_to(
    calibration_path: str | Path,
    model_dir: str | Path,
    *,
    fingerprint: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Validate a calibration and write it next to ``config.json`` in ``model_dir``.

    Parameters
    ----------
    calibration_path : str or Path
        An existing calibration file.
    model_dir : str or Path
        A Hugging Face model directory (must contain ``config.json``).
    fingerprint : str, optional
        Fingerprint of the checkpoint in ``model_dir`` (computed by the caller from its full config);
        when given it must equal the calibration's.
    overwrite : bool
        Replace a calibration already in ``model_dir``.

    Returns
    -------
    Path
        ``model_dir / "posbias_calibration.json"``.
    """
    md = Path(model_dir)
    if not (md / "config.json").is_file():
        raise PosbiasError(f"{md} has no config.json; pass the model directory (the one save_pretrained wrote)")
    cal = Calibration.load(calibration_path)
    if fingerprint is not None:
        cal.check_fingerprint(fingerprint, model_id=str(md))
    dest = md / CALIBRATION_FILENAME
    if dest.exists() and not overwrite:
        raise PosbiasError(f"{dest} exists; pass overwrite=True to replace it")
    return cal.save(dest)
