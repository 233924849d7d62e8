"""Readers on small but faithful copies of the real releases' layouts (nothing is downloaded).

* lmms-lab/POPE as downloaded: the root holds ``data/test-*.parquet`` (all rows) and ``Full/<category>-*.parquet``
  (the same rows, split by category): every question must be read once.
* the original POPE repository's ``output/coco/``: three ``coco_pope_*.json`` question files next to
  ``coco_co_occur.json`` and ``coco_ground_truth_objects.json`` (not question files).
* a POPE parquet and a POPE jsonl copy combined in one run.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from posbias.data import get_source
from posbias.data.registry import plan_samples, resolve_sources, resolve_with_quotas
from posbias.errors import PosbiasError

CATEGORIES = ("adversarial", "popular", "random")
OBJECTS = ("dog", "snowboard", "cup")
IMAGE_IDS = (310196, 42, 73)


def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)  # (H, W, 3) uint8
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _pope_rows() -> list[dict]:
    """Nine probes: three images x three objects, one category each; POPE's numbering restarts per category."""
    rows = []
    for c, cat in enumerate(CATEGORIES):
        for k, (iid, obj) in enumerate(zip(IMAGE_IDS, OBJECTS)):
            rows.append({
                "id": str(len(rows)), "question_id": str(k + 1),
                "question": f"Is there a {obj} in the image?", "answer": "yes" if (c + k) % 2 == 0 else "no",
                "image_source": f"COCO_val2014_{iid:012d}", "image": {"bytes": _jpeg(iid), "path": None},
                "category": cat,
            })
    return rows


def _table(rows: list[dict]) -> pa.Table:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols = {k: [r[k] for r in rows] for k in ("id", "question_id", "question", "answer", "image_source")}
    return pa.table({**cols, "image": pa.array([r["image"] for r in rows], type=image_type),
                     "category": [r["category"] for r in rows]})


def lmms_lab_pope(root: Path) -> Path:
    """lmms-lab/POPE snapshot: data/test-0000k-of-00002.parquet and Full/<category>-00000-of-00001.parquet."""
    rows = _pope_rows()
    (root / "data").mkdir(parents=True)
    (root / "Full").mkdir()
    pq.write_table(_table(rows[:5]), root / "data" / "test-00000-of-00002.parquet")
    pq.write_table(_table(rows[5:]), root / "data" / "test-00001-of-00002.parquet")
    for cat in CATEGORIES:
        pq.write_table(_table([r for r in rows if r["category"] == cat]), root / "Full" / f"{cat}-00000-of-00001.parquet")
    (root / "README.md").write_text("---\nconfigs: [default, Full]\n---\n")
    return root


def original_pope(root: Path) -> tuple[Path, Path]:
    """POPE repository: output/coco/coco_pope_{adversarial,popular,random}.json (+ two data files) and val2014/."""
    coco = root / "output" / "coco"
    coco.mkdir(parents=True)
    images = root / "val2014"
    images.mkdir()
    for iid in IMAGE_IDS:
        (images / f"COCO_val2014_{iid:012d}.jpg").write_bytes(_jpeg(iid))
    for cat in CATEGORIES:
        lines = [json.dumps({"question_id": int(r["question_id"]), "image": r["image_source"] + ".jpg",
                             "text": r["question"], "label": r["answer"]}) for r in _pope_rows() if r["category"] == cat]
        (coco / f"coco_pope_{cat}.json").write_text("\n".join(lines) + "\n")
    (coco / "coco_co_occur.json").write_text(json.dumps({"dog": {"cat": 12}, "cup": {"table": 30}}))
    (coco / "coco_ground_truth_objects.json").write_text(json.dumps({"COCO_val2014_000000000042.jpg": ["dog"]}))
    return coco, images


def test_lmms_lab_root_reads_each_question_once(tmp_path, capsys):
    root = lmms_lab_pope(tmp_path / "POPE")
    src = get_source(f"pope:{root}")
    keys = [src.key(i) for i in range(len(src))]
    assert len(keys) == 9 and len(set(keys)) == 9
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "9 record(s) are copies" in err[0] and "Full/" in err[0] and "read once" in err[0]
    # the same rows through one folder only: no line
    only = get_source(f"pope:{root / 'data'}")
    assert sorted(only.key(i) for i in range(len(only))) == sorted(keys)
    assert capsys.readouterr().err == ""
    # evaluate plans every record of the source: no question twice
    plan = plan_samples(resolve_sources([f"pope:{root}"]), None, 0)
    ids = [s.sample_id(i) for s, i in plan]
    assert len(ids) == len(set(ids)) == 9


def test_a_conflicting_copy_keeps_the_first_and_says_so(tmp_path, capsys):
    root = lmms_lab_pope(tmp_path / "POPE")
    rows = [r for r in _pope_rows() if r["category"] == "random"]
    rows[0] = rows[0] | {"answer": "no" if rows[0]["answer"] == "yes" else "yes"}
    pq.write_table(_table(rows), root / "Full" / "random-00000-of-00001.parquet")
    src = get_source(f"pope:{root}")
    assert len(src) == 9
    first = [i for i in range(len(src)) if src.key(i) == "random/1"][0]
    assert src.load(first).answer == rows[0]["answer"]  # files are read in sorted order: Full/ before data/
    err = capsys.readouterr().err
    assert "1 record(s) reuse the id of an earlier record" in err and len(err.strip().splitlines()) == 2


def test_original_release_folder_ignores_its_data_files(tmp_path, capsys):
    coco, images = original_pope(tmp_path / "POPE")
    src = get_source(f"pope:{coco}:{images}")
    keys = [src.key(i) for i in range(len(src))]
    assert len(keys) == 9 and all(k.split("/")[0] in CATEGORIES for k in keys)
    assert capsys.readouterr().err == ""  # known files: no line
    (coco / "notes.json").write_text(json.dumps({"author": "me"}))
    src = get_source(f"pope:{coco}:{images}")
    assert len(src) == 9
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ignoring notes.json" in err[0]
    sample = src.load(keys.index("random/2"))
    assert sample.question == "Is there a snowboard in the image?" and sample.image.size == (32, 24)


def test_parquet_and_jsonl_copies_combine_in_one_run(tmp_path, capsys):
    root = lmms_lab_pope(tmp_path / "lmms")
    coco, images = original_pope(tmp_path / "orig")
    capsys.readouterr()
    specs = [f"pope:{root / 'Full' / 'random-00000-of-00001.parquet'}", f"pope:{coco}:{images}"]
    sources, quotas = resolve_with_quotas(specs, [2, 4])
    assert len(sources) == 1 and quotas == [6] and sources[0].name == "pope"
    src = sources[0]
    keys = [src.key(i) for i in range(len(src))]
    assert len(keys) == 9 and len(set(keys)) == 9  # 3 from the parquet, the 6 others from the jsonl files
    assert "3 record(s) have the ids of records of an earlier copy" in capsys.readouterr().err
    plan = plan_samples(sources, None, 0, quotas=quotas)
    assert len(plan) == 6 and len({s.sample_id(i) for s, i in plan}) == 6
    with pytest.raises(PosbiasError, match="more than once"):
        resolve_with_quotas([specs[0], specs[0]], None)
