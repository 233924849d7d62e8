"""Every reader of a store goes through ProfileStore: the density fit and the report's optional datasets see
the committed segments of an interrupted run like the samples of a compacted file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from posbias.cli import main
from posbias.fitters.density import read_region_density
from posbias.models.base import VisualLayout
from posbias.profiler.store import ProfileStore, ProfileStoreWriter, parts_dir
from posbias.reports.data import read_optional

S, L, G = 12, 6, 6  # samples, decoder layers, grid side


def _interrupted_and_finished(tmp_path: Path) -> tuple[Path, Path]:
    """The same 12 samples as a finished store and as the segments a kill before close() leaves."""
    path = tmp_path / "run" / "profile.h5"
    rng = np.random.default_rng(0)
    edge = np.ones((3, 3), bool)
    edge[1, 1] = False
    attrs = {"model_id": "synthetic", "model_fingerprint": "sha256:" + "0" * 16, "adapter": "llava", "seed": 0}
    w = ProfileStoreWriter(path, n_layers=L, rope_dims=1, attrs=attrs)
    w.set_static("samples/region_is_edge", edge)
    idx = np.arange(G * G)
    layout = VisualLayout(visual_index=5 + idx, rows=idx // G, cols=idx % G, grid=(G, G),
                          position_ids=(5 + idx)[:, None], seq_len=5 + G * G + 10)
    for s in range(S):
        attn = (0.01 + 0.001 * idx[:, None] / idx.size + rng.random((idx.size, L)) * 0.001).astype(np.float32)
        logdet = rng.normal(0, 1, (3, 3)).astype(np.float32)
        logdet[1, 1] += 3
        w.append(sample_id=f"embedded:{s}", source="embedded", question="q", answer="a", layout=layout, attn=attn,
                 token_data={"vision_importance": rng.random(idx.size).astype(np.float32)},
                 sample_data={"region_logdet": logdet})
    killed = tmp_path / "killed" / "profile.h5"
    shutil.copytree(parts_dir(path), parts_dir(killed))  # no profile.h5 yet: every sample is in a segment
    w.close()
    return killed, path


def test_density_fit_sees_every_sample_of_an_interrupted_store(tmp_path: Path) -> None:
    killed, finished = _interrupted_and_finished(tmp_path)
    assert not killed.exists()
    with ProfileStore(killed) as st:
        assert st.pending_segments > S and st.n_samples == S
    got, edge = read_region_density(killed)
    want, want_edge = read_region_density(finished)
    assert got.shape == (S, 3, 3)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(edge, want_edge)
    docs = []
    for store in (killed, finished):
        out = store.parent / "cal.json"
        assert main(["fit", "--store", str(store), "--out", str(out)]) == 0
        docs.append(json.loads(out.read_text(encoding="utf-8")))
    density = [d["statistics"]["density"] for d in docs]
    assert density[0]["status"] == "evaluated" and density[0]["n_samples"] == S
    assert density[0] == density[1]


def test_report_optional_datasets_read_segments(tmp_path: Path) -> None:
    killed, finished = _interrupted_and_finished(tmp_path)
    with ProfileStore(killed) as a, ProfileStore(finished) as b:
        for group, name in (("tokens", "vision_importance"), ("samples", "region_logdet"), ("samples", "region_is_edge")):
            got = read_optional(a, group, name)
            assert got is not None
            np.testing.assert_array_equal(got, read_optional(b, group, name))
        assert read_optional(a, "tokens", "vision_importance").shape == (S * G * G,)
        assert read_optional(a, "samples", "region_is_edge").shape == (3, 3)
        assert read_optional(a, "tokens", "attn_pa") is None
