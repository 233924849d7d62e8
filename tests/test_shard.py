"""Sharded runs: ``torchrun --nproc-per-node 2 -m posbias.cli profile`` (gloo, CPU) and ``profile-bias merge``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from posbias.cli import main
from posbias.errors import PosbiasError
from posbias.models.base import VisualLayout
from posbias.profiler.store import ProfileStore, ProfileStoreWriter, merge_stores
from posbias.profiler.run import dist_info, shard_items


def _assert_same_content(a: ProfileStore, b: ProfileStore) -> None:
    """Equal stores, sample order aside."""
    assert sorted(a.sample_ids) == sorted(b.sample_ids)
    assert sorted(a.skipped()) == sorted(b.skipped())
    for key in ("model_fingerprint", "adapter", "n_layers", "rope_dims", "seed", "n_requested", "data"):
        assert a.attrs.get(key) == b.attrs.get(key), key
    where = {sid: k for k, sid in enumerate(b.sample_ids)}
    for k, sid in enumerate(a.sample_ids):
        j = where[sid]
        np.testing.assert_allclose(a.sample_attn(k), b.sample_attn(j), rtol=1e-5, atol=1e-7)
        assert (a.questions[k], a.answers[k], a.sources[k]) == (b.questions[j], b.answers[j], b.sources[j])
        np.testing.assert_array_equal(a.grids[k], b.grids[j])
        np.testing.assert_array_equal(a.positions[a.sample_slice(k)], b.positions[b.sample_slice(j)])


def test_shard_items_partition() -> None:
    items = list(range(11))
    shards = [shard_items(items, r, 3) for r in range(3)]
    assert sorted(x for s in shards for x in s) == items and [len(s) for s in shards] == [4, 4, 3]
    assert dist_info({}).world_size == 1
    assert dist_info({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).rank == 1
    with pytest.raises(PosbiasError, match="outside WORLD_SIZE"):
        dist_info({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.mark.slow
def test_torchrun_two_ranks_equals_single_process(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    out = tmp_path / "dist"
    args = ["profile", "--model", "tiny-llava", "--n-samples", "7", "--seed", "2", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [*cmd, "--nproc-per-node", "2", "--master-port", "29533", "-m", "posbias.cli", *args, "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "merged 2 store(s): 7 samples" in res.stdout
    assert not (out / "shards").exists()
    single = tmp_path / "single"
    assert main([*args, "--out", str(single)]) == 0
    with ProfileStore(out / "profile.h5") as a, ProfileStore(single / "profile.h5") as b:
        assert a.complete and not any(k.startswith("shard_") for k in a.attrs)
        _assert_same_content(a, b)
        assert a.sample_ids == b.sample_ids  # merged in plan order


def _layout(v: int) -> VisualLayout:
    idx = np.arange(v)
    return VisualLayout(visual_index=idx + 1, rows=idx // v, cols=idx % v, grid=(1, v),
                        position_ids=(idx + 1)[:, None], seq_len=v + 3)


def _shard(path: Path, ids: list[int], seed: int = 0, skip: tuple[int, ...] = (), finish: bool = True) -> None:
    attrs = {"model_id": "m", "model_fingerprint": "sha256:11", "adapter": "llava", "seed": seed, "shard_rank": ids[0]}
    w = ProfileStoreWriter(path, n_layers=3, rope_dims=1, attrs=attrs)
    w.set_static("grid_mask", np.arange(4))
    for i in ids:
        if i in skip:
            w.skip(sample_id=f"s:{i}", source="s", reason="bad image")
            continue
        v = 2 + i % 3
        w.append(sample_id=f"s:{i}", source="s", question=f"q{i}", answer=None, layout=_layout(v),
                 attn=np.full((v, 3), i, np.float32), token_data={"imp": np.arange(v, dtype=np.float32) + i},
                 sample_data={"score": np.float64(i)})
    if finish:
        w.close()
    else:
        w.commit()
        w._unlock()  # left as a killed process leaves it: segments only
        w._closed = True  # no compaction at garbage collection either


def test_merge_by_hand_including_an_interrupted_shard(tmp_path: Path, capsys) -> None:
    shards = tmp_path / "shards"
    _shard(shards / "rank000.h5", [0, 2, 4, 6], skip=(4,))
    _shard(shards / "rank001.h5", [1, 3, 5], finish=False)
    assert main(["merge", str(shards), "--out", str(tmp_path / "out")]) == 0
    assert "merged 2 store(s): 6 samples, 1 skipped" in capsys.readouterr().out
    with ProfileStore(tmp_path / "out" / "profile.h5") as st:
        assert sorted(st.sample_ids) == [f"s:{i}" for i in (0, 1, 2, 3, 5, 6)]
        assert st.skipped() == [("s:4", "s", "bad image")]
        assert not st.complete  # one input was an interrupted run
        for k, sid in enumerate(st.sample_ids):
            i = int(sid[2:])
            np.testing.assert_array_equal(st.sample_attn(k), np.full((2 + i % 3, 3), i, np.float32))
            np.testing.assert_array_equal(st.sample_token_data("imp", k), np.arange(2 + i % 3) + i)
        np.testing.assert_array_equal(st.sample_data("score"), [int(s[2:]) for s in st.sample_ids])
        np.testing.assert_array_equal(st.static("grid_mask"), np.arange(4))
        assert "shard_rank" not in st.attrs
    # ordered merge, overlap refused unless dedupe, other seed refused
    ordered = merge_stores([shards / "rank001.h5", shards / "rank000.h5"], tmp_path / "o.h5",
                           order=[f"s:{i}" for i in range(7)])
    with ProfileStore(ordered) as st:
        assert st.sample_ids == [f"s:{i}" for i in (0, 1, 2, 3, 5, 6)]
    with pytest.raises(PosbiasError, match="is in both"):
        merge_stores([shards / "rank000.h5", tmp_path / "o.h5"], tmp_path / "x.h5")
    merge_stores([shards / "rank000.h5", tmp_path / "o.h5"], tmp_path / "x.h5", dedupe=True)
    with ProfileStore(tmp_path / "x.h5") as st:
        assert st.n_samples == 6 and len(set(st.sample_ids)) == 6
    _shard(tmp_path / "other.h5", [9], seed=5)
    with pytest.raises(PosbiasError, match="seed"):
        merge_stores([shards / "rank000.h5", tmp_path / "other.h5"], tmp_path / "y.h5")
    assert main(["merge", str(tmp_path / "nothing"), "--out", str(tmp_path / "z")]) == 2
