"""COCO images (val2014 or val2017 folder) with questions made from their annotations by templates.

``--data coco:IMAGES[:ANNOTATIONS]``. IMAGES is the image folder (``COCO_val2014_000000xxxxxx.jpg`` or
``000000xxxxxx.jpg`` names). ANNOTATIONS is an ``instances_*.json`` or ``captions_*.json`` file, or a
folder holding them; by default ``IMAGES/../annotations/{instances,captions}_<folder name>.json`` are
used when present. Templates, per image (in image-id order):

* with instances, POPE-style object probes: ``"Is there a {category} in the image?"`` with answer
  ``yes`` for the category covering the largest area of the image, and ``no`` for a category absent
  from it (chosen by a generator seeded with the image id, so the same on every machine); keys
  ``<image_id>/pope-<category>``;
* with captions, ``"Describe this image in one sentence."`` with the caption of the lowest annotation
  id as reference; key ``<image_id>/caption``;
* without annotations, the caption question without a reference answer.

An image named in the annotations but absent from the folder, or undecodable, raises
:class:`~posbias.data.base.BadSample` when loaded.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from posbias.data.base import BadSample, Sample
from posbias.data.files import IMAGE_SUFFIXES, RecordSource, one_line, open_image, split_spec
from posbias.errors import PosbiasError

__all__ = ["COCOSource", "COCO_LAYOUTS", "CAPTION_QUESTION", "OBJECT_QUESTION"]

COCO_LAYOUTS = (
    "coco:IMAGES (a val2014/val2017 image folder)",
    "coco:IMAGES:ANNOTATIONS (instances_*.json / captions_*.json file, or a folder holding them)",
)
CAPTION_QUESTION = "Describe this image in one sentence."
OBJECT_QUESTION = "Is there {article} {name} in the image?"
_ID_RE = re.compile(r"(\d+)$")


@dataclass(frozen=True)
class _Record:
    key: str
    image_id: int
    question: str
    answer: str | None
    file: str


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _load_json(path: Path, name: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PosbiasError(f"data source {name}: annotation file {path} is not readable JSON ({one_line(str(exc), 100)}); re-download it") from exc
    if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
        raise PosbiasError(f"data source {name}: {path} is not a COCO annotation file (needs 'images' and 'annotations')")
    return doc


class COCOSource(RecordSource):
    """COCO images with template questions (see the module docstring).

    Parameters
    ----------
    images : str or Path
        Image folder.
    annotations : str or Path, optional
        Annotation file or folder (default: ``IMAGES/../annotations`` when it exists).
    name : str
        Source name.
    """

    def __init__(self, images: str | Path, annotations: str | Path | None = None, *, name: str = "coco") -> None:
        self.name = name
        self.images = Path(images).expanduser()
        if not self.images.is_dir():
            raise PosbiasError(f"data source {name}:{images}: not an image folder; accepted layouts: {'; '.join(COCO_LAYOUTS)}")
        on_disk = {p.name: p for p in self.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        ann_files = self._annotation_files(annotations)
        if not on_disk and not ann_files:
            raise PosbiasError(f"data source {name}:{images}: the folder holds no images; accepted layouts: {'; '.join(COCO_LAYOUTS)}")
        self._records = self._build(on_disk, ann_files)

    @classmethod
    def from_spec(cls, arg: str | None) -> COCOSource:
        """Factory for ``--data coco:IMAGES[:ANNOTATIONS]``."""
        if not arg:
            raise PosbiasError(f"data source coco needs a path; accepted layouts: {'; '.join(COCO_LAYOUTS)}")
        return cls(*split_spec(arg))

    def _annotation_files(self, annotations: str | Path | None) -> dict[str, Path]:
        split = self.images.name
        if annotations is None:
            d = self.images.parent / "annotations"
            found = {kind: d / f"{kind}_{split}.json" for kind in ("instances", "captions")}
            return {k: p for k, p in found.items() if p.is_file()}
        a = Path(annotations).expanduser()
        if a.is_file():
            kind = "captions" if "caption" in a.name else "instances"
            return {kind: a}
        if a.is_dir():
            out = {}
            for kind in ("instances", "captions"):
                cands = sorted(a.glob(f"{kind}_{split}.json")) or sorted(a.glob(f"{kind}_*.json"))
                if cands:
                    out[kind] = cands[0]
            if out:
                return out
        raise PosbiasError(
            f"data source {self.name}: annotations {annotations} are not an instances_*.json / captions_*.json file or a "
            f"folder holding them; accepted layouts: {'; '.join(COCO_LAYOUTS)}"
        )

    def _build(self, on_disk: dict[str, Path], ann_files: dict[str, Path]) -> list[_Record]:
        images: dict[int, str] = {}
        instances = _load_json(ann_files["instances"], self.name) if "instances" in ann_files else None
        captions = _load_json(ann_files["captions"], self.name) if "captions" in ann_files else None
        for doc in (instances, captions):
            if doc:
                for im in doc["images"]:
                    images[int(im["id"])] = str(im["file_name"])
        if not images:  # no annotations: every image file, id from its name
            for fname in on_disk:
                m = _ID_RE.search(Path(fname).stem)
                if m:
                    images[int(m.group(1))] = fname
        records: list[_Record] = []
        area: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        cat_names: dict[int, str] = {}
        if instances:
            cat_names = {int(c["id"]): str(c["name"]) for c in instances.get("categories", [])}
            for ann in instances["annotations"]:
                area[int(ann["image_id"])][int(ann["category_id"])] += float(ann.get("area", 0.0))
        first_caption: dict[int, tuple[int, str]] = {}
        if captions:
            for ann in captions["annotations"]:
                iid, aid = int(ann["image_id"]), int(ann["id"])
                if iid not in first_caption or aid < first_caption[iid][0]:
                    first_caption[iid] = (aid, " ".join(str(ann["caption"]).split()))
        all_cats = sorted(cat_names)
        for iid in sorted(images):
            fname = images[iid]
            if instances:
                present = area.get(iid, {})
                if present:
                    top = max(sorted(present), key=lambda c: present[c])
                    records.append(self._object(iid, fname, cat_names.get(top, str(top)), "yes"))
                absent = [c for c in all_cats if c not in present]
                if absent:
                    pick = absent[int(np.random.default_rng(iid).integers(len(absent)))]
                    records.append(self._object(iid, fname, cat_names[pick], "no"))
            if captions or not instances:
                answer = first_caption[iid][1] if iid in first_caption else None
                records.append(_Record(f"{iid}/caption", iid, CAPTION_QUESTION, answer, fname))
        return records

    @staticmethod
    def _object(iid: int, fname: str, name: str, answer: str) -> _Record:
        article = "an" if name[:1].lower() in "aeiou" else "a"
        return _Record(f"{iid}/pope-{_slug(name)}", iid, OBJECT_QUESTION.format(article=article, name=name), answer, fname)

    # -- SampleSource

    def load(self, index: int) -> Sample:
        rec, sid = self._usable(index)
        path = self.images / rec.file
        if not path.is_file():
            raise BadSample(sid, f"image file {path} is missing")
        return Sample(id=sid, source=self.name, image=open_image(path, sid), question=rec.question, answer=rec.answer,
                      meta={"image_id": rec.image_id, "file": rec.file})
