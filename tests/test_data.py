"""Tests of the embedded sample source and the source registry (posbias.data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from posbias.data import (
    BadSample,
    EmbeddedSource,
    Sample,
    SampleSource,
    get_source,
    iter_samples,
    known_sources,
    plan_samples,
    register_source,
    resolve_sources,
)
from posbias.data.embedded import PHOTOS, EmbeddedRecord, Photo, load_photo
from posbias.data.registry import _REGISTRY
from posbias.errors import PosbiasError


class ListSource(SampleSource):
    """A tiny in-memory source (for plan tests; images are not needed)."""

    def __init__(self, name: str, n: int) -> None:
        self.name = name
        self.n = n

    def __len__(self) -> int:
        return self.n

    def key(self, index: int) -> str:
        return f"r{index}"

    def load(self, index: int) -> Sample:
        return Sample(id=self.sample_id(index), source=self.name, image=None, question=f"q{index}")


class MissingFileSource(EmbeddedSource):
    """The embedded source plus one record whose photo file does not exist."""

    photos = (*PHOTOS, Photo("ghost", "file:/nonexistent/posbias/ghost.jpg", "a file that is not there"))
    records = (
        EmbeddedRecord("chelsea", "pope", "cat", "Is there a cat in the image?", "yes"),
        EmbeddedRecord("ghost", "pope", "ghost", "Is there a ghost in the image?", "no"),
        EmbeddedRecord("ghost", "open", "what", "What is this?", None),
        EmbeddedRecord("coffee", "open", "blank", "   ", None),
    )


@pytest.fixture(scope="module")
def embedded() -> EmbeddedSource:
    return EmbeddedSource()


def test_embedded_size_keys_and_questions(embedded: EmbeddedSource) -> None:
    photos = {r.photo for r in embedded.records}
    assert len(photos) >= 12 and len(embedded) >= 80
    keys = [embedded.key(i) for i in range(len(embedded))]
    assert len(set(keys)) == len(keys)
    assert "chelsea/pope-cat" in keys and embedded.sample_id(keys.index("chelsea/pope-cat")) == "embedded:chelsea/pope-cat"
    for photo in photos:
        recs = [r for r in embedded.records if r.photo == photo]
        assert len(recs) >= 6, photo
    pope = [r for r in embedded.records if r.kind == "pope"]
    assert {r.answer for r in pope} == {"yes", "no"}
    assert all(r.question.startswith("Is there ") and r.question.endswith(" in the image?") for r in pope)
    mme = [r for r in embedded.records if r.kind == "mme"]
    assert mme and all(r.question.endswith("Please answer yes or no.") and r.answer in ("yes", "no") for r in mme)
    assert sum(r.answer is not None for r in embedded.records) >= 80
    # fixed order: a new instance has the same keys
    assert [EmbeddedSource().key(i) for i in range(len(embedded))] == keys


def test_every_record_loads_rgb(embedded: EmbeddedSource) -> None:
    sizes = set()
    for i in range(len(embedded)):
        s = embedded.load(i)
        assert isinstance(s, Sample)
        assert s.id == embedded.sample_id(i) and s.source == "embedded"
        assert s.image.mode == "RGB" and min(s.image.size) >= 100
        assert s.question.strip()
        assert s.meta["photo"] == embedded.records[i].photo
        sizes.add(s.image.size)
    assert len(sizes) >= 6  # real photos of different sizes, not one placeholder
    # images are cached per photo and each load hands out a copy
    a, b = embedded.load(0), embedded.load(1)
    assert embedded.records[0].photo == embedded.records[1].photo
    assert a.image is not b.image and np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_grayscale_photo_becomes_rgb() -> None:
    im = load_photo("skimage:camera")
    arr = np.asarray(im)  # (H, W, 3) uint8
    assert arr.shape[2] == 3 and np.array_equal(arr[..., 0], arr[..., 2])
    assert np.asarray(load_photo("skimage:stereo_motorcycle#0")).shape[2] == 3


def test_bad_records_raise_badsample_with_reason() -> None:
    src = MissingFileSource()
    assert src.load(0).image.mode == "RGB"
    with pytest.raises(BadSample) as ei:
        src.load(1)
    assert ei.value.sample_id == "embedded:ghost/pope-ghost"
    assert "ghost.jpg" in ei.value.reason and "FileNotFoundError" in ei.value.reason
    with pytest.raises(BadSample, match="ghost"):  # the failure is remembered for the photo's other records
        src.load(2)
    with pytest.raises(BadSample, match="empty question"):
        src.load(3)
    items = list(iter_samples([src], n=None, seed=0))
    assert len(items) == 4
    bad = sorted(b.sample_id for b in items if isinstance(b, BadSample))
    assert bad == ["embedded:coffee/open-blank", "embedded:ghost/open-what", "embedded:ghost/pope-ghost"]
    assert all(b.reason for b in items if isinstance(b, BadSample))


def test_iter_samples_deterministic(embedded: EmbeddedSource) -> None:
    a = iter_samples(["embedded"], n=10, seed=1)
    b = iter_samples([EmbeddedSource()], n=10, seed=1)
    c = iter_samples("embedded", n=10, seed=2)
    assert len(a) == 10 and a.ids == b.ids
    assert a.ids != c.ids
    assert len(set(a.ids)) == 10
    loaded = list(a)
    assert [s.id for s in loaded] == a.ids and all(isinstance(s, Sample) for s in loaded)
    assert [s.id for s in a] == a.ids  # re-iterable, same order
    # a larger n extends a smaller one
    assert iter_samples("embedded", n=20, seed=1).ids[:10] == a.ids


def test_n_larger_than_source(embedded: EmbeddedSource) -> None:
    all_ids = {embedded.sample_id(i) for i in range(len(embedded))}
    stream = iter_samples("embedded", n=10_000, seed=0)
    assert len(stream) == len(embedded) and set(stream.ids) == all_ids
    assert stream.ids != sorted(stream.ids)  # shuffled, not record order
    assert len(iter_samples("embedded", n=None, seed=0)) == len(embedded)
    assert len(iter_samples("embedded", n=0, seed=0)) == 0
    with pytest.raises(PosbiasError, match=">= 0"):
        iter_samples("embedded", n=-1, seed=0)


def test_plan_over_several_sources_and_quotas() -> None:
    a, b = ListSource("a", 5), ListSource("b", 50)
    plan = plan_samples([a, b], 30, seed=4)
    ids = [s.sample_id(i) for s, i in plan]
    assert len(ids) == 30 and len(set(ids)) == 30
    assert ids == [s.sample_id(i) for s, i in plan_samples([a, b], 30, seed=4)]
    everything = [s.sample_id(i) for s, i in plan_samples([a, b], None, seed=4)]
    assert sorted(everything) == sorted([f"a:r{i}" for i in range(5)] + [f"b:r{i}" for i in range(50)])
    # quotas: exact per-source counts, independent of source order
    q = plan_samples([a, b], None, seed=4, quotas=[3, 7])
    assert sum(s is a for s, _ in q) == 3 and sum(s is b for s, _ in q) == 7
    q_rev = plan_samples([b, a], None, seed=4, quotas=[7, 3])
    assert {s.sample_id(i) for s, i in q} == {s.sample_id(i) for s, i in q_rev}
    assert len(plan_samples([a, b], 4, seed=4, quotas=[3, None])) == 4
    with pytest.raises(PosbiasError, match="one quota per data source"):
        plan_samples([a, b], None, seed=0, quotas=[1])
    with pytest.raises(PosbiasError, match="more than once"):
        plan_samples([a, ListSource("a", 2)], None, seed=0)


def test_unknown_source_and_spec_errors() -> None:
    assert "embedded" in known_sources()
    with pytest.raises(PosbiasError, match="unknown sample source 'nosuch'; known sources: .*embedded"):
        get_source("nosuch")
    with pytest.raises(PosbiasError, match="unknown sample source 'mmx'"):
        get_source("mmx:/data/MME")
    with pytest.raises(PosbiasError, match="takes no path"):
        get_source("embedded:/tmp/x")
    with pytest.raises(PosbiasError, match="no sample source"):
        resolve_sources([])
    assert isinstance(get_source("embedded"), EmbeddedSource)


def test_registered_factory_gets_path_lazily(tmp_path: Path) -> None:
    calls: list[str | None] = []

    def factory(arg: str | None) -> SampleSource:
        calls.append(arg)
        return ListSource("folder", 3)

    register_source("folder", factory)
    try:
        with pytest.raises(PosbiasError, match="already registered"):
            register_source("folder", factory)
        src = get_source(f"folder:{tmp_path}")
        assert calls == [str(tmp_path)] and len(src) == 3
        # string factories are imported on first use only; a broken one is a one-line user error
        register_source("broken", "posbias.data.no_such_module:Factory")
        with pytest.raises(PosbiasError, match="source 'broken' cannot be loaded"):
            get_source("broken:/x")
    finally:
        _REGISTRY.pop("folder", None)
        _REGISTRY.pop("broken", None)
