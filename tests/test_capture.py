"""Last-token attention capture against eager ``output_attentions`` on both tiny architectures."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from posbias.errors import PosbiasError
from posbias.profiler.capture import LastTokenAttentionCapture, capture_attention

ADAPTERS = ["tiny_llava_adapter", "tiny_qwen_adapter", "tiny_qwen2_adapter"]


def _vision_impl(adapter) -> str:
    inner = adapter.model.model
    tower = getattr(inner, "vision_tower", None) or getattr(inner, "visual")
    return tower.config._attn_implementation


def _eager_rows(adapter, inputs, visual_index) -> np.ndarray:
    """(V, L, H) last-row attention of an eager copy of the model with output_attentions=True."""
    eager = copy.deepcopy(adapter.model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True, use_cache=False)
    vi = torch.as_tensor(visual_index)
    per_layer = [a[0, :, -1, :][:, vi].numpy() for a in out.attentions]  # L x (H, V)
    return np.stack(per_layer, axis=0).transpose(2, 0, 1)  # (V, L, H)


@pytest.fixture(params=ADAPTERS)
def adapter(request):
    return request.getfixturevalue(request.param)


def test_capture_equals_eager_rows(adapter, noise_image):
    inputs = adapter.prepare(noise_image, "what color is the object in the picture?")
    layout = adapter.layout(inputs)
    with LastTokenAttentionCapture(adapter) as cap:
        got = cap.run(inputs, layout)  # (V, L)
    assert got.shape == (layout.n_visual, adapter.n_layers)
    assert got.dtype == np.float32
    expected = _eager_rows(adapter, inputs, layout.visual_index).mean(axis=2)  # (V, L)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # not a degenerate row: visual tokens carry mass but not all of it
    mass = got.sum(axis=0)  # (L,)
    assert np.all(mass > 0) and np.all(mass < 1)


def test_per_head_and_layer_subset(adapter, noise_image):
    inputs = adapter.prepare(noise_image, "how many animals are there?")
    layout = adapter.layout(inputs)
    expected = _eager_rows(adapter, inputs, layout.visual_index)  # (V, L, H)
    n_heads = adapter.model.config.text_config.num_attention_heads
    with LastTokenAttentionCapture(adapter, layers=[2, 0], per_head=True) as cap:
        got = cap.run(inputs, layout)
    assert got.shape == (layout.n_visual, 2, n_heads)
    np.testing.assert_allclose(got, expected[:, [2, 0], :], atol=1e-5, rtol=0)
    # heads differ (GQA repeat applied per head, not one head copied)
    assert np.abs(got[:, 0, 0] - got[:, 0, 1]).max() > 1e-6


def test_capture_logits_equal_plain_sdpa_forward(adapter, noise_image):
    inputs = adapter.prepare(noise_image, "describe the image")
    layout = adapter.layout(inputs)
    plain = adapter.forward_last_logits(inputs)  # (vocab,)
    assert adapter.language_model().config._attn_implementation == "sdpa"
    with LastTokenAttentionCapture(adapter, layers=[1]) as cap:
        cap.run(inputs, layout)
    assert cap.last_logits.shape == (adapter.model.config.text_config.vocab_size,)
    torch.testing.assert_close(cap.last_logits, plain, atol=1e-6, rtol=0)
    # full-sequence logits of the same forward agree at the last position
    with torch.no_grad():
        full = adapter.model(**inputs, use_cache=False).logits[0, -1]
    torch.testing.assert_close(full, plain, atol=1e-5, rtol=1e-5)


def test_implementation_switched_and_restored(adapter, noise_image):
    lm = adapter.language_model()
    before_lm = lm.config._attn_implementation
    before_vision = _vision_impl(adapter)
    cap = LastTokenAttentionCapture(adapter)
    with cap:
        assert lm.config._attn_implementation == cap.name
        assert _vision_impl(adapter) == before_vision  # vision tower untouched
    assert lm.config._attn_implementation == before_lm
    assert _vision_impl(adapter) == before_vision
    from posbias._hf_compat import routed_modules

    assert not routed_modules()  # no attention module is routed to the capture any more


def test_restored_after_exception(adapter, noise_image):
    lm = adapter.language_model()
    before = lm.config._attn_implementation
    with pytest.raises(ValueError, match="boom"):
        with LastTokenAttentionCapture(adapter):
            raise ValueError("boom")
    assert lm.config._attn_implementation == before
    # and the model still runs normally afterwards
    inputs = adapter.prepare(noise_image, "what is this?")
    assert torch.isfinite(adapter.forward_last_logits(inputs)).all()


def test_capture_attention_function_and_run_outside_context(adapter, noise_image):
    inputs = adapter.prepare(noise_image, "is there a cat?")
    layout = adapter.layout(inputs)
    a = capture_attention(adapter, inputs, layout, layers=[0, 1])
    cap = LastTokenAttentionCapture(adapter, layers=[0, 1])
    b = cap.run(inputs, layout)  # enters and exits by itself
    assert not cap.active
    np.testing.assert_array_equal(a, b)
    assert adapter.language_model().config._attn_implementation == "sdpa"


def test_capture_with_left_padding_matches_eager(tiny_llava_adapter, noise_image):
    """A padded prompt (mask row with zeros) must apply the mask like eager does."""
    adapter = tiny_llava_adapter
    inputs = adapter.prepare(noise_image, "what is in the image?")
    pad = adapter.processor.tokenizer.pad_token_id
    inputs = dict(inputs)
    inputs["input_ids"] = torch.cat([torch.full((1, 3), pad), inputs["input_ids"]], dim=1)
    inputs["attention_mask"] = torch.cat([torch.zeros(1, 3, dtype=torch.long), inputs["attention_mask"]], dim=1)
    layout = adapter.layout(inputs)
    assert layout.visual_index[0] == 3 + 2 and layout.position_ids[0, 0] == 2
    got = capture_attention(adapter, inputs, layout)
    expected = _eager_rows(adapter, inputs, layout.visual_index).mean(axis=2)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_bad_layers_rejected(tiny_llava_adapter):
    with pytest.raises(PosbiasError, match="out of range"):
        LastTokenAttentionCapture(tiny_llava_adapter, layers=[0, 3])
    with pytest.raises(PosbiasError, match="repeat"):
        LastTokenAttentionCapture(tiny_llava_adapter, layers=[1, 1])


@pytest.mark.slow
def test_demo_llava_capture_equals_eager_on_photo():
    from skimage import data as skdata
    from PIL import Image

    from posbias.models.registry import load_adapter

    adapter = load_adapter("demo-llava")
    image = Image.fromarray(skdata.astronaut())
    inputs = adapter.prepare(image, "What is the person wearing?")
    layout = adapter.layout(inputs)
    assert layout.n_visual == 576
    layers = [0, 2, 15, 29]
    got = capture_attention(adapter, inputs, layout, layers=layers)
    expected = _eager_rows(adapter, inputs, layout.visual_index).mean(axis=2)[:, layers]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_capture_in_bfloat16_close_to_float32(noise_image):
    from posbias.models.registry import load_adapter

    fp32 = load_adapter("tiny-qwen2.5-vl")
    bf16 = load_adapter("tiny-qwen2.5-vl", dtype="bfloat16")
    ref_inputs = fp32.prepare(noise_image, "what is this?")
    ref = capture_attention(fp32, ref_inputs, fp32.layout(ref_inputs))
    inputs = bf16.prepare(noise_image, "what is this?")
    assert inputs["pixel_values"].dtype == torch.bfloat16
    got = capture_attention(bf16, inputs, bf16.layout(inputs))
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-2)


def test_position_agnostic_rows_with_layer_subset_and_heads(adapter, noise_image):
    inputs = adapter.prepare(noise_image, "where is the dog?")
    layout = adapter.layout(inputs)
    with LastTokenAttentionCapture(adapter, position_agnostic=True) as cap:
        attn = cap.run(inputs, layout)  # (V, L)
        pa = cap.last_attn_pa  # (V, L)
    np.testing.assert_array_equal(cap.last_attn_mean, attn)
    with LastTokenAttentionCapture(adapter, layers=[2, 0], per_head=True, position_agnostic=True) as cap2:
        heads = cap2.run(inputs, layout)  # (V, 2, H)
    np.testing.assert_allclose(cap2.last_attn_pa, pa[:, [2, 0]], atol=1e-7)
    np.testing.assert_allclose(cap2.last_attn_mean, attn[:, [2, 0]], atol=1e-7)
    np.testing.assert_allclose(heads.mean(axis=2), attn[:, [2, 0]], atol=1e-7)
    assert not np.allclose(pa, attn, atol=1e-6)
    # without the flag nothing is computed
    with LastTokenAttentionCapture(adapter) as cap3:
        cap3.run(inputs, layout)
    assert cap3.last_attn_pa is None
