"""The transformers/torch compatibility layer (posbias._hf_compat): supported ranges, the calling
conventions it reads from the installed release, and the deprecation guard of conftest.py."""

from __future__ import annotations

import warnings

import pytest
import torch

from posbias.errors import PosbiasError
from posbias import _hf_compat as hf


def test_installed_versions_are_in_range():
    hf.check_versions()  # the suite runs on a supported release, or nothing else here means anything


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"transformers_version": "4.46.0"}, "transformers 4.46.0 is installed"),
        ({"transformers_version": "6.0.0"}, "transformers 6.0.0 is installed"),
        ({"torch_version": "2.1.2+cu121"}, "torch 2.1.2+cu121 is installed"),
    ],
)
def test_out_of_range_is_one_line_naming_range_and_version(kw, needle):
    with pytest.raises(PosbiasError) as err:
        hf.check_versions(**kw)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg
    name = "torch" if "torch_version" in kw else "transformers"
    assert hf.supported_range_text(name) in msg


def test_floor_and_prereleases_of_floor_are_handled():
    lo, hi = hf.TRANSFORMERS_RANGE
    hf.check_versions(transformers_version=lo)
    hf.check_versions(transformers_version=f"{lo}.9")
    with pytest.raises(PosbiasError):
        hf.check_versions(transformers_version=hi)


def test_cli_refuses_unsupported_transformers_before_writing(tmp_path, capsys, monkeypatch):
    import transformers

    from posbias.cli import main

    monkeypatch.setattr(transformers, "__version__", "4.46.0")
    out = tmp_path / "run"
    code = main(["profile", "--model", "tiny-llava", "--n", "2", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "transformers 4.46.0" in err and hf.supported_range_text("transformers") in err
    assert not out.exists() or not any(out.iterdir())


def test_enable_pruning_refuses_unsupported_torch(tiny_llava_adapter, monkeypatch):
    import posbias.runtime as rt

    monkeypatch.setattr(torch, "__version__", "2.1.0")
    with pytest.raises(PosbiasError, match=r"torch 2\.1\.0 is installed"):
        rt.Pruner(tiny_llava_adapter.model, spec=None)


def test_conventions_read_from_the_installed_release(tiny_llava_adapter, noise_image):
    import inspect

    lm = tiny_llava_adapter.language_model()
    hf.check_decoder(lm)
    name = hf.layer_cache_kwarg(lm.layers[0])
    assert name in inspect.signature(type(lm.layers[0]).forward).parameters
    inputs = tiny_llava_adapter.prepare(noise_image, "what is in the image")
    with torch.no_grad():
        out = tiny_llava_adapter.model(**inputs, use_cache=True, logits_to_keep=1)
    cache = hf.output_cache(out)
    k, v = hf.cache_layer_kv(cache, 0)
    assert k.shape[-2] == v.shape[-2] == inputs["input_ids"].shape[1]
    assert hf.kwargs_cache({name: cache}) is cache and hf.kwargs_cache({}) is None


def test_check_decoder_names_what_is_missing():
    with pytest.raises(PosbiasError, match="rotary_emb"):
        hf.check_decoder(torch.nn.Module())


def test_route_restores_implementation_and_routes(tiny_llava_adapter, noise_image):
    lm = tiny_llava_adapter.language_model()
    before = hf.attention_implementation(lm)
    calls = []

    def handler(module, q, k, v, mask, **kw):
        calls.append(module)
        return hf.sdpa_attention()(module, q, k, v, mask, **kw)

    inputs = tiny_llava_adapter.prepare(noise_image, "what is in the image")
    with pytest.raises(ValueError, match="boom"):
        with hf.route_attention(lm, handler):
            assert hf.attention_implementation(lm) == hf.ROUTE_NAME
            tiny_llava_adapter.forward_last_logits(inputs)
            raise ValueError("boom")
    assert len(calls) == tiny_llava_adapter.n_layers
    assert hf.attention_implementation(lm) == before and not hf.routed_modules()


def test_deprecation_under_posbias_frame_is_an_error(tiny_llava_adapter, noise_image):
    """The guard of conftest.py: a FutureWarning raised while posbias code is on the stack fails the test."""
    from conftest import PosbiasDeprecationError

    lm = tiny_llava_adapter.language_model()

    def handler(module, q, k, v, mask, **kw):
        warnings.warn("old calling convention", FutureWarning, stacklevel=2)
        return hf.sdpa_attention()(module, q, k, v, mask, **kw)

    inputs = tiny_llava_adapter.prepare(noise_image, "what is in the image")
    with pytest.raises(PosbiasDeprecationError, match="old calling convention"):
        with hf.route_attention(lm, handler):
            tiny_llava_adapter.forward_last_logits(inputs)
    # the same warning outside any posbias frame is left to pytest's ordinary handling
    with pytest.warns(FutureWarning):
        warnings.warn("old calling convention", FutureWarning, stacklevel=1)
