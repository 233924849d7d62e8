"""Fit side = apply side: the pruner scores the row the profile store holds, and ARP uses the stored vision importance.

For tiny LLaVA, Qwen2.5-VL, Qwen2-VL, InternVL and Qwen3-VL (real transformers classes), two samples are profiled into a real h5
store; then, for the same prompts, the runtime pruner runs on the model and its scoring row at every scoring
layer (``PruneRecord.scoring_rows``) must equal ``/tokens/attn`` of that layer, UTP's position-agnostic row
must equal ``/tokens/attn_pa``, and the vision importance ARP used (``PruneRecord.vision_importance``) must
equal ``/tokens/vision_importance``, within 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import posbias.runtime as rt
from posbias import kernels
from posbias.profiler import ProfileStore
from test_pruning import make_calibration

ADAPTERS = ["tiny_llava_adapter", "tiny_qwen_adapter", "tiny_qwen2_adapter", "tiny_internvl_adapter",
            "tiny_qwen3_adapter"]


@pytest.fixture(scope="module", params=ADAPTERS)
def profiled(request, tmp_path_factory):
    """(adapter, samples, store path) with 2 embedded samples profiled (attn + vision importance)."""
    from posbias.data.registry import iter_samples, resolve_sources
    from posbias.profiler.run import profile_samples
    from posbias.profiler.signals import SignalCapture

    adapter = request.getfixturevalue(request.param)
    samples = list(iter_samples(resolve_sources(["embedded"]), n=2, seed=0))
    path = tmp_path_factory.mktemp("parity") / "profile.h5"
    capture = SignalCapture(adapter, signals="attn,attn_pa,vision_importance")
    summary = profile_samples(adapter, samples, path, seed=0, progress=False, capture=capture)
    assert summary.n_profiled == 2
    return adapter, samples, path


def test_pruner_scores_the_stored_attention_row(profiled):
    adapter, samples, path = profiled
    model = adapter.model
    with ProfileStore(path) as store:
        for i, item in enumerate(samples):
            stored = store.sample_attn(i)  # (V, L) float32
            inputs = adapter.prepare(item.image, item.question)
            v = int(adapter.layout(inputs).n_visual)
            assert stored.shape == (v, adapter.n_layers)
            for layer in range(adapter.n_layers - 1):  # every layer the pruner can score at
                with rt.enable_pruning(model, method="fastv", keep=max(1, v // 2), layer=layer) as pruner:
                    with torch.no_grad():
                        model(**inputs)
                row = pruner.last.scoring_rows[layer]  # (V,) the row fastv ranked
                assert row.shape == (v,)
                np.testing.assert_allclose(row.numpy(), stored[:, layer], atol=1e-5, rtol=0)
                # and it is what the pruner kept: the top half of the stored row
                kept = pruner.last.kept.numpy()
                top = np.sort(np.argsort(-stored[:, layer], kind="stable")[: kept.shape[0]])
                np.testing.assert_array_equal(np.sort(kept), top)
    # the rows differ between layers: the comparison is layer-specific
    assert not np.allclose(stored[:, 0], stored[:, 1], atol=1e-5)


def test_utp_scores_the_stored_position_agnostic_row(profiled):
    adapter, samples, path = profiled
    model = adapter.model
    n = adapter.n_layers
    with ProfileStore(path) as store:
        for i, item in enumerate(samples):
            stored = store.sample_token_data("attn_pa", i)  # (V, L)
            plain = store.sample_attn(i)  # (V, L)
            inputs = adapter.prepare(item.image, item.question)
            v = int(adapter.layout(inputs).n_visual)
            for layer in range(n - 1):
                schedule = [v] * (layer + 1) + [v - 2] * (n - layer - 1)  # shrinks after `layer` only
                with rt.enable_pruning(model, method="utp", schedule=schedule, params={"pa_layers": n}) as pruner:
                    with torch.no_grad():
                        model(**inputs)
                row = pruner.last.scoring_rows[layer]  # (V,) position-agnostic: layer < pa_layers
                np.testing.assert_allclose(row.numpy(), stored[:, layer], atol=1e-5, rtol=0)
                assert not np.allclose(stored[:, layer], plain[:, layer], atol=1e-5)  # another row than attn


def test_arp_uses_the_stored_vision_importance(profiled):
    adapter, samples, path = profiled
    model = adapter.model
    with ProfileStore(path) as store:
        for i, item in enumerate(samples):
            stored = store.sample_token_data("vision_importance", i)  # (V,)
            inputs = adapter.prepare(item.image, item.question)
            grid = adapter.layout(inputs).grid
            cal = make_calibration(adapter, grid=grid)
            with rt.enable_pruning(model, cal, method="posprune", keep=4) as pruner:
                with torch.no_grad():
                    model(**inputs)
            got = pruner.last.vision_importance
            assert got is not None and got.shape == stored.shape
            np.testing.assert_allclose(got.numpy(), stored, atol=1e-5, rtol=0)
            assert pruner.last.stages[0][0] == -1  # ARP ran on the vision side with it
    assert float(np.std(stored)) > 0  # not a constant: the order of the tokens matters


def test_kernels_are_the_profilers_functions():
    """The profiler's public helpers are the shared kernels (one implementation, re-exported)."""
    from posbias.profiler import signals

    assert signals.rope_rotation is kernels.rope_rotation
    assert signals.attention_column_mean is kernels.attention_column_mean
    assert signals.position_agnostic_scores is kernels.position_agnostic_scores
    assert signals.uniform_position is kernels.uniform_position
    from posbias.runtime import methods

    assert methods.gaussian_centre_weight is kernels.gaussian_centre_weight


def test_gaussian_kernel_torch_and_numpy_agree_with_the_fitter():
    from posbias.fitters.gaussian import gaussian_mask

    for grid, sigma in (((24, 24), 1.0), ((4, 5), 0.5), ((1, 7), 2.0)):
        ids = np.arange(grid[0] * grid[1])
        np_w = kernels.gaussian_centre_weight(ids // grid[1], ids % grid[1], grid, sigma)  # float64
        t = torch.from_numpy(ids)
        torch_w = kernels.gaussian_centre_weight(t // grid[1], t % grid[1], grid, sigma)  # float32
        np.testing.assert_array_equal(gaussian_mask(grid, sigma).ravel(), np_w)
        np.testing.assert_allclose(torch_w.numpy(), np_w, rtol=1e-6)
        assert (np_w > 0).all() and (np_w <= 1).all()


def test_profiler_modules_import_without_a_cycle():
    import subprocess
    import sys

    code = ("import sys; import posbias.profiler.capture as c; "
            "assert 'posbias.profiler.signals' not in sys.modules, 'capture imports signals'")
    subprocess.run([sys.executable, "-c", code], check=True)
