"""Adapters, layouts, tiny models, the registry / offline errors, and the demo models (slow)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from posbias.errors import ModelUnavailableError, PosbiasError
from posbias.models.base import ModelAdapter, VisualLayout


# --------------------------------------------------------------------------- tiny models
def test_tiny_builds_fast_and_follow_the_spec():
    from posbias.models.tiny import tiny_llava, tiny_qwen2_5_vl

    tiny_llava(), tiny_qwen2_5_vl()  # warm imports
    for build in (tiny_llava, tiny_qwen2_5_vl):
        t0 = time.perf_counter()
        adapter = build(seed=1)
        assert time.perf_counter() - t0 < 2.0
        assert isinstance(adapter, ModelAdapter)
        text = adapter.model.config.text_config
        assert adapter.n_layers == text.num_hidden_layers >= 2
        assert text.num_key_value_heads < text.num_attention_heads
        assert len(adapter.decoder_attention_modules()) == adapter.n_layers
    a, b = tiny_llava(seed=3), tiny_llava(seed=3)
    c = tiny_llava(seed=4)
    wa = a.model.model.language_model.layers[0].self_attn.q_proj.weight
    assert torch.equal(wa, b.model.model.language_model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(wa, c.model.model.language_model.layers[0].self_attn.q_proj.weight)


def test_llava_prepare_and_layout(tiny_llava_adapter, noise_image):
    adapter = tiny_llava_adapter
    assert adapter.name == "llava" and adapter.rope_dims == 1
    inputs = adapter.prepare(noise_image, "what is in the image?")
    assert inputs["input_ids"].shape[0] == 1
    assert inputs["pixel_values"].shape == (1, 3, 56, 56)
    assert inputs["pixel_values"].dtype == adapter.model.dtype
    layout = adapter.layout(inputs)
    assert isinstance(layout, VisualLayout)
    assert layout.grid == (4, 4) and layout.n_visual == 16
    ids = inputs["input_ids"][0].numpy()
    assert np.all(ids[layout.visual_index] == adapter.model.config.image_token_id)
    assert np.all(np.diff(layout.visual_index) == 1)  # one contiguous block
    assert layout.position_ids.shape == (16, 1)
    np.testing.assert_array_equal(layout.position_ids[:, 0], layout.visual_index)
    np.testing.assert_array_equal(layout.rows, np.repeat(np.arange(4), 4))
    np.testing.assert_array_equal(layout.cols, np.tile(np.arange(4), 4))
    assert layout.seq_len == ids.shape[0]
    # "USER: <image>\n..." prompt: the image follows "USER" ":"
    tok = adapter.processor.tokenizer
    assert tok.convert_ids_to_tokens(ids[: layout.visual_start].tolist()) == ["USER", ":"]


def test_llava_layout_576_tokens_for_24x24_config(tiny_llava_adapter):
    """A prompt with 576 image tokens (the LLaVA-1.5 grid) lays out as 24x24 raster."""
    adapter = tiny_llava_adapter
    image_id = adapter.model.config.image_token_id
    ids = torch.tensor([[5, 6] + [image_id] * 576 + [7, 8, 9]])  # (1, 581)
    layout = adapter.layout({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert layout.n_visual == 576 and layout.grid == (24, 24)
    assert layout.visual_start == 2
    assert (layout.rows[25], layout.cols[25]) == (1, 1)
    assert layout.rows.max() == 23 and layout.cols.max() == 23


def test_llava_layout_errors(tiny_llava_adapter):
    adapter = tiny_llava_adapter
    image_id = adapter.model.config.image_token_id
    with pytest.raises(PosbiasError, match="no <image> token"):
        adapter.layout({"input_ids": torch.tensor([[5, 6, 7]])})
    with pytest.raises(PosbiasError, match="not a square grid"):
        adapter.layout({"input_ids": torch.tensor([[5] + [image_id] * 15])})
    with pytest.raises(PosbiasError, match="question is empty"):
        adapter.prepare(None, "  ")


def test_qwen_prepare_and_layout_non_square(tiny_qwen_adapter, noise_image):
    adapter = tiny_qwen_adapter
    assert adapter.name == "qwen2_5_vl" and adapter.rope_dims == 3
    inputs = adapter.prepare(noise_image, "what is in the image?")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert key in inputs
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert t == 1 and h != w
    layout = adapter.layout(inputs)
    assert layout.grid == (h // 2, w // 2) == (4, 5)
    assert layout.n_visual == 20
    ids = inputs["input_ids"][0].numpy()
    assert np.all(ids[layout.visual_index] == adapter.model.config.image_token_id)
    np.testing.assert_array_equal(inputs["mm_token_type_ids"][0].numpy()[layout.visual_index], 1)
    # M-RoPE (notes): image starting at s gets t = s, h = s + row, w = s + col
    s = layout.visual_start
    assert layout.position_ids.shape == (20, 3)
    np.testing.assert_array_equal(layout.position_ids[:, 0], s)
    np.testing.assert_array_equal(layout.position_ids[:, 1], s + layout.rows)
    np.testing.assert_array_equal(layout.position_ids[:, 2], s + layout.cols)
    np.testing.assert_array_equal(layout.rows, np.repeat(np.arange(4), 5))
    np.testing.assert_array_equal(layout.cols, np.tile(np.arange(5), 4))
    # text after the image resumes at s + max(rows, cols)
    pos, _ = adapter.model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    after = int(layout.visual_index[-1]) + 1
    assert pos[:, 0, after].tolist() == [s + 5] * 3


def test_qwen_pixel_limits_change_token_count(noise_image):
    from posbias.models.tiny import tiny_qwen2_5_vl

    adapter = tiny_qwen2_5_vl()
    n_default = adapter.layout(adapter.prepare(noise_image, "what is this?")).n_visual
    adapter.set_pixel_limits(min_pixels=28 * 28, max_pixels=56 * 84)
    n_small = adapter.layout(adapter.prepare(noise_image, "what is this?")).n_visual
    assert n_small < n_default
    with pytest.raises(PosbiasError, match="min_pixels"):
        adapter.set_pixel_limits(min_pixels=10**6, max_pixels=10**5)


def test_qwen_chat_template_renders_the_prompt():
    from jinja2 import Template

    from posbias.models.qwen2_5_vl import QWEN_CHAT_TEMPLATE, QWEN_PROMPT

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Why?"}]}]
    assert Template(QWEN_CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=True) == QWEN_PROMPT.format(
        question="Why?"
    )


def test_llava_chat_template_renders_the_prompt():
    from jinja2 import Template

    from posbias.models.llava import LLAVA_CHAT_TEMPLATE, LLAVA_PROMPT

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Why?"}]}]
    rendered = Template(LLAVA_CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=True)
    assert rendered == LLAVA_PROMPT.format(question="Why?")


def test_forward_last_logits_equals_full_forward(tiny_qwen_adapter, noise_image):
    adapter = tiny_qwen_adapter
    inputs = adapter.prepare(noise_image, "describe the image")
    last = adapter.forward_last_logits(inputs)
    with torch.no_grad():
        full = adapter.model(**inputs, use_cache=False).logits  # (1, S, vocab)
    assert last.shape == (full.shape[-1],)
    torch.testing.assert_close(last, full[0, -1], atol=1e-5, rtol=1e-5)


def test_fingerprint_depends_on_geometry_not_weights():
    from posbias.models.tiny import tiny_llava, tiny_qwen2_5_vl

    a, b = tiny_llava(seed=0), tiny_llava(seed=1)
    q = tiny_qwen2_5_vl(seed=0)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint().startswith("sha256:")
    assert a.fingerprint() != q.fingerprint()
    assert a.config_dict()["model_type"] == "llava"


# --------------------------------------------------------------------------- registry
def test_load_adapter_tiny_aliases():
    from posbias.models.registry import load_adapter

    lv = load_adapter("tiny-llava")
    qw = load_adapter("tiny-qwen2.5-vl", dtype="bfloat16")
    assert lv.name == "llava" and qw.name == "qwen2_5_vl"
    assert qw.model.dtype == torch.bfloat16


def test_load_adapter_unknown_alias_lists_aliases():
    from posbias.models.registry import load_adapter

    with pytest.raises(PosbiasError) as info:
        load_adapter("qwen-vl-99b")
    msg = str(info.value)
    assert "\n" not in msg and "qwen2.5-vl-7b" in msg and "llava-1.5-7b" in msg and "demo-llava" in msg
    assert not isinstance(info.value, ModelUnavailableError)


def test_load_adapter_bad_dtype():
    from posbias.models.registry import load_adapter

    with pytest.raises(PosbiasError, match="float64"):
        load_adapter("tiny-llava", dtype="float64")


def test_hub_model_fails_fast_offline(tmp_path):
    from posbias.models.registry import load_adapter

    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as info:
        load_adapter("qwen2.5-vl-7b", cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 15.0
    msg = str(info.value)
    assert "\n" not in msg
    assert "'qwen2.5-vl-7b' (Qwen/Qwen2.5-VL-7B-Instruct)" in msg and "model=/path/to/checkpoint" in msg


def test_hub_model_fails_fast_with_hf_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from posbias.models.registry import load_adapter

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="llava-hf/llava-1.5-7b-hf"):
        load_adapter("llava-1.5-7b", cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 2.0


def test_hub_model_fails_fast_when_hub_blackholed(tmp_path, monkeypatch):
    """An endpoint that never answers must still fail within the short metadata timeout."""
    from huggingface_hub import constants

    from posbias.models import registry

    monkeypatch.setattr(constants, "ENDPOINT", "http://10.255.255.1")
    monkeypatch.setattr(registry, "HUB_TIMEOUT_S", 2.0)
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="cannot be reached"):
        registry.load_adapter("qwen2.5-vl-3b", cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 10.0


def _save_tiny(adapter, folder):
    adapter.model.save_pretrained(str(folder))
    if adapter.name == "llava":
        adapter.processor.save_pretrained(str(folder))
    else:
        adapter.processor.image_processor.save_pretrained(str(folder))
        adapter.processor.tokenizer.save_pretrained(str(folder))


@pytest.mark.parametrize("build", ["tiny_llava", "tiny_qwen2_5_vl", "tiny_qwen2_vl"])
def test_load_adapter_local_folder_roundtrip(build, tmp_path, noise_image):
    from posbias.models import tiny
    from posbias.models.registry import load_adapter

    original = getattr(tiny, build)(seed=2)
    _save_tiny(original, tmp_path / "ckpt")
    loaded = load_adapter(tmp_path / "ckpt")
    assert type(loaded) is type(original) and loaded.revision is None
    assert loaded.language_model().config._attn_implementation == "sdpa"
    inputs = loaded.prepare(noise_image, "what is in the image?")
    ref = original.prepare(noise_image, "what is in the image?")
    assert torch.equal(inputs["input_ids"], ref["input_ids"])
    torch.testing.assert_close(loaded.forward_last_logits(inputs), original.forward_last_logits(ref))
    assert loaded.fingerprint() == original.fingerprint()


def test_load_adapter_from_hf_cache_records_revision(tmp_path, noise_image):
    """A checkpoint in the HF cache layout loads offline; the snapshot folder name is the revision."""
    from posbias.models.tiny import tiny_llava
    from posbias.models.registry import load_adapter

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someorg--tiny-llava"
    snapshot = repo / "snapshots" / commit
    _save_tiny(tiny_llava(seed=5), snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    adapter = load_adapter("someorg/tiny-llava", cache_dir=tmp_path)
    assert adapter.revision == commit and adapter.model_id == "someorg/tiny-llava"
    assert adapter.layout(adapter.prepare(noise_image, "what?")).n_visual == 16


def test_partial_hf_cache_is_a_one_line_error(tmp_path):
    from posbias.models.tiny import tiny_llava
    from posbias.models.registry import load_adapter

    commit = "fedcba9876543210fedcba9876543210fedcba98"
    repo = tmp_path / "models--someorg--half"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    tiny_llava().model.config.save_pretrained(str(snapshot))  # config only, no weights
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with pytest.raises(ModelUnavailableError, match="only partly") as info:
        load_adapter("someorg/half", cache_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_local_folder_without_config(tmp_path):
    from posbias.models.registry import load_adapter

    with pytest.raises(PosbiasError, match="config.json"):
        load_adapter(tmp_path)


# --------------------------------------------------------------------------- demo (slow)
@pytest.fixture(scope="module")
def smollm2():
    from posbias.models.demo import load_smollm2

    return load_smollm2()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["demo-llava", "demo-qwen2.5-vl", "demo-qwen2-vl"])
def test_demo_text_logits_equal_plain_smollm2(name, smollm2):
    from posbias.models.registry import load_adapter

    adapter = load_adapter(name)
    causal, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids  # (1, S)
    with torch.no_grad():
        want = causal(input_ids=ids, use_cache=False).logits[0]  # (S, 49152)
        got = adapter.model(input_ids=ids, use_cache=False).logits[0]  # (S, 49152 + new tokens)
    assert got.shape[-1] > want.shape[-1]
    torch.testing.assert_close(got[:, : want.shape[-1]], want, atol=1e-4, rtol=0)
    # the vision side is untrained but the grid is the real one
    from skimage import data as skdata
    from PIL import Image

    layout = adapter.layout(adapter.prepare(Image.fromarray(skdata.astronaut()), "What is shown?"))
    if adapter.name == "llava":
        assert layout.grid == (24, 24)
    else:
        assert layout.grid == (18, 18) and 256 <= layout.n_visual <= 576


def _tiny_decoder():
    """A tiny tied-embedding Llama causal LM + the tiny tokenizer (stand-in for SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from posbias.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e5},
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tok


