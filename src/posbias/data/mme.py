"""MME (yes/no perception and cognition benchmark) from a local copy, in either of its two layouts.

* **lmms-eval parquet** (the ``lmms-lab/MME`` dataset): ``.parquet`` files (a file, or a folder searched
  recursively) with columns ``question_id`` (e.g. ``"code_reasoning/0020.png"``), ``image`` (struct with
  ``bytes``/``path``, or binary), ``question``, ``answer`` (``"Yes"``/``"No"``), ``category``.
* **original release folder** (``MME_Benchmark_release_version/``): one folder per category; either the
  images and a ``<image stem>.txt`` next to each, or ``images/`` plus ``questions_answers_YN/``. Each
  text line is ``question<TAB>answer``; lines ``image<TAB>question<TAB>answer`` are accepted too.

Sample keys are ``<category>/<image file name>#<k>`` (k-th question on that image, 0-based) in both
layouts, so the same question has the same id whichever copy it came from. Records that cannot be used
(undecodable image, missing image, a malformed line, an answer that is not yes/no) stay in the index and
raise :class:`~posbias.data.base.BadSample` with the reason when loaded; the profiler counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posbias.data.base import Sample
from posbias.data.files import IMAGE_SUFFIXES, ParquetRows, RecordSource, one_line
from posbias.errors import PosbiasError

__all__ = ["MMESource", "MME_LAYOUTS"]

MME_LAYOUTS = (
    "lmms-eval parquet (.parquet file or folder; columns question_id, image, question, answer, category)",
    "original release folder (per-category folders of images + '<image>.txt' files of 'question<TAB>answer' lines, "
    "or images/ + questions_answers_YN/)",
)


@dataclass(frozen=True)
class _Record:
    key: str
    category: str
    question: str | None = None
    answer: str | None = None
    image: Path | None = None  # folder layout
    row: int | None = None  # parquet layout
    bad: str | None = None  # reason, for a record that cannot be used


def _norm_answer(answer: Any) -> str | None:
    a = str(answer).strip() if answer is not None else ""
    return {"yes": "Yes", "no": "No"}.get(a.lower())


class MMESource(RecordSource):
    """MME questions from a local copy (see the module docstring for the layouts).

    Parameters
    ----------
    path : str or Path
        A parquet file, a folder of parquet files, or the release folder.
    name : str
        Source name (prefix of the sample ids).
    """

    def __init__(self, path: str | Path, *, name: str = "mme") -> None:
        files = self._open_path(path, name, "MME", MME_LAYOUTS)
        if files:
            self.layout = "parquet"
            self._records = self._index_parquet(files)
        else:
            cats = self._category_dirs(self.path)
            if not cats:
                raise PosbiasError(
                    f"data source {name}:{path} matches no MME layout; accepted layouts: {'; '.join(MME_LAYOUTS)}"
                )
            self.layout = "folder"
            self._records = self._index_folder(cats)

    @classmethod
    def from_spec(cls, arg: str | None) -> MMESource:
        """Factory for ``--data mme:PATH``."""
        if not arg:
            raise PosbiasError(f"data source mme needs a path: mme:PATH ({'; or '.join(MME_LAYOUTS)})")
        return cls(arg)

    # -- indexing

    def _index_parquet(self, files: list[Path]) -> list[_Record]:
        rows = ParquetRows(
            files,
            columns=["question_id", "question", "answer", "category"],
            required=["question_id", "image", "question", "answer", "category"],
            image_column="image",
            layout="lmms-eval MME parquet",
        )
        self._rows = rows
        out: list[_Record] = []
        seen: dict[str, int] = {}
        c = rows.columns
        for i in range(len(rows)):
            qid, cat = c["question_id"][i], c["category"][i]
            image_name = Path(str(qid)).name if qid else f"row{i}"
            cat_s = str(cat).strip() if cat else "unknown"
            base = f"{cat_s}/{image_name}"
            k = seen.get(base, 0)
            seen[base] = k + 1
            key = f"{base}#{k}"
            question, answer = c["question"][i], c["answer"][i]
            bad = None
            if not qid or not cat:
                bad = f"parquet row {i}: question_id or category is empty"
            elif not question or not str(question).strip():
                bad = f"parquet row {i}: empty question"
            elif _norm_answer(answer) is None:
                bad = f"parquet row {i}: answer {one_line(str(answer), 40)!r} is not Yes/No"
            out.append(_Record(key, cat_s, question and str(question).strip(), _norm_answer(answer), row=i, bad=bad))
        return out

    @staticmethod
    def _category_dirs(path: Path) -> list[Path]:
        """Category folders: subfolders holding .txt files (directly or in questions_answers_YN/)."""
        if not path.is_dir():
            return []

        def is_cat(d: Path) -> bool:
            return d.is_dir() and (any(d.glob("*.txt")) or (d / "questions_answers_YN").is_dir())

        cats = sorted(d for d in path.iterdir() if is_cat(d))
        if not cats:  # the parent of the release folder
            subs = [d for d in path.iterdir() if d.is_dir()]
            if len(subs) == 1:
                cats = sorted(d for d in subs[0].iterdir() if is_cat(d))
        return cats

    def _index_folder(self, cats: list[Path]) -> list[_Record]:
        out: list[_Record] = []
        for cat_dir in cats:
            cat = cat_dir.name
            if (cat_dir / "questions_answers_YN").is_dir():
                txt_dir, img_dir = cat_dir / "questions_answers_YN", cat_dir / "images"
            else:
                txt_dir = img_dir = cat_dir
            images = {p.stem: p for p in sorted(img_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES} if img_dir.is_dir() else {}
            seen: dict[str, int] = {}
            for txt in sorted(txt_dir.glob("*.txt")):
                try:
                    lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
                except (OSError, UnicodeDecodeError) as exc:
                    out.append(_Record(f"{cat}/{txt.name}#file", cat, bad=one_line(f"cannot read {txt}: {exc}")))
                    continue
                if not lines:
                    out.append(_Record(f"{cat}/{txt.name}#file", cat, bad=f"answer file {txt} is empty"))
                    continue
                for li, line in enumerate(lines):
                    fields = [f.strip() for f in line.split("\t")]
                    if len(fields) == 2:
                        image = images.get(txt.stem)
                        image_name = image.name if image else txt.stem
                        question, answer = fields
                    elif len(fields) == 3:
                        image_name, question, answer = fields
                        image = img_dir / image_name
                    else:
                        out.append(_Record(
                            f"{cat}/{txt.stem}#line{li}", cat,
                            bad=f"line {li + 1} of {txt} has {len(fields)} tab-separated fields; expected question<TAB>answer",
                        ))
                        continue
                    base = f"{cat}/{image_name}"
                    k = seen.get(base, 0)
                    seen[base] = k + 1
                    bad = None
                    if image is None:
                        bad = f"no image named {txt.stem}.* next to {txt}"
                    elif not question:
                        bad = f"line {li + 1} of {txt}: empty question"
                    elif _norm_answer(answer) is None:
                        bad = f"line {li + 1} of {txt}: answer {one_line(answer, 40)!r} is not Yes/No"
                    out.append(_Record(f"{base}#{k}", cat, question, _norm_answer(answer), image=image, bad=bad))
        return out

    # -- SampleSource

    def load(self, index: int) -> Sample:
        rec, sid = self._usable(index)
        image = self._record_image(rec, sid)
        return Sample(
            id=sid,
            source=self.name,
            image=image,
            question=str(rec.question),
            answer=rec.answer,
            meta={"category": rec.category, "layout": self.layout},
        )
