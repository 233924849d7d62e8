"""Runtime scoring/selection: torch-only, matches the fitters, recovers tokens hidden by a positional bias."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import posbias.runtime as rt
from posbias.artifacts import Calibration, fastv_entry, pbc_entry, pore_entry
from posbias.errors import PosbiasError
from posbias.fitters import ExponentialBiasFitter, PolynomialBiasFitter

V = 576
GRID = np.arange(V, dtype=np.float64)  # (V,)
PLANTED = np.array([3, 40, 77, 101, 150, 200, 222, 260])  # early/middle tokens carrying the content
A, B, C = 2e-4, 6e-3, 1e-4  # injected PoRe bias P(x) = A exp(B x) + C, ~x160 from first to last token


def pore_bias(x: np.ndarray) -> np.ndarray:
    return A * np.exp(B * x) + C


def pbc_bias(x: np.ndarray) -> np.ndarray:
    """Injected ΔA(x): shallow minus deep attention grows towards late tokens."""
    return 1e-3 * (x / V) ** 3 + 2e-4 * (x / V)


def _calibration(domain: str = "index", grid=(24, 24)) -> Calibration:
    rng = np.random.default_rng(0)
    unit = GRID if domain == "index" else GRID / V
    x = np.tile(unit, 64)  # (64*V,)
    xg = np.tile(GRID, 64)  # raster index, for the curves
    y_att = pore_bias(xg) * rng.uniform(0.8, 1.2, x.size)  # multiplicative content noise
    y_diff = pbc_bias(xg) + rng.normal(0.0, 2e-5, x.size)
    pore = ExponentialBiasFitter(domain=domain).fit(x, y_att).to_dict()
    pbc = PolynomialBiasFitter(degree=3, domain=domain).fit(x, y_diff).to_dict()
    return Calibration.new(
        model={
            "id": "synthetic/llava",
            "revision": "abc123",
            "fingerprint": "sha256:00000000000000aa",
            "adapter": "llava",
            "n_layers": 30,
            "rope_dims": 1,
            "grid": list(grid) if grid else None,
        },
        store={"file": "s.h5", "n_samples": 64, "n_skipped": 0, "sources": {"embedded": 64}, "seed": 0},
        methods={
            "fastv": fastv_entry(2),
            "pore": pore_entry(pore, layer=2),
            "posprune-pbc": pbc_entry(pbc, shallow_layer=2, deep_layer=20),
        },
        created="2026-11-22T00:00:00Z",
    )


@pytest.fixture(scope="module")
def cal() -> Calibration:
    return _calibration()


def _content(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.9, 1.0, V)  # (V,) background content
    c[PLANTED] = 2.0  # planted tokens: twice the content of any other token
    return c


def test_fastv_is_plain_topk(cal):
    attn = torch.rand(V, generator=torch.Generator().manual_seed(0))
    sel = rt.select_tokens("fastv", attn, None, keep=64)
    assert sel.dtype == torch.int64 and sel.shape == (64,)
    assert torch.equal(sel, torch.sort(torch.topk(attn, 64).indices).values)
    assert torch.equal(rt.select_tokens("fastv", attn, cal, keep=64), sel)
    assert torch.equal(rt.score_tokens("fastv", attn, cal), attn)


def test_pore_recovers_tokens_hidden_by_recency(cal):
    attn_np = _content() * pore_bias(GRID)  # (V,) content times bias
    attn = torch.tensor(attn_np / attn_np.sum(), dtype=torch.float32)  # softmax-like normalisation
    k = len(PLANTED)
    raw = rt.select_tokens("fastv", attn, None, keep=k)
    assert raw.min() > 500  # raw attention keeps only late tokens
    sel = rt.select_tokens("pore", attn, cal, keep=k)
    assert sel.tolist() == sorted(PLANTED.tolist())


def test_pbc_recovers_tokens_hidden_by_additive_bias(cal):
    attn_np = 1e-4 * _content(2) + pbc_bias(GRID)  # (V,) content + ΔA
    attn = torch.tensor(attn_np, dtype=torch.float32)
    k = len(PLANTED)
    assert rt.select_tokens("fastv", attn, None, keep=k).min() > 500
    sel = rt.select_tokens("posprune-pbc", attn, cal, keep=k)
    assert sel.tolist() == sorted(PLANTED.tolist())


def test_batched_input_matches_rows(cal):
    rows = [1e-4 * _content(s) + pbc_bias(GRID) for s in (3, 4, 5)]
    attn = torch.tensor(np.stack(rows), dtype=torch.float32)  # (3, V)
    for method in ("fastv", "pore", "posprune-pbc"):
        scores = rt.score_tokens(method, attn, cal)
        sel = rt.select_tokens(method, attn, cal, keep=32)
        assert scores.shape == (3, V) and sel.shape == (3, 32)
        for b in range(3):
            assert torch.equal(scores[b], rt.score_tokens(method, attn[b], cal))
            assert torch.equal(sel[b], rt.select_tokens(method, attn[b], cal, keep=32))
        assert bool((sel[:, 1:] > sel[:, :-1]).all())  # sorted ascending, no duplicates


@pytest.mark.parametrize("domain", ["index", "normalized"])
def test_torch_predict_equals_fitter_predict(domain):
    cal = _calibration(domain, grid=None if domain == "normalized" else (24, 24))
    x = torch.tensor(GRID if domain == "index" else GRID / V)  # (V,) float64
    for method, cls in (("pore", ExponentialBiasFitter), ("posprune-pbc", PolynomialBiasFitter)):
        fit = cal.method(method)["fit"]
        ref = cls.from_dict(fit).predict(x.numpy())  # (V,) float64
        got = rt.predict_bias(fit, x).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12 * np.abs(ref).max())
    # score_tokens uses x = i / V in the normalized domain
    attn = torch.full((V,), 1.0 / V, dtype=torch.float64)
    pbc = PolynomialBiasFitter.from_dict(cal.method("posprune-pbc")["fit"])
    expect = 1.0 / V - pbc.predict((GRID if domain == "index" else GRID / V))
    np.testing.assert_allclose(rt.score_tokens("posprune-pbc", attn, cal).numpy(), expect, rtol=1e-6, atol=1e-12)


def test_normalized_domain_uses_n_visual_and_positions():
    cal = _calibration("normalized", grid=None)
    fit = cal.method("pore")["fit"]
    attn = torch.ones(100, dtype=torch.float64)
    # a pruned subset: tokens 0, 10, ... 990 of a 1000-token sequence
    pos = torch.arange(0, 1000, 10)
    scores = rt.score_tokens("pore", attn, cal, n_visual=1000, positions=pos)
    expect = 1.0 / rt.predict_bias(fit, pos.to(torch.float64) / 1000)
    torch.testing.assert_close(scores, expect)
    with pytest.raises(PosbiasError, match="n_visual"):
        rt.score_tokens("pore", attn, cal, n_visual=50)


def test_errors_before_compute(cal):
    attn = torch.rand(V)
    for keep in (0, -1, V + 1, 2.0, True):
        with pytest.raises(PosbiasError, match="keep"):
            rt.select_tokens("fastv", attn, cal, keep=keep)
    with pytest.raises(PosbiasError, match="unknown pruning method"):
        rt.select_tokens("random", attn, cal, keep=8)
    with pytest.raises(PosbiasError, match="needs a calibration"):
        rt.score_tokens("pore", attn, None)
    d = cal.to_dict()
    del d["methods"]["pore"]
    no_pore = Calibration.from_dict(d)
    with pytest.raises(PosbiasError, match="has no method 'pore'.*available"):
        rt.select_tokens("pore", attn, no_pore, keep=8)
    with pytest.raises(PosbiasError, match="24x24"):
        rt.score_tokens("posprune-pbc", torch.rand(600), cal)
    with pytest.raises(PosbiasError, match="shape"):
        rt.score_tokens("fastv", torch.rand(2, 3, 4), None)
    with pytest.raises(PosbiasError, match="NaN"):
        rt.score_tokens("fastv", torch.tensor([0.1, float("nan")]), None)
    with pytest.raises(PosbiasError, match="floating"):
        rt.score_tokens("fastv", torch.arange(5), None)


def test_method_layer(cal):
    assert rt.method_layer("pore", cal) == 2
    assert rt.method_layer("posprune-pbc", cal) == 2
    assert rt.method_layer("fastv", cal) == 2


def test_runtime_reexports_calibration(tmp_path, cal):
    assert rt.Calibration is Calibration
    cal.save(tmp_path)
    assert rt.Calibration.from_pretrained(tmp_path) == cal


def test_runtime_imports_no_heavy_modules(tmp_path, cal):
    cal.save(tmp_path)
    code = textwrap.dedent(
        f"""
        import posbias.runtime, sys
        import posbias.runtime.prune, posbias.runtime.spec, posbias.runtime.methods, posbias.runtime.vision
        heavy = ('h5py', 'scipy', 'statsmodels', 'highspy', 'matplotlib')
        before = sorted(m for m in heavy if m in sys.modules)
        import torch
        cal = posbias.runtime.Calibration.from_pretrained({str(tmp_path)!r})
        attn = torch.rand(2, 576)
        for m in ('fastv', 'pore', 'posprune-pbc'):
            posbias.runtime.select_tokens(m, attn, cal, keep=64)
        after = sorted(m for m in heavy + ('posbias.fitters', 'sklearn', 'transformers') if m in sys.modules)
        print(before)
        print(after)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "[]", out


def test_plain_posbias_import_is_light():
    code = "import posbias, sys; print(sorted(m for m in ('torch','numpy','h5py','scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("'", '"')) == []


def test_paper_k_maps_to_the_scoring_layer_and_defaults_follow_the_released_code():
    from posbias.runtime.spec import DEFAULT_K, PARAMS, layer_from_k

    assert DEFAULT_K == 2 and layer_from_k(2) == 1 and layer_from_k(3) == 2  # scored at K-1, pruned from K
    for bad in (0, -1, 2.0, True):
        with pytest.raises(PosbiasError, match="k="):
            layer_from_k(bad)
    ap = PARAMS["adaptprune"]
    assert (ap["window"], ap["radius"], ap["sigma_d"], ap["sigma_s"]) == (11, 5.0, 1.5, 0.05)  # adapt_nms_2d
