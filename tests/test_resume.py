"""Crash safety: SIGKILL at random moments, then open, check exactly-once, resume to the full set.

Two levels: the store writer in a tight loop (many kills, fast), and a real ``profile-bias profile
--model tiny-llava`` run killed while profiling (slow: each process loads torch and the model).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from posbias.profiler.store import ProfileStore, parts_dir, store_exists

N_SAMPLES = 60
L = 6

_WRITER_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from posbias.models.base import VisualLayout
    from posbias.profiler.store import ProfileStoreWriter, store_exists

    path, n, L = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    def sample(i):
        rng = np.random.default_rng(i)
        r, c = 8 + i % 3, 9
        v = r * c
        idx = np.arange(v)
        lay = VisualLayout(visual_index=5 + idx, rows=idx // c, cols=idx % c, grid=(r, c),
                           position_ids=(5 + idx)[:, None], seq_len=5 + v + 7)
        attn = rng.random((v, L), dtype=np.float32)           # (V, L)
        pa = rng.random((v, L), dtype=np.float32)             # (V, L)
        logdet = rng.normal(size=(3, 3))                      # (3, 3)
        return lay, attn, pa, logdet

    attrs = {"model_id": "m", "model_fingerprint": "sha256:00", "adapter": "llava", "seed": 1}
    resume = store_exists(path)
    w = ProfileStoreWriter(path, n_layers=L, rope_dims=1, attrs=attrs, resume=resume)
    if not resume:
        w.set_static("samples/region_is_edge", np.eye(3, dtype=bool))
    done = w.done_ids
    for i in range(n):
        sid = f"s:{i:03d}"
        if sid in done:
            continue
        if i % 7 == 3:
            w.skip(sample_id=sid, source="s", reason=f"unreadable image {i}")
        else:
            lay, attn, pa, logdet = sample(i)
            w.append(sample_id=sid, source="s", question=f"q{i}", answer="yes", layout=lay, attn=attn,
                     token_data={"attn_pa": pa}, sample_data={"region_logdet": logdet})
        print("committed", sid, flush=True)
    w.close()
    print("closed", flush=True)
    """
)


class _Reader(threading.Thread):
    """Collects the ``committed <id>`` lines a child prints, as they arrive."""

    def __init__(self, proc: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.lines: list[str] = []
        self.first = threading.Event()

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())
            if line.startswith(("committed", "closed")):
                self.first.set()
        self.first.set()  # the child ended (e.g. nothing was left to profile)

    def wait_count(self, k: int, timeout: float) -> None:
        """Until ``k`` more lines were committed, or the child ended."""
        end = time.monotonic() + timeout
        while len(self.committed()) < k and self.proc.poll() is None and time.monotonic() < end:
            time.sleep(0.002)

    def committed(self) -> list[str]:
        return [ln.split(" ", 1)[1] for ln in list(self.lines) if ln.startswith("committed ")]


def _check_snapshot(path: Path, committed: list[str], plan: list[str], signals: bool = True) -> list[str]:
    """The store opens, holds every committed id exactly once, and nothing outside the plan."""
    if not store_exists(path):
        assert not committed
        return []
    with ProfileStore(path) as st:
        ids = st.sample_ids + [row[0] for row in st.skipped()]
        assert len(ids) == len(set(ids)), "an id is stored twice"
        assert set(committed) <= set(ids), f"lost committed samples: {sorted(set(committed) - set(ids))[:5]}"
        assert set(ids) <= set(plan)
        assert st.n_tokens == int(st.n_visual.sum()) and st.all_layers().shape == (st.n_tokens, st.n_layers)
        if st.n_samples and signals:
            assert st.token_data("attn_pa").shape == (st.n_tokens, L)
            assert st.sample_data("region_logdet").shape == (st.n_samples, 3, 3)
        return ids


def _expected(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    v = (8 + i % 3) * 9
    return rng.random((v, L), dtype=np.float32), rng.random((v, L), dtype=np.float32), rng.normal(size=(3, 3))


def test_writer_sigkill_at_random_moments_then_resume(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(_WRITER_CHILD)
    path = tmp_path / "run" / "profile.h5"
    plan = [f"s:{i:03d}" for i in range(N_SAMPLES)]
    rnd = random.Random(1234)
    kills = 0
    for attempt in range(12):
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(N_SAMPLES), str(L)],
                                stdout=subprocess.PIPE, text=True)
        reader = _Reader(proc)
        reader.start()
        if attempt < 8:
            # a random moment after a random number of commits: mid-forward, mid-write, mid-rename, ...
            reader.wait_count(rnd.randint(1, 8), timeout=60)
            time.sleep(rnd.uniform(0.0, 0.02))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        proc.wait(timeout=120)
        reader.join(timeout=10)
        ids = _check_snapshot(path, reader.committed(), plan)
        if proc.returncode == 0:
            assert "closed" in reader.lines
            break
        assert proc.returncode == -signal.SIGKILL  # possibly during the final compaction: all ids there
    else:
        pytest.fail("the resumed writer never finished")
    assert kills >= 3
    with ProfileStore(path) as st:
        assert st.complete and st.pending_segments == 0 and not parts_dir(path).exists()
        assert sorted(st.sample_ids + [r[0] for r in st.skipped()]) == plan
        assert st.sample_ids == [p for i, p in enumerate(plan) if i % 7 != 3]  # plan order kept across resumes
        assert [r[2] for r in st.skipped()] == [f"unreadable image {i}" for i in range(N_SAMPLES) if i % 7 == 3]
        np.testing.assert_array_equal(st.static("samples/region_is_edge"), np.eye(3, dtype=bool))
        for k, sid in enumerate(st.sample_ids):
            attn, pa, logdet = _expected(int(sid[2:]))
            np.testing.assert_array_equal(st.sample_attn(k), attn)
            np.testing.assert_array_equal(st.sample_token_data("attn_pa", k), pa)
            np.testing.assert_array_equal(st.sample_data("region_logdet")[k], logdet)


