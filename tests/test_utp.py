"""UTP retention schedules: exact HiGHS ILP vs enumeration, budgets, runtime masks, info-loss fast path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from posbias.errors import PosbiasError
from posbias.solvers.utp import (
    UTPSolver,
    iter_schedules,
    retention_budget,
    simulate_loss,
)
from posbias.testing import brute_force


def _instance(seed: int, s: int = 2, v: int = 8, n_layers: int = 5, consistent: bool = False):
    rng = np.random.default_rng(seed)
    if consistent:  # every layer ranks tokens alike, masses differ
        base = rng.gamma(0.7, size=(v, 1))
        mets = [base * rng.uniform(0.9, 1.0, size=(v, n_layers)) ** 0 * rng.uniform(0.5, 1, (1, n_layers))
                for _ in range(s)]
    else:
        mets = [rng.gamma(0.7, size=(v, n_layers)) for _ in range(s)]  # (V, L) each
    ells = rng.uniform(0.1, 1.5, size=(s, n_layers))  # (S, L)
    return mets, ells


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ratio", [1.5, 2.0, 3.0])
def test_tokens_joint_matches_enumeration(seed, ratio):
    mets, ells = _instance(seed)
    budget = retention_budget(8, 5, ratio)
    best, best_val = brute_force(mets, ells, budget)
    solver = UTPSolver(ratio=ratio, formulation="tokens", mode="joint").fit(mets, ells)
    assert solver.status_ == "optimal"
    assert solver.objective_ == pytest.approx(best_val, abs=1e-8)
    assert sum(solver.schedule_[1:]) == budget
    assert all(a >= b for a, b in zip(solver.schedule_, solver.schedule_[1:]))


@pytest.mark.parametrize("seed", [3, 4])
def test_tokens_per_sample_optimal_and_aggregate_within_budget(seed):
    mets, ells = _instance(seed, s=3)
    budget = retention_budget(8, 5, 2.0)
    solver = UTPSolver(ratio=2.0, formulation="tokens", mode="per_sample").fit(mets, ells)
    for k, sched in enumerate(solver.per_sample_):
        _, val = brute_force(mets[k : k + 1], ells[k : k + 1], budget)
        assert simulate_loss(mets[k], ells[k], sched) == pytest.approx(val, abs=1e-8)
    agg = np.asarray(solver.schedule_)
    assert agg[0] == 8 and agg[1:].sum() == budget and np.all(np.diff(agg) <= 0)
    mean = np.asarray(solver.per_sample_)[:, 1:].mean(axis=0)
    # the aggregate is the L1-nearest admissible schedule to the mean
    best_l1 = min(np.abs(s[1:] - mean).sum() for s in iter_schedules(8, 5, budget))
    assert np.abs(agg[1:] - mean).sum() == pytest.approx(best_l1)


@pytest.mark.parametrize("seed", [5, 6])
def test_compact_matches_enumeration_when_rankings_agree(seed):
    mets, ells = _instance(seed, consistent=True)
    budget = retention_budget(8, 5, 2.0)
    _, best_val = brute_force(mets, ells, budget)
    solver = UTPSolver(ratio=2.0).fit(mets, ells)
    assert solver.status_ == "optimal"
    assert solver.objective_ == pytest.approx(best_val, abs=1e-8)
    # the compact objective of its schedule is the progressive loss when rankings agree
    sim = sum(simulate_loss(m, e, solver.schedule_) for m, e in zip(mets, ells))
    assert solver.objective_ == pytest.approx(sim, abs=1e-8)


def test_budget_errors():
    assert retention_budget(576, 32, 4) == 576 * 8 - 576
    with pytest.raises(PosbiasError, match="below 1"):
        retention_budget(576, 32, 0.5)
    with pytest.raises(PosbiasError, match="per layer"):
        retention_budget(8, 5, 4.0)
    with pytest.raises(PosbiasError, match="per layer"):
        UTPSolver(ratio=100.0).fit(*_instance(0))


def test_time_limited_solve_reports_and_respects_budget():
    mets, ells = _instance(7, s=1, v=48, n_layers=8)
    solver = UTPSolver(ratio=3.0, formulation="tokens", time_limit=0.01).fit(mets, ells)
    assert solver.status_ in ("optimal", "time_limit")
    if solver.schedule_ is not None:
        assert sum(solver.schedule_[1:]) == solver.budget_
    d = solver.to_dict()
    assert UTPSolver.from_dict(d).to_dict() == d


def test_runtime_masks_nested_and_match_simulation():
    from posbias.testing import schedule_masks

    mets, ells = _instance(8, s=1)
    sched = [8, 6, 6, 3, 1]
    masks = schedule_masks(torch.as_tensor(mets[0]), sched)  # (L, V)
    assert masks.sum(dim=1).tolist() == sched
    assert bool((masks[1:] <= masks[:-1]).all())
    norm = mets[0] / mets[0].sum(axis=0)
    m = masks.numpy()
    manual = sum(ells[0][i] * norm[m[i - 1] & ~m[i], i].sum() for i in range(1, 5))
    assert manual == pytest.approx(simulate_loss(mets[0], ells[0], sched))


@pytest.mark.parametrize("which", ["tiny_llava_adapter", "tiny_qwen_adapter"])
def test_info_loss_fast_equals_naive(which, request, noise_image):
    from posbias.profiler.utr import info_loss
    from posbias.testing import info_loss_naive

    adapter = request.getfixturevalue(which)
    inputs = adapter.prepare(noise_image, "what is in the picture")
    ell, f, g = info_loss(adapter, inputs, return_features=True)
    ell_n, f_n, g_n = info_loss_naive(adapter, inputs, return_features=True)
    assert ell.shape == (adapter.n_layers,)
    np.testing.assert_allclose(f, f_n, atol=1e-5)
    np.testing.assert_allclose(ell, ell_n, atol=1e-5)
    assert np.all(ell > 1e-3)  # removing the image changes the feature


def test_solve_store_needs_utr_loss(tmp_path):
    from posbias.solvers.store import solve_store
    from posbias.models.base import VisualLayout
    from posbias.profiler.store import ProfileStoreWriter, write_utr_loss

    rng = np.random.default_rng(0)
    path = tmp_path / "p.h5"
    v, n_layers = 16, 4
    lay = VisualLayout(visual_index=np.arange(1, 17), rows=np.arange(16) // 4, cols=np.arange(16) % 4,
                       grid=(4, 4), position_ids=np.arange(1, 17)[:, None], seq_len=20)
    attrs = {"model_id": "x", "model_fingerprint": "sha256:0", "adapter": "llava", "seed": 0}
    with ProfileStoreWriter(path, n_layers=n_layers, rope_dims=1, attrs=attrs) as w:
        for k in range(3):
            w.append(sample_id=f"s:{k}", source="s", question="q", answer=None, layout=lay,
                     attn=rng.gamma(0.7, size=(v, n_layers)).astype(np.float32))
    with pytest.raises(PosbiasError, match="utr_loss"):
        solve_store(str(path), [2.0])
    write_utr_loss(path, ["s:0", "s:2"], rng.uniform(0.1, 1, (2, n_layers)))
    out = solve_store(str(path), [2.0, 3.0])
    assert set(out) == {"2", "3"}
    for entry in out.values():
        assert entry["status"] == "optimal" and entry["n_samples"] == 2 and entry["samples"] == ["s:0", "s:2"]
        assert sum(entry["schedule"][1:]) == entry["budget"]
        assert "no /tokens/attn_pa" in entry["metric"]


# ------------------------------------------------------------------------------- pwl / compact (2nd pass)


def _compact_enumeration(mets, ells, budget, solver, which):
    from posbias.solvers.utp import iter_schedules

    v, n_layers = mets[0].shape
    vals = [(solver.objective(mets, ells, s, which), s) for s in iter_schedules(v, n_layers, budget)]
    return min(vals, key=lambda t: t[0])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("ratio", [1.5, 2.5])
def test_compact_matches_enumeration_of_compact_objective(seed, ratio):
    # general rankings (layers disagree): the compact model is not the progressive one, but the solver
    # must be optimal for the compact model it claims (the default, by the exact dynamic program); with V=8 every
    # level is a breakpoint, so "pwl" is that same model
    mets, ells = _instance(seed, s=2)
    budget = retention_budget(8, 5, ratio)
    for form in ("compact", "pwl"):
        solver = UTPSolver(ratio=ratio, formulation=form).fit(mets, ells)
        best, _ = _compact_enumeration(mets, ells, budget, solver, "compact")
        assert solver.status_ == "optimal" and solver.gap_ <= 1e-12  # 0 up to float rounding of the bounds
        assert solver.levels_ == (None if form == "compact" else list(range(1, 9)))
        assert solver.objective_ == pytest.approx(best, abs=1e-9)
        assert solver.objective_compact_ == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_pwl_with_coarse_levels_is_optimal_for_its_model(seed):
    # V=14 with 5 breakpoints: r_i between breakpoints is priced by linear interpolation; enumeration of
    # every admissible integer schedule under that same interpolated model finds the solver's optimum
    mets, ells = _instance(seed, s=3, v=14, n_layers=5)
    budget = retention_budget(14, 5, 2.0)
    solver = UTPSolver(ratio=2.0, formulation="pwl", levels=5).fit(mets, ells)
    assert len(solver.levels_) == 5 and solver.levels_[0] == 1 and solver.levels_[-1] == 14
    best, _ = _compact_enumeration(mets, ells, budget, solver, "pwl")
    assert solver.status_ == "optimal"
    assert solver.objective_ == pytest.approx(best, abs=1e-9)
    sched = np.asarray(solver.schedule_)
    assert sched[1:].sum() == budget and np.all(np.diff(sched) <= 0)
    # the interpolation is exact at breakpoints, so on a schedule made of breakpoints pwl == compact
    on_points = [14] + [solver.levels_[-2]] * 4
    assert solver.objective(mets, ells, on_points, "pwl") == pytest.approx(solver.objective(mets, ells, on_points, "compact"))


def test_keep_levels_and_summed_tables():
    from posbias.solvers.utp import compact_tables, keep_levels, summed_tables

    mets, ells = _instance(9, s=3, v=40, n_layers=6)
    mets[1] = np.round(mets[1], 1)  # ties: lower index first in every path
    mets[2][:, 3] = 0.0
    f, c = summed_tables(mets, ells)
    f_ref = sum(compact_tables(m, e)[0] for m, e in zip(mets, ells))
    c_ref = sum(compact_tables(m, e)[1] for m, e in zip(mets, ells))
    np.testing.assert_allclose(f, f_ref, atol=1e-12)
    assert c == pytest.approx(c_ref)
    pts = keep_levels(f, 2, 9)
    assert pts.tolist() == sorted(set(pts.tolist())) and len(pts) == 9 and pts[0] == 2 and pts[-1] == 40
    assert keep_levels(f, 2, None).tolist() == list(range(2, 41))
    assert keep_levels(f, 2, 500).tolist() == list(range(2, 41))
    with pytest.raises(PosbiasError, match="levels"):
        UTPSolver(ratio=2.0, levels=1).fit(mets, ells)


def test_pwl_large_instance_meets_budget_exactly():
    # V=576, L=32 with a handful of samples: exact budget, integers, non-increasing, optimal for pwl
    rng = np.random.default_rng(11)
    mets = [rng.gamma(0.5, size=(576, 1)) * rng.gamma(2.0, size=(576, 32)) for _ in range(3)]
    ells = np.linspace(1.2, 0.05, 32)[None] * rng.uniform(0.8, 1.2, (3, 32))
    solver = UTPSolver(ratio=4.0, formulation="pwl").fit(mets, ells)
    sched = np.asarray(solver.schedule_)
    assert solver.status_ == "optimal" and solver.gap_ <= 1e-12  # 0 up to float rounding of the bounds
    assert sched[0] == 576 and sched[1:].sum() == 576 * 8 - 576 and np.all(np.diff(sched) <= 0)
    assert solver.objective_compact_ == pytest.approx(solver.objective(mets, ells, solver.schedule_, "compact"))
    assert np.isfinite(solver.objective_progressive_)
    d = solver.to_dict()
    assert d["keep_levels"] == solver.levels_ and len(d["keep_levels"]) == 33
    back = UTPSolver.from_dict(d)
    assert back.to_dict() == d


@pytest.mark.parametrize("ratio", [1.2, 2.0, 4.0, 8.0, 10.0])
def test_lagrangian_start_is_admissible_and_not_below_the_optimum(ratio):
    # the primal heuristic that seeds HiGHS: exact budget, non-increasing, within [min_keep, V], and (being
    # a feasible point of the same program) never cheaper than the proven optimum
    from posbias.solvers.utp import _PwlProgram, keep_levels, summed_tables

    mets, ells = _instance(3, s=4, v=64, n_layers=12)
    f, const = summed_tables(mets, ells)
    budget = retention_budget(64, 12, ratio)
    points = keep_levels(f, 1, 17)
    prog = _PwlProgram(f, const, budget, points)
    tail = prog.lagrangian_start()
    assert tail is not None and int(tail.sum()) == budget
    sched = np.concatenate([[64], tail])
    assert (np.diff(sched) <= 0).all() and tail.min() >= 1
    g = prog.interpolated()  # (L-1, V+1)
    start_cost = const + float(g[np.arange(tail.size), tail].sum())
    solver = UTPSolver(ratio=ratio, levels=17).fit(mets, ells)
    assert solver.status_ == "optimal"
    assert start_cost >= solver.objective_ - 1e-9
    assert start_cost == pytest.approx(float(prog.cost @ prog.vector(tail)) + prog.offset, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compact_optimum_matches_enumeration_of_every_schedule(seed):
    # the exact dynamic program against brute force over every admissible schedule, on random (non-convex)
    # tables, every budget, min_keep 0..2
    from posbias.solvers.utp import compact_optimum, iter_schedules

    rng = np.random.default_rng(seed)
    for _ in range(8):
        n_layers, v, lo = int(rng.integers(3, 7)), int(rng.integers(2, 9)), int(rng.integers(0, 3))
        lo = min(lo, v)
        f = rng.normal(size=(n_layers - 1, v + 1))
        for budget in range((n_layers - 1) * lo, (n_layers - 1) * v + 1):
            tail, obj = compact_optimum(f, 0.25, budget, min_keep=lo)
            best = min(0.25 + f[np.arange(n_layers - 1), s[1:]].sum()
                       for s in iter_schedules(v, n_layers, budget, min_keep=lo))
            assert obj == pytest.approx(best, abs=1e-12)
            sched = np.concatenate([[v], tail])
            assert sched[1:].sum() == budget and sched[1:].min() >= lo and np.all(np.diff(sched) <= 0)
            assert 0.25 + f[np.arange(n_layers - 1), tail].sum() == pytest.approx(obj, abs=1e-12)
    with pytest.raises(PosbiasError, match="budget"):
        compact_optimum(np.zeros((3, 5)), 0.0, 13)


def test_default_is_the_compact_optimum_with_a_token_level_reference():
    # default: the proven compact optimum (never above pwl's compact loss); on a small instance the token-level
    # program runs too and its optimum bounds the progressive loss of every schedule, the chosen one included
    mets, ells = _instance(1, s=2, v=16, n_layers=6)
    solver = UTPSolver(ratio=2.5).fit(mets, ells)
    pwl = UTPSolver(ratio=2.5, formulation="pwl", levels=5).fit(mets, ells)
    assert solver.formulation == "compact" and solver.status_ == "optimal" and solver.gap_ == 0.0
    assert solver.objective_ == pytest.approx(solver.objective_compact_)
    assert solver.objective_compact_ <= pwl.objective_compact_ + 1e-12
    assert solver.tokens_status_ == "optimal"
    assert solver.objective_tokens_ <= solver.objective_progressive_ + 1e-9
    assert solver.objective_tokens_ <= pwl.objective_progressive_ + 1e-9
    d = solver.to_dict()
    assert d["objective_tokens"] == pytest.approx(solver.objective_tokens_) and d["tokens_status"] == "optimal"
    assert UTPSolver.from_dict(d).to_dict() == d
    big = UTPSolver(ratio=2.5, token_bound="auto").fit([np.tile(m, (40, 1)) for m in mets], ells)
    assert big.tokens_status_ is None and big.to_dict()["objective_tokens"] is None  # S (L-1) V above the limit
