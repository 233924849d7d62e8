"""POPE (object-hallucination yes/no probes on COCO val2014) from a local copy, in either layout.

* **lmms-eval parquet** (``lmms-lab/POPE``): ``.parquet`` files with columns ``question_id``,
  ``question``, ``answer`` (``yes``/``no``), ``image`` (struct with ``bytes``/``path``, or binary) and
  optionally ``category`` (``adversarial``/``popular``/``random``).
* **original jsonl question files** (``coco_pope_random.json`` ...: one JSON object a line with
  ``question_id``, ``image``, ``text``, ``label``) plus a COCO val2014 image folder. ``--data
  pope:QUESTIONS[:IMAGES]``: QUESTIONS is one file or a folder of them; IMAGES defaults to the first of
  ``QUESTIONS_DIR/val2014``, ``QUESTIONS_DIR/images``, ``QUESTIONS_DIR``, ``QUESTIONS_DIR/../val2014``
  that exists.

Sample keys are ``<variant>/<question_id>`` where the variant is the parquet ``category`` or the file
name without ``coco_pope_`` (``random``, ``popular``, ``adversarial``), the same in both layouts.
A line that is not JSON, lacks a field, has a label other than yes/no, or whose image is missing is
kept in the index and raises :class:`~posbias.data.base.BadSample` with the reason when loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from posbias.data.base import Sample
from posbias.data.files import ParquetRows, RecordSource, drop_repeats, note, one_line, split_spec
from posbias.errors import PosbiasError

__all__ = ["POPESource", "POPE_LAYOUTS"]

POPE_LAYOUTS = (
    "lmms-eval parquet (.parquet file or folder; columns question_id, question, answer, image[, category])",
    "original jsonl question files (lines with question_id, image, text, label) + a COCO val2014 image folder: "
    "pope:QUESTIONS[:IMAGES]",
)
_QUESTION_SUFFIXES = (".json", ".jsonl")
#: files of the original POPE release (``output/coco/`` ...) that are not question files: ignored silently
_KNOWN_NOT_QUESTIONS = ("co_occur", "ground_truth_objects", "ground_truth", "segmentation", "captions", "instances")


@dataclass(frozen=True)
class _Record:
    key: str
    variant: str
    question: str | None = None
    answer: str | None = None
    image: Path | None = None
    row: int | None = None
    bad: str | None = None
    origin: str = ""  # file or folder the record came from (messages only)


def _variant(stem: str) -> str:
    for prefix in ("coco_pope_", "aokvqa_pope_", "gqa_pope_", "pope_"):
        if stem.startswith(prefix):
            return stem[len(prefix):]
    return stem


def _same(a: _Record, b: _Record) -> bool:
    return (a.question, a.answer, a.bad is None) == (b.question, b.answer, b.bad is None)


def _looks_like_questions(path: Path) -> bool:
    """True when the first non-empty line of ``path`` is a JSON object with POPE's question fields."""
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    obj = json.loads(line)
                    return isinstance(obj, dict) and {"question_id", "text"} <= set(obj)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return False


def _label(value: object) -> str | None:
    s = str(value).strip().lower() if value is not None else ""
    return s if s in ("yes", "no") else None