# ------------------------------------------------------------------------------- a real profiling run

_N_REAL = 8


def _profile_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "posbias.cli", "profile", "--model", "tiny-llava", "--n", str(_N_REAL),
            "--seed", "3", "--out", str(out), "--no-progress", "-v", *extra]


@pytest.mark.slow
def test_real_profile_run_killed_and_resumed_equals_uninterrupted(tmp_path: Path, tiny_llava_adapter) -> None:
    from posbias.data import iter_samples
    from posbias.profiler.run import profile_samples

    out = tmp_path / "run"
    path = out / "profile.h5"
    plan = iter_samples(["embedded"], n=_N_REAL, seed=3)
    rnd = random.Random(7)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    seen_kill_with_samples = False
    for attempt in range(6):
        extra = ("--resume",) if attempt else ()
        proc = subprocess.Popen(_profile_cmd(out, *extra), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env=env)
        reader = _Reader(proc)
        reader.start()
        if attempt < 2:
            reader.first.wait(timeout=180)
            time.sleep(rnd.uniform(0.0, 1.0))  # somewhere inside the next forward or its commit
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=300)
        reader.join(timeout=10)
        ids = _check_snapshot(path, reader.committed(), plan.ids, signals=False)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL
        seen_kill_with_samples |= bool(ids)
    else:
        pytest.fail("the resumed profile run never finished")
    assert seen_kill_with_samples
    # the same samples profiled without interruption, in this process (same tiny-llava weights)
    ref_path = tmp_path / "ref.h5"
    profile_samples(tiny_llava_adapter, plan, ref_path, seed=3, progress=False)
    with ProfileStore(path) as got, ProfileStore(ref_path) as ref:
        assert got.complete and got.n_samples == ref.n_samples == _N_REAL
        assert sorted(got.sample_ids) == sorted(ref.sample_ids) == sorted(plan.ids)
        order = {sid: k for k, sid in enumerate(ref.sample_ids)}
        for k, sid in enumerate(got.sample_ids):
            j = order[sid]
            np.testing.assert_allclose(got.sample_attn(k), ref.sample_attn(j), rtol=1e-5, atol=1e-7)
            assert got.questions[k] == ref.questions[j] and got.answers[k] == ref.answers[j]
            np.testing.assert_array_equal(got.positions[got.sample_slice(k)], ref.positions[ref.sample_slice(j)])
        assert got.attrs["model_fingerprint"] == ref.attrs["model_fingerprint"]


def test_resume_refuses_another_model_or_seed(tmp_path: Path) -> None:
    from posbias.errors import PosbiasError
    from posbias.models.base import VisualLayout
    from posbias.profiler.store import ProfileStoreWriter

    attrs = {"model_id": "m", "model_fingerprint": "sha256:aa", "adapter": "llava", "seed": 1}
    lay = VisualLayout(visual_index=np.arange(2, 6), rows=np.array([0, 0, 1, 1]), cols=np.array([0, 1, 0, 1]),
                       grid=(2, 2), position_ids=np.arange(2, 6)[:, None], seq_len=9)
    p = tmp_path / "p.h5"
    w = ProfileStoreWriter(p, n_layers=2, rope_dims=1, attrs=attrs)
    w.append(sample_id="s:0", source="s", question="q", answer=None, layout=lay, attn=np.ones((4, 2), np.float32))
    w.commit()
    with pytest.raises(PosbiasError, match="being written by another process"):
        ProfileStoreWriter(p, n_layers=2, rope_dims=1, attrs=attrs, resume=True)
    w._unlock()  # as if the writer process had died: its segments stay, its lock goes
    w._closed = True
    with pytest.raises(PosbiasError, match="it was written with seed=1, this run has seed=2"):
        ProfileStoreWriter(p, n_layers=2, rope_dims=1, attrs={**attrs, "seed": 2}, resume=True)
    with pytest.raises(PosbiasError, match="already exists; pass overwrite=True"):
        ProfileStoreWriter(p, n_layers=2, rope_dims=1, attrs=attrs)
    with pytest.raises(PosbiasError, match="nothing to resume"):
        ProfileStoreWriter(tmp_path / "none.h5", n_layers=2, rope_dims=1, attrs=attrs, resume=True)
    with ProfileStoreWriter(p, n_layers=2, rope_dims=1, attrs={**attrs, "n_requested": 5}, resume=True) as w2:
        assert w2.done_ids == {"s:0"}
        w2.append(sample_id="s:1", source="s", question="q", answer="no", layout=lay, attn=np.zeros((4, 2), np.float32))
    with ProfileStore(p) as st:
        assert st.sample_ids == ["s:0", "s:1"] and st.attrs["n_requested"] == 5 and st.complete
