"""UTP benchmarks: schedule solve time vs L, V, S; info-loss fast path vs one full forward.

Usage: python benchmarks/bench_utp.py [--model tiny-llava|demo-llava] [--skip-solve] [--skip-loss] [--gaps]
Synthetic profiles (seeded gamma attention with a persistent per-token component, ell decreasing with
depth) stand in for stores; the formulation is the default "compact" (exact dynamic program), mode "joint"
unless noted. ``--gaps`` prints, at L=8/16/32 and V=64/576, the solve time of the exact compact optimum and of
"pwl" (33 levels, HiGHS) with pwl's gap to it, and where the token-level program is computable (S=3, small V*L)
the gap of both schedules' progressive loss to the token-level optimum.
The machine is shared: run it twice and read the spread; the info-loss ratio interleaves its two sides.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

__all__: list[str] = []


def synth(v: int, n_layers: int, s: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    mets = [rng.gamma(0.5, size=(v, 1)) * rng.gamma(2.0, size=(v, n_layers)) for _ in range(s)]  # (V, L) each
    ells = np.linspace(1.2, 0.05, n_layers)[None] * rng.uniform(0.8, 1.2, (s, n_layers))  # (S, L)
    return mets, ells


def bench_solve(v: int, n_layers: int, s: int, ratio: float = 4.0, mode: str = "joint", levels: int | None = 33,
                formulation: str = "compact", seed: int = 0) -> None:
    """One fit; prints HiGHS time (LP + incumbent sub-MIP + proof) and the fit's wall time (tables included)."""
    from posbias.solvers.utp import UTPSolver

    mets, ells = synth(v, n_layers, s, seed=seed)
    t0 = time.perf_counter()
    solver = UTPSolver(ratio=ratio, mode=mode, levels=levels, formulation=formulation, time_limit=300,
                       evaluate=False, token_bound=False).fit(mets, ells)
    wall = time.perf_counter() - t0
    print(f"solve {formulation:7s} levels={levels!s:4s} L={n_layers:3d} V={v:4d} S={s:4d} c={ratio:g} seed={seed}: "
          f"status={solver.status_} gap={solver.gap_:.2g} highs={solver.solve_seconds_:.3f}s wall={wall:.3f}s",
          flush=True)


def bench_gaps(ratio: float = 4.0) -> None:
    """Exact compact optimum vs pwl (time, gap) at L=8/16/32, V=64/576, S=100; token-level gaps where computable."""
    from posbias.solvers.utp import UTPSolver

    def fit(mets, ells, **kw):
        t0 = time.perf_counter()
        sol = UTPSolver(ratio=ratio, time_limit=120, token_bound=False, **kw).fit(mets, ells)
        return sol, time.perf_counter() - t0

    print(f"gaps, c={ratio:g}: wall s of the whole fit (tables included); gap = (x - optimum) / optimum")
    for n_layers in (8, 16, 32):
        for v in (64, 576):
            mets, ells = synth(v, n_layers, 100)
            exact, t_exact = fit(mets, ells)
            pwl, t_pwl = fit(mets, ells, formulation="pwl", levels=33)
            gap = (pwl.objective_compact_ - exact.objective_compact_) / exact.objective_compact_
            print(f"L={n_layers:2d} V={v:3d} S=100: compact exact {t_exact:.3f}s obj {exact.objective_compact_:.5f} | "
                  f"pwl-33 {t_pwl:.3f}s obj {pwl.objective_compact_:.5f} gap {100 * gap:+.3f}% ({pwl.status_})",
                  flush=True)
    for n_layers, v in ((8, 64), (16, 64), (32, 64)):
        mets, ells = synth(v, n_layers, 3)
        exact, t_exact = fit(mets, ells)
        tok, t_tok = fit(mets, ells, formulation="tokens")
        if tok.schedule_ is None:
            print(f"L={n_layers:2d} V={v:3d} S=3: token-level program found no schedule in 120 s ({tok.status_})")
            continue
        opt = tok.objective_progressive_
        print(f"L={n_layers:2d} V={v:3d} S=3: token-level {t_tok:.2f}s {tok.status_} gap {tok.gap_:.2g} progressive "
              f"{opt:.5f} | compact optimum {t_exact:.3f}s progressive {exact.objective_progressive_:.5f} "
              f"({100 * (exact.objective_progressive_ - opt) / opt:+.2f}%)", flush=True)


def bench_info_loss(model: str, reps: int = 5) -> None:
    """All ell of one prompt (fast path, incl. its own full forward) vs one full forward, interleaved."""
    from PIL import Image

    from posbias.models import load_adapter
    from posbias.models.tiny import tiny_llava
    from posbias.profiler.utr import info_loss

    adapter = tiny_llava(0) if model == "tiny-llava" else load_adapter(model)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8))
    inputs = adapter.prepare(img, "What is the main object in this picture?")
    adapter.forward_last_logits(inputs)
    info_loss(adapter, inputs)  # warm-up
    full_t, fast_t = [], []
    for _ in range(reps):  # interleave the two sides so load changes hit both
        t0 = time.perf_counter()
        adapter.forward_last_logits(inputs)
        full_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        info_loss(adapter, inputs)
        fast_t.append(time.perf_counter() - t0)
    full, fast = float(np.median(full_t)), float(np.median(fast_t))
    ratios = np.asarray(fast_t) / np.asarray(full_t)
    print(f"info loss on {model}: seq={inputs['input_ids'].shape[1]} L={adapter.n_layers}: one forward {full:.3f}s "
          f"(median of {reps}), all ell incl. its own full forward {fast:.3f}s = {fast / full:.2f}x "
          f"(per-pair ratios {np.round(ratios, 2).tolist()})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--skip-solve", action="store_true")
    ap.add_argument("--skip-loss", action="store_true")
    ap.add_argument("--gaps", action="store_true", help="only the exact-vs-pwl-vs-token-level table")
    args = ap.parse_args()
    if args.gaps:
        bench_gaps()
        return
    if not args.skip_loss:
        bench_info_loss(args.model)
    if not args.skip_solve:
        for seed in range(3):  # the headline: L=32, V=576, S=100, one ratio
            bench_solve(576, 32, 100, seed=seed)
        for ratio in (2.0, 8.0, 16.0):
            bench_solve(576, 32, 100, ratio=ratio)
        bench_solve(576, 32, 100, formulation="pwl")
        bench_solve(576, 32, 100, formulation="pwl", levels=65)
        for n_layers in (8, 16, 28, 32, 40):
            bench_solve(576, n_layers, 100)
        for v in (64, 144, 324, 576, 1024):
            bench_solve(v, 32, 100)
        for s in (1, 10, 100, 500):
            bench_solve(576, 32, s)


if __name__ == "__main__":
    main()