@pytest.mark.parametrize("name", ["demo-llava", "demo-qwen2.5-vl", "demo-qwen2-vl", "demo-internvl"])
def test_demo_builder_with_tiny_decoder(name, tmp_path, noise_image):
    """The demo builder wraps a decoder exactly (text logits equal), caches, and reloads."""
    from posbias.models import demo
    from posbias.models.registry import load_adapter

    causal, tok = _tiny_decoder()
    n_plain = causal.config.vocab_size
    ids = torch.tensor([[5, 20, 30, 40, 7]])  # (1, 5) words of the tiny vocabulary
    with torch.no_grad():
        want = causal(input_ids=ids).logits[0]  # (5, n_plain)
    folder = demo.build_demo(name, cache_dir=tmp_path, decoder=(causal, tok))
    assert folder == tmp_path / f"{name}-v{demo.DEMO_VERSION}"
    assert (folder / "posbias_demo.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temp folder left
    adapter = load_adapter(name, cache_dir=tmp_path)
    with torch.no_grad():
        got = adapter.model(input_ids=ids, use_cache=False).logits[0]
    torch.testing.assert_close(got[:, :n_plain], want, atol=1e-5, rtol=0)
    layout = adapter.layout(adapter.prepare(noise_image, "what is in the image?"))
    if name == "demo-llava":
        assert layout.grid == (24, 24) and adapter.model.config.vision_config.image_size == 336
    elif name == "demo-internvl":  # 224 px tiles -> 8x8 tokens each, crops + thumbnail (the overview)
        assert type(adapter.model).__name__ == "InternVLForConditionalGeneration" and adapter.name == "internvl"
        assert set(layout.tiles) == {(8, 8)} and layout.n_visual == 64 * layout.n_tiles
        assert layout.overview == layout.n_tiles - 1 and 1 <= layout.n_tiles <= 7
    else:
        vc = adapter.model.config.vision_config
        if name == "demo-qwen2-vl":  # the real class, every vision block global (no windows)
            assert type(adapter.model).__name__ == "Qwen2VLForConditionalGeneration" and adapter.name == "qwen2_vl"
            assert getattr(vc, "window_size", None) is None and vc.depth == 4
        else:
            assert vc.fullatt_block_indexes and len(vc.fullatt_block_indexes) < vc.depth
        assert adapter.model.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
        assert 256 <= layout.n_visual <= 576
    # second call reuses the cache (no decoder needed)
    assert demo.build_demo(name, cache_dir=tmp_path) == folder


def test_demo_build_failure_leaves_no_cache(tmp_path, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    from posbias.models import demo

    def dying_save(self, *args, **kwargs):
        (Path(args[0]) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(LlavaForConditionalGeneration, "save_pretrained", dying_save)
    with pytest.raises(KeyboardInterrupt):
        demo.build_demo("demo-llava", cache_dir=tmp_path, decoder=_tiny_decoder())
    assert list(tmp_path.iterdir()) == []


def test_demo_cache_root_env(monkeypatch, tmp_path):
    from posbias.models import demo

    monkeypatch.setenv("POSBIAS_CACHE", str(tmp_path))
    assert demo.demo_folder("demo-llava") == tmp_path / "demo" / f"demo-llava-v{demo.DEMO_VERSION}"
    assert demo.demo_cache_root(tmp_path / "x") == tmp_path / "x"
    with pytest.raises(PosbiasError, match="demo-llava"):
        demo.demo_folder("demo-foo")


# --------------------------------------------------------------------------- signal hooks (issue 3)
def test_llava_vision_feature_layer_mapping(tiny_llava_adapter):
    adapter = tiny_llava_adapter
    cfg = adapter.model.config
    n = cfg.vision_config.num_hidden_layers  # 2
    assert adapter.vision_feature_layers() == [n - 2]  # -2: the penultimate layer's output
    old = cfg.vision_feature_layer
    try:
        cfg.vision_feature_layer = [-1, 1]
        assert adapter.vision_feature_layers() == [n - 1, 0]
        assert len(adapter.vision_importance_modules()) == 2
        cfg.vision_feature_layer = 0
        with pytest.raises(PosbiasError, match="patch embeddings"):
            adapter.vision_feature_layers()
    finally:
        cfg.vision_feature_layer = old
    assert adapter.vision_importance_kind == "cls"


def test_qwen_window_index_is_a_permutation(tiny_qwen_adapter, noise_image):
    adapter = tiny_qwen_adapter
    inputs = adapter.prepare(noise_image, "what is this?")
    layout = adapter.layout(inputs)
    index = adapter.window_index(inputs)
    assert sorted(index.tolist()) == list(range(layout.n_visual))
    assert adapter.vision_importance_kind == "colmean"
    assert len(adapter.vision_importance_modules()) == len(adapter.model.config.vision_config.fullatt_block_indexes)


def test_rope_parameters(tiny_llava_adapter, tiny_qwen_adapter):
    inv, sections = tiny_llava_adapter.rope_parameters()
    assert sections is None and inv.ndim == 1
    inv, sections = tiny_qwen_adapter.rope_parameters()
    assert sections == [2, 3, 3] and sum(sections) == inv.shape[0]
