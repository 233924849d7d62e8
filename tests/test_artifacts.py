"""Calibration artifact: schema validity, validator agreement with jsonschema, save/load, errors."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from posbias.artifacts import (
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
from posbias.artifacts.validate import first_error, json_path
from posbias.errors import FingerprintMismatchError, PosbiasError, SchemaError
from posbias.fitters import ExponentialBiasFitter, PolynomialBiasFitter

V = 576
GRID = np.arange(V, dtype=np.float64)  # (V,)
FP = "sha256:0123456789abcdef"


def _fits(seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    x = np.tile(GRID, 20)  # (20*V,)
    y_att = 3e-4 * np.exp(5e-3 * x) + 8e-4 + rng.normal(0, 1e-4, x.size)
    y_diff = 1e-4 - 1e-6 * x + 5e-9 * x**2 + rng.normal(0, 1e-4, x.size)
    pore = ExponentialBiasFitter().fit(x, y_att).to_dict()
    pbc = PolynomialBiasFitter(degree=3).fit(x, y_diff).to_dict()
    return pore, pbc


def make_calibration(created: str = "2026-11-22T12:00:00Z", seed: int = 0) -> Calibration:
    pore, pbc = _fits(seed)
    return Calibration.new(
        model={
            "id": "llava-hf/llava-1.5-7b-hf",
            "revision": None,
            "fingerprint": FP,
            "adapter": "llava",
            "n_layers": 32,
            "rope_dims": 1,
            "grid": [24, 24],
        },
        store={"file": "store.h5", "n_samples": 20, "n_skipped": 1, "sources": {"embedded": 20}, "seed": 0},
        methods={
            "fastv": fastv_entry(2),
            "pore": pore_entry(pore, layer=2),
            "posprune-pbc": pbc_entry(pbc, shallow_layer=2, deep_layer=20),
        },
        defaults={"method": "posprune-pbc", "layer": 2, "keep": 64},
        created=created,
    )


@pytest.fixture(scope="module")
def doc() -> dict:
    return make_calibration().to_dict()


# ------------------------------------------------------------------------------------ schema
def test_schema_is_valid_draft_2020_12():
    jsonschema = pytest.importorskip("jsonschema")
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def _mutations(doc: dict) -> list[tuple[str, dict]]:
    """(name, invalid document) pairs, one defect each."""
    out = []

    def mut(name, fn):
        d = copy.deepcopy(doc)
        fn(d)
        out.append((name, d))

    mut("missing model", lambda d: d.pop("model"))
    mut("extra top-level key", lambda d: d.__setitem__("extra", 1))
    mut("bad created", lambda d: d.__setitem__("created", "yesterday"))
    mut("schema_version string", lambda d: d.__setitem__("schema_version", "1"))
    mut("schema_version bool", lambda d: d.__setitem__("schema_version", True))
    mut("fingerprint pattern", lambda d: d["model"].__setitem__("fingerprint", "md5:abc"))
    mut("grid wrong length", lambda d: d["model"].__setitem__("grid", [24]))
    mut("grid float", lambda d: d["model"].__setitem__("grid", [24, 24.5]))
    mut("grid string", lambda d: d["model"].__setitem__("grid", "24x24"))
    mut("revision int", lambda d: d["model"].__setitem__("revision", 3))
    mut("rope_dims 4", lambda d: d["model"].__setitem__("rope_dims", 4))
    mut("store file path", lambda d: d["store"].__setitem__("file", "runs/store.h5"))
    mut("negative source count", lambda d: d["store"]["sources"].__setitem__("embedded", -1))
    mut("empty sources", lambda d: d["store"].__setitem__("sources", {}))
    mut("fastv layer negative", lambda d: d["methods"]["fastv"].__setitem__("layer", -1))
    mut("pore domain", lambda d: d["methods"]["pore"].__setitem__("domain", "log"))
    mut("pore a <= 0", lambda d: d["methods"]["pore"]["fit"]["learned"].__setitem__("a_", 0.0))
    mut("pore c < 0", lambda d: d["methods"]["pore"]["fit"]["learned"].__setitem__("c_", -1e-6))
    mut("pore offset not bool", lambda d: d["methods"]["pore"]["fit"]["params"].__setitem__("offset", 1))
    mut("pbc degree 6", lambda d: d["methods"]["posprune-pbc"]["fit"]["params"].__setitem__("degree", 6))
    mut("pbc coef string", lambda d: d["methods"]["posprune-pbc"]["fit"]["learned"]["coef_"].__setitem__(1, "x"))
    mut("pbc wrong class", lambda d: d["methods"]["posprune-pbc"]["fit"].__setitem__("class", "ExponentialBiasFitter"))
    mut("goodness r2 > 1", lambda d: d["methods"]["pore"]["goodness"].__setitem__("r2", 1.5))
    mut("method name pattern", lambda d: d["methods"].__setitem__("Bad_Name", {}))
    mut("other method not object", lambda d: d["methods"].__setitem__("pyramid-drop", 3))
    mut("keep 0", lambda d: d["defaults"].__setitem__("keep", 0))
    mut("defaults extra", lambda d: d["defaults"].__setitem__("ratio", 0.5))
    return out


def test_validator_agrees_with_jsonschema(doc):
    jsonschema = pytest.importorskip("jsonschema")
    schema = load_schema()
    ref = jsonschema.Draft202012Validator(schema)
    assert not list(ref.iter_errors(doc))
    assert first_error(doc, schema) is None
    # extra methods are allowed (forward compatible) by both
    extended = copy.deepcopy(doc)
    extended["methods"]["pyramid-drop"] = {"layers": [2, 8, 16]}
    assert ref.is_valid(extended) and first_error(extended, schema) is None
    mutations = _mutations(doc)
    assert len(mutations) >= 20
    for name, bad in mutations:
        ref_errors = list(ref.iter_errors(bad))
        mine = first_error(bad, schema)
        assert ref_errors, f"jsonschema accepted {name}"
        assert mine is not None, f"posbias validator accepted {name}"
        ref_paths = {tuple(e.absolute_path) for e in ref_errors}
        # additionalProperties errors: jsonschema reports the parent object, we name the offending key
        assert mine.path in ref_paths or mine.path[:-1] in ref_paths, (name, mine, ref_paths)


def test_integer_typed_float_agrees_with_jsonschema(doc):
    jsonschema = pytest.importorskip("jsonschema")
    d = copy.deepcopy(doc)
    d["defaults"]["keep"] = 64.0  # 2020-12: a float with zero fraction is an integer
    assert jsonschema.Draft202012Validator(load_schema()).is_valid(d)
    assert first_error(d, load_schema()) is None


# ------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip(tmp_path, doc):
    cal = Calibration.from_dict(doc)
    path = cal.save(tmp_path / "cal.json")
    back = Calibration.load(path)
    assert back == cal
    assert back.method("pore") == doc["methods"]["pore"]
    assert back.model["grid"] == [24, 24] and back.store["n_samples"] == 20
    assert back.defaults == {"method": "posprune-pbc", "layer": 2, "keep": 64}
    assert set(back.methods) == {"fastv", "pore", "posprune-pbc"}
    text = path.read_text()
    assert text.endswith("}\n") and text == dumps(doc)
    # floats are written with repr: the fit payload round-trips bit for bit
    fit = back.method("posprune-pbc")["fit"]
    assert PolynomialBiasFitter.from_dict(fit).predict(GRID).tolist() == PolynomialBiasFitter.from_dict(
        doc["methods"]["posprune-pbc"]["fit"]
    ).predict(GRID).tolist()


def test_same_inputs_byte_identical(tmp_path):
    a = make_calibration(created="2026-01-01T00:00:00Z").save(tmp_path / "a.json").read_bytes()
    b = make_calibration(created="2026-01-01T00:00:00Z").save(tmp_path / "b.json").read_bytes()
    assert a == b
    # with the default "now" timestamps, only the created line may differ
    c = Calibration.new(**{k: v for k, v in make_calibration().to_dict().items() if k in ("model", "store", "methods", "defaults")})
    lines_a = [ln for ln in a.decode().splitlines() if '"created"' not in ln]
    lines_c = [ln for ln in c.dumps().splitlines() if '"created"' not in ln]
    assert lines_a == lines_c
    assert Calibration.loads(c.dumps()).to_dict()["created"].endswith("Z")


def test_dumps_canonical_and_rejects_nan():
    assert dumps({"b": 1, "a": [0.1, 1e-300]}) == '{\n  "a": [\n    0.1,\n    1e-300\n  ],\n  "b": 1\n}\n'
    assert dumps({"x": np.float32(0.5), "y": np.int64(3)}) == dumps({"x": 0.5, "y": 3})
    with pytest.raises(SchemaError, match="NaN"):
        dumps({"x": float("nan")})


def test_from_pretrained_dir_and_file(tmp_path, doc):
    cal = Calibration.from_dict(doc)
    cal.save(tmp_path)  # a directory gets the canonical name
    assert (tmp_path / CALIBRATION_FILENAME).is_file()
    assert Calibration.from_pretrained(tmp_path) == cal
    assert Calibration.from_pretrained(tmp_path / CALIBRATION_FILENAME) == cal
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(SchemaError, match=f"no {CALIBRATION_FILENAME}"):
        Calibration.from_pretrained(empty)


def test_export_to(tmp_path, doc):
    src = Calibration.from_dict(doc).save(tmp_path / "cal.json")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with pytest.raises(PosbiasError, match="config.json"):
        export_to(src, model_dir)
    (model_dir / "config.json").write_text("{}")
    out = export_to(src, model_dir)
    assert out == model_dir / CALIBRATION_FILENAME
    assert out.read_bytes() == src.read_bytes()
    assert Calibration.from_pretrained(model_dir) == Calibration.load(src)


# ------------------------------------------------------------------------------------ errors
def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg
    return msg


def test_load_errors_are_one_line_schema_errors(tmp_path, doc):
    with pytest.raises(SchemaError) as ei:
        Calibration.load(tmp_path / "missing.json")
    assert "does not exist" in _one_line(ei.value)

    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(SchemaError) as ei:
        Calibration.load(p)
    assert "not valid JSON" in _one_line(ei.value)

    p.write_text(json.dumps({**doc, "schema": "posbias.store"}))
    with pytest.raises(SchemaError) as ei:
        Calibration.load(p)
    assert "posbias.store" in _one_line(ei.value) and SCHEMA_NAME in str(ei.value)

    p.write_text(json.dumps({**doc, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(SchemaError) as ei:
        Calibration.load(p)
    assert "newer" in _one_line(ei.value) and "upgrade posbias" in str(ei.value)

    bad = copy.deepcopy(doc)
    bad["methods"]["pore"]["fit"]["learned"]["a_"] = -1.0
    p.write_text(json.dumps(bad))
    with pytest.raises(SchemaError) as ei:
        Calibration.load(p)
    assert "$.methods.pore.fit.learned.a_" in _one_line(ei.value)

    text = dumps(doc).replace('"r2": ', '"r2": NaN, "x": ', 1)
    with pytest.raises(SchemaError, match="not valid JSON"):
        Calibration.loads(text)


def test_semantic_checks(doc):
    bad = copy.deepcopy(doc)
    bad["methods"]["posprune-pbc"]["deep_layer"] = 1
    with pytest.raises(SchemaError, match=r"\$\.methods\['posprune-pbc'\]\.deep_layer"):
        Calibration.from_dict(bad)
    bad = copy.deepcopy(doc)
    bad["methods"]["fastv"]["layer"] = 32
    with pytest.raises(SchemaError, match="does not exist"):
        Calibration.from_dict(bad)
    bad = copy.deepcopy(doc)
    bad["methods"]["pore"]["domain"] = "normalized"
    with pytest.raises(SchemaError, match="domain"):
        Calibration.from_dict(bad)
    bad = copy.deepcopy(doc)
    bad["defaults"]["method"] = "nope"
    with pytest.raises(SchemaError, match="defaults.method"):
        Calibration.from_dict(bad)
    bad = copy.deepcopy(doc)
    bad["methods"]["posprune-pbc"]["fit"]["learned"]["coef_"].append(0.0)
    with pytest.raises(SchemaError, match="coefficients"):
        Calibration.from_dict(bad)
    assert Calibration.from_dict(bad, validate=False).to_dict() == bad


def test_method_and_fingerprint_errors(doc):
    d = copy.deepcopy(doc)
    del d["methods"]["pore"]
    cal = Calibration.from_dict(d)
    with pytest.raises(PosbiasError) as ei:
        cal.method("pore")
    assert "fastv" in _one_line(ei.value) and "posprune-pbc" in str(ei.value)
    cal.check_fingerprint(FP)
    with pytest.raises(FingerprintMismatchError) as ei:
        cal.check_fingerprint("sha256:ffffffffffffffff", model_id="Qwen/Qwen2.5-VL-3B-Instruct")
    msg = _one_line(ei.value)
    assert FP in msg and "sha256:ffffffffffffffff" in msg and "Qwen/Qwen2.5-VL-3B-Instruct" in msg
    assert "llava-hf/llava-1.5-7b-hf" in msg


def test_default_defaults_pick_present_method(doc):
    methods = {"pore": doc["methods"]["pore"]}
    cal = Calibration.new(model=doc["model"], store=doc["store"], methods=methods)
    assert cal.defaults == {"method": "pore", "layer": 2, "keep": 64}


def test_artifacts_is_stdlib_only():
    code = (
        "import sys, posbias.artifacts; "
        "print(sorted(m for m in ('numpy', 'torch', 'jsonschema', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_schema_ships_in_package():
    import posbias.artifacts

    path = Path(posbias.artifacts.__file__).parent / "schemas" / "calibration.schema.json"
    assert json.loads(path.read_text()) == load_schema()