class POPESource(RecordSource):
    """POPE probes from a local copy (see the module docstring for the layouts).

    Parameters
    ----------
    path : str or Path
        Parquet file/folder, or a question file/folder of the original layout.
    images : str or Path, optional
        COCO val2014 image folder (original layout only).
    name : str
        Source name.
    """

    def __init__(self, path: str | Path, images: str | Path | None = None, *, name: str = "pope") -> None:
        files = self._open_path(path, name, "POPE", POPE_LAYOUTS)
        if files:
            self.layout = "parquet"
            self.images = None
            self._records = self._index_parquet(files)
            return
        qfiles = self._question_files(self.path)
        if not qfiles:
            raise PosbiasError(f"data source {name}:{path} matches no POPE layout; accepted layouts: {'; '.join(POPE_LAYOUTS)}")
        self.layout = "jsonl"
        self.images = self._image_dir(images, qfiles[0].parent)
        self._records = self._index_jsonl(qfiles)

    @classmethod
    def from_spec(cls, arg: str | None) -> POPESource:
        """Factory for ``--data pope:QUESTIONS[:IMAGES]``."""
        if not arg:
            raise PosbiasError(f"data source pope needs a path: pope:PATH ({'; or '.join(POPE_LAYOUTS)})")
        return cls(*split_spec(arg))

    # -- indexing

    def _index_parquet(self, files: list[Path]) -> list[_Record]:
        rows = ParquetRows(
            files,
            columns=["question_id", "question", "answer", "category"],
            required=["question_id", "question", "answer", "image"],
            image_column="image",
            layout="lmms-eval POPE parquet",
        )
        self._rows = rows
        c = rows.columns
        out: list[_Record] = []
        for i in range(len(rows)):
            variant = str(c["category"][i]).strip() if c["category"][i] else "all"
            qid, q, a = c["question_id"][i], c["question"][i], c["answer"][i]
            bad = None
            if qid is None or str(qid).strip() == "":
                bad = f"parquet row {i}: empty question_id"
            elif not q or not str(q).strip():
                bad = f"parquet row {i}: empty question"
            elif _label(a) is None:
                bad = f"parquet row {i}: answer {one_line(str(a), 40)!r} is not yes/no"
            key = f"{variant}/{qid}" if qid is not None and str(qid).strip() else f"{variant}/row{i}"
            out.append(_Record(key, variant, q and str(q).strip(), _label(a), row=i, bad=bad,
                               origin=self._folder_of(files[rows.file_of(i)])))
        return drop_repeats(out, [r.origin for r in out], _same, f"data source {self.name}:{self.path}")

    def _folder_of(self, f: Path) -> str:
        """Folder of ``f`` relative to the source path, for messages (``data/``, ``Full/``)."""
        base = self.path if self.path.is_dir() else self.path.parent
        try:
            rel = f.parent.relative_to(base)
        except ValueError:
            rel = f.parent
        return f"{rel}/" if str(rel) != "." else f.name

    @staticmethod
    def _question_files(path: Path) -> list[Path]:
        """The question files at ``path``: known non-question files of the release are left out silently, a
        file that does not look like POPE questions gets one line and is left out too."""
        if path.is_file():
            return [path] if path.suffix in _QUESTION_SUFFIXES else []
        out = []
        for p in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _QUESTION_SUFFIXES):
            if "pope" in p.stem.lower():
                out.append(p)
            elif any(k in p.stem.lower() for k in _KNOWN_NOT_QUESTIONS):
                continue
            elif _looks_like_questions(p):
                out.append(p)
            else:
                note(f"data source pope:{path}: ignoring {p.name}: not a POPE question file (lines with question_id, "
                     "image, text, label)")
        return out

    def _image_dir(self, images: str | Path | None, qdir: Path) -> Path:
        if images is not None:
            d = Path(images).expanduser()
            if not d.is_dir():
                raise PosbiasError(f"data source {self.name}: image folder {images} does not exist; pass the COCO val2014 folder after ':'")
            return d
        for d in (qdir / "val2014", qdir / "images", qdir, qdir.parent / "val2014"):
            if d.is_dir() and any(p.suffix.lower() in (".jpg", ".jpeg", ".png") for p in d.iterdir()):
                return d
        raise PosbiasError(
            f"data source {self.name}:{self.path}: no COCO val2014 image folder found next to the question files; "
            f"pass it as {self.name}:QUESTIONS:IMAGES"
        )

    def _index_jsonl(self, files: list[Path]) -> list[_Record]:
        assert self.images is not None
        out: list[_Record] = []
        for f in files:
            variant = _variant(f.stem)
            try:
                lines = f.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                out.append(_Record(f"{variant}/file", variant, bad=one_line(f"cannot read {f}: {exc}"), origin=f.name))
                continue
            for li, line in enumerate(lines):
                if not line.strip():
                    continue
                key = f"{variant}/line{li + 1}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    out.append(_Record(key, variant, bad=f"line {li + 1} of {f} is not JSON ({exc.msg})", origin=f.name))
                    continue
                if not isinstance(obj, dict):
                    out.append(_Record(key, variant, bad=f"line {li + 1} of {f} is not a JSON object", origin=f.name))
                    continue
                missing = [k for k in ("question_id", "image", "text", "label") if obj.get(k) in (None, "")]
                if "question_id" not in missing:
                    key = f"{variant}/{obj['question_id']}"
                if missing:
                    out.append(_Record(key, variant, bad=f"line {li + 1} of {f} lacks {missing}", origin=f.name))
                    continue
                label = _label(obj["label"])
                bad = None if label else f"line {li + 1} of {f}: label {one_line(str(obj['label']), 40)!r} is not yes/no"
                out.append(_Record(key, variant, str(obj["text"]).strip(), label, image=self.images / str(obj["image"]), bad=bad,
                                   origin=f.name))
        return drop_repeats(out, [r.origin for r in out], _same, f"data source {self.name}:{self.path}")

    # -- SampleSource

    def load(self, index: int) -> Sample:
        rec, sid = self._usable(index)
        image = self._record_image(rec, sid)
        return Sample(id=sid, source=self.name, image=image, question=str(rec.question), answer=rec.answer,
                      meta={"variant": rec.variant, "layout": self.layout})
