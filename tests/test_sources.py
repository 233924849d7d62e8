"""Benchmark sources (MME, POPE, COCO) on small fixture copies written in each real layout: lmms-eval
parquet files (pyarrow), the MME release folder, POPE jsonl + a COCO image folder, COCO annotation json.
Nothing is downloaded."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from posbias.data import BadSample, get_source, iter_samples
from posbias.data.coco import CAPTION_QUESTION, COCOSource
from posbias.data.mme import MMESource
from posbias.data.pope import POPESource
from posbias.data.registry import parse_data_option, split_quotas
from posbias.errors import PosbiasError


def _png(seed: int, size: tuple[int, int] = (20, 30)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)  # (H, W, 3) uint8
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _save(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(seed))
    return path


# ------------------------------------------------------------------------------------------- MME


def _mme_parquet(root: Path) -> Path:
    """lmms-lab/MME layout: data/test-0000k-of-00002.parquet, two questions per image, image struct."""
    rows = [
        ("existence/000000006040.jpg", "Is there a train in this image? Please answer yes or no.", "Yes", "existence", _png(1)),
        ("existence/000000006040.jpg", "Is there a bed in this image? Please answer yes or no.", "No", "existence", _png(1)),
        ("count/0001.png", "Are there two dogs? Please answer yes or no.", "Yes", "count", _png(2)),
        ("count/0001.png", "Are there three dogs? Please answer yes or no.", "maybe", "count", _png(2)),  # bad answer
        ("ocr/0002.png", "Is the word 'STOP'? Please answer yes or no.", "Yes", "OCR", b"not an image"),  # corrupt
        ("ocr/0003.png", "", "No", "OCR", _png(3)),  # empty question
    ]
    data = root / "data"
    data.mkdir(parents=True)
    for k, chunk in enumerate((rows[:3], rows[3:])):
        table = pa.table({
            "question_id": [r[0] for r in chunk],
            "image": pa.array([{"bytes": r[4], "path": None} for r in chunk],
                              type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "question": [r[1] for r in chunk],
            "answer": [r[2] for r in chunk],
            "category": [r[3] for r in chunk],
        })
        pq.write_table(table, data / f"test-{k:05d}-of-00002.parquet", row_group_size=2)
    return root


def _mme_folder(root: Path) -> Path:
    """Original release: MME_Benchmark_release_version/<category>/ in both sub-layouts."""
    rel = root / "MME_Benchmark_release_version"
    ex = rel / "existence"
    _save(ex / "000000006040.jpg", 1)
    (ex / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n"
    )
    _save(ex / "000000011111.jpg", 4)
    (ex / "000000011111.txt").write_text("Is there a cat? Yes\n")  # malformed: no tab
    art = rel / "artwork"
    _save(art / "images" / "10002.jpg", 5)
    (art / "questions_answers_YN").mkdir(parents=True)
    (art / "questions_answers_YN" / "10002.txt").write_text("Is this by Monet? Please answer yes or no.\tNo\n")
    (art / "questions_answers_YN" / "10009.txt").write_text("Is this a portrait?\tYes\n")  # image missing
    return root


def test_mme_parquet_layout(tmp_path: Path) -> None:
    src = MMESource(_mme_parquet(tmp_path / "MME"))
    assert src.layout == "parquet" and len(src) == 6
    keys = [src.key(i) for i in range(6)]
    assert keys[:3] == ["existence/000000006040.jpg#0", "existence/000000006040.jpg#1", "count/0001.png#0"]
    s = src.load(1)
    assert s.id == "mme:existence/000000006040.jpg#1" and s.answer == "No" and s.source == "mme"
    assert s.image.size == (30, 20) and s.image.mode == "RGB" and s.meta["category"] == "existence"
    reasons = {}
    for i in range(6):
        try:
            src.load(i)
        except BadSample as bad:
            reasons[bad.sample_id] = bad.reason
    assert set(reasons) == {"mme:count/0001.png#1", "mme:OCR/0002.png#0", "mme:OCR/0003.png#0"}
    assert "not Yes/No" in reasons["mme:count/0001.png#1"]
    assert reasons["mme:OCR/0002.png#0"].startswith("cannot decode image")
    assert "empty question" in reasons["mme:OCR/0003.png#0"]


def test_mme_folder_layout_same_ids_as_parquet(tmp_path: Path) -> None:
    src = get_source(f"mme:{_mme_folder(tmp_path / 'MME')}")
    assert isinstance(src, MMESource) and src.layout == "folder"
    ids = [src.sample_id(i) for i in range(len(src))]
    assert "mme:existence/000000006040.jpg#0" in ids and "mme:artwork/10002.jpg#0" in ids
    good, bad = {}, {}
    for i in range(len(src)):
        try:
            s = src.load(i)
            good[s.id] = s
        except BadSample as b:
            bad[b.sample_id] = b.reason
    assert good["mme:existence/000000006040.jpg#1"].question.startswith("Is there a bed")
    assert good["mme:artwork/10002.jpg#0"].answer == "No"
    assert any("has 1 tab-separated fields" in r for r in bad.values())
    assert any("no image named 10009" in r for r in bad.values())
    # the same question has the same id in both layouts
    pq_src = MMESource(_mme_parquet(tmp_path / "MMEpq"))
    assert set(ids) & {pq_src.sample_id(i) for i in range(len(pq_src))} >= {
        "mme:existence/000000006040.jpg#0", "mme:existence/000000006040.jpg#1"}


# ------------------------------------------------------------------------------------------ POPE


def _coco_images(d: Path, ids: list[int], prefix: str = "COCO_val2014_") -> dict[int, str]:
    out = {}
    for k, iid in enumerate(ids):
        name = f"{prefix}{iid:012d}.jpg"
        img = Image.fromarray(np.random.default_rng(iid).integers(0, 256, (24, 32, 3), dtype=np.uint8))
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / name, format="JPEG")
        out[iid] = name
    return out


def _pope_jsonl(root: Path) -> Path:
    names = _coco_images(root / "val2014", [310196, 42])
    lines = [
        {"question_id": 1, "image": names[310196], "text": "Is there a snowboard in the image?", "label": "yes"},
        {"question_id": 2, "image": names[42], "text": "Is there a dog in the image?", "label": "no"},
        {"question_id": 3, "image": "COCO_val2014_000000999999.jpg", "text": "Is there a cat in the image?", "label": "no"},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n{not json\n"
    (root / "coco_pope_random.json").write_text(text)
    (root / "coco_pope_adversarial.json").write_text(json.dumps(lines[0] | {"label": "perhaps"}) + "\n")
    return root


def test_pope_jsonl_layout(tmp_path: Path) -> None:
    src = get_source(f"pope:{_pope_jsonl(tmp_path / 'pope')}")
    assert isinstance(src, POPESource) and src.layout == "jsonl"
    keys = [src.key(i) for i in range(len(src))]
    assert keys == ["adversarial/1", "random/1", "random/2", "random/3", "random/line4"]
    s = src.load(1)
    assert s.id == "pope:random/1" and s.answer == "yes" and s.image.size == (32, 24)
    reasons = {}
    for i in (0, 3, 4):
        with pytest.raises(BadSample) as ei:
            src.load(i)
        reasons[keys[i]] = ei.value.reason
    assert "is not yes/no" in reasons["adversarial/1"]
    assert "is missing" in reasons["random/3"]  # the POPE line whose image is missing
    assert "is not JSON" in reasons["random/line4"]
    # explicit image folder after ':'
    src2 = POPESource.from_spec(f"{tmp_path / 'pope' / 'coco_pope_random.json'}:{tmp_path / 'pope' / 'val2014'}")
    assert len(src2) == 4 and src2.load(0).id == "pope:random/1"


def test_pope_parquet_layout(tmp_path: Path) -> None:
    d = tmp_path / "POPE" / "data"
    d.mkdir(parents=True)
    table = pa.table({
        "id": ["0", "1", "2"],
        "question_id": ["1", "2", "1"],
        "question": ["Is there a snowboard in the image?", "Is there a dog in the image?", "Is there a cup?"],
        "answer": ["yes", "no", "no"],
        "image_source": ["COCO_val2014_000000310196", "x", "y"],
        "image": pa.array([{"bytes": _png(7), "path": "a.jpg"}, {"bytes": None, "path": None}, {"bytes": _png(8), "path": None}],
                          type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "category": ["random", "random", "adversarial"],
    })
    pq.write_table(table, d / "test-00000-of-00001.parquet")
    src = get_source(f"pope:{tmp_path / 'POPE'}")
    assert [src.key(i) for i in range(3)] == ["random/1", "random/2", "adversarial/1"]
    assert src.load(0).answer == "yes" and src.load(2).image.size == (30, 20)
    with pytest.raises(BadSample, match="no image"):
        src.load(1)


# ------------------------------------------------------------------------------------------ COCO


def _coco(root: Path) -> Path:
    names = _coco_images(root / "val2014", [42, 73])
    names[99] = "COCO_val2014_000000000099.jpg"  # annotated, not on disk
    images = [{"id": i, "file_name": n} for i, n in names.items()]
    cats = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 44, "name": "bottle"}, {"id": 62, "name": "chair"}]
    inst = {"images": images, "categories": cats, "annotations": [
        {"id": 1, "image_id": 42, "category_id": 18, "area": 500.0},
        {"id": 2, "image_id": 42, "category_id": 1, "area": 300.0},
        {"id": 3, "image_id": 42, "category_id": 1, "area": 300.0},  # person total 600 > dog 500
        {"id": 4, "image_id": 73, "category_id": 44, "area": 50.0},
    ]}
    caps = {"images": images, "annotations": [
        {"id": 9, "image_id": 42, "caption": "A man  walks a dog."},
        {"id": 5, "image_id": 42, "caption": "A person with a dog on a street."},
        {"id": 6, "image_id": 73, "caption": "A bottle on a table."},
    ]}
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(inst))
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(caps))
    return root


def test_coco_templates_from_instances_and_captions(tmp_path: Path) -> None:
    root = _coco(tmp_path / "coco")
    src = get_source(f"coco:{root / 'val2014'}")  # annotations found in ../annotations
    assert isinstance(src, COCOSource)
    keys = [src.key(i) for i in range(len(src))]
    assert keys[:2] == ["42/pope-person", keys[1]] and keys[1].startswith("42/pope-") and keys[1] != "42/pope-dog"
    assert keys[2] == "42/caption" and "73/pope-bottle" in keys and "99/caption" in keys
    s = src.load(0)
    assert s.question == "Is there a person in the image?" and s.answer == "yes" and s.image.size == (32, 24)
    neg = src.load(1)
    assert neg.answer == "no" and neg.question.split(" ")[3] in ("bottle", "chair")
    cap = src.load(2)
    assert cap.question == CAPTION_QUESTION and cap.answer == "A person with a dog on a street."
    with pytest.raises(BadSample, match="is missing"):
        src.load(keys.index("99/caption"))
    # deterministic: same records on a second index; explicit annotation file
    again = COCOSource(root / "val2014", root / "annotations" / "instances_val2014.json")
    assert [again.key(i) for i in range(len(again))] == [k for k in keys if "caption" not in k]


def test_coco_without_annotations(tmp_path: Path) -> None:
    _coco_images(tmp_path / "val2017", [5, 3], prefix="")
    src = get_source(f"coco:{tmp_path / 'val2017'}")
    assert [src.key(i) for i in range(len(src))] == ["3/caption", "5/caption"]
    assert src.load(0).answer is None


# ---------------------------------------------------------------------------------- specs, errors


def test_quota_syntax_and_plan(tmp_path: Path) -> None:
    assert parse_data_option("mme:/d/MME@200") == ("mme:/d/MME", 200)
    assert parse_data_option("pope:/q.json:/img") == ("pope:/q.json:/img", None)
    assert parse_data_option("coco:/x@all") == ("coco:/x", None)
    with pytest.raises(PosbiasError, match="quota after '@'"):
        parse_data_option("mme:/d@lots")
    specs, quotas = split_quotas([f"pope:{_pope_jsonl(tmp_path / 'p')}@3", "embedded@4"])
    assert quotas == [3, 4]
    a = iter_samples(specs, n=None, seed=1, quotas=quotas)
    b = iter_samples(specs, n=None, seed=1, quotas=quotas)
    assert a.ids == b.ids and len(a) == 7
    assert sum(i.startswith("pope:") for i in a.ids) == 3 and sum(i.startswith("embedded:") for i in a.ids) == 4
    items = list(a)
    assert {x.sample_id if isinstance(x, BadSample) else x.id for x in items} == set(a.ids)


@pytest.mark.parametrize("name", ["mme", "pope", "coco"])
def test_unknown_layout_and_missing_path(tmp_path: Path, name: str) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("nothing here")
    with pytest.raises(PosbiasError) as ei:
        get_source(f"{name}:{empty}")
    msg = str(ei.value)
    assert "\n" not in msg and "layout" in msg and str(empty) in msg
    with pytest.raises(PosbiasError, match="no such file or folder|not an image folder"):
        get_source(f"{name}:{tmp_path / 'nope'}")


def test_corrupt_parquet_file_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "MME" / "test.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(PosbiasError, match="not a readable parquet file"):
        MMESource(tmp_path / "MME")
