"""The new signals (position-agnostic attention, vision importance, region log-det, per-head rows)
against direct computations on the tiny models of both architectures."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from posbias.errors import PosbiasError
from posbias.profiler.signals import (
    SIGNALS,
    SignalCapture,
    attention_column_mean,
    block_edges,
    edge_mask,
    gram_logdet,
    parse_signals,
    region_block_index,
    region_logdet,
    rope_rotation,
    rotate_keys,
    uniform_position,
)

ADAPTERS = ["tiny_llava_adapter", "tiny_qwen_adapter", "tiny_qwen2_adapter"]


@pytest.fixture(params=ADAPTERS)
def adapter(request):
    return request.getfixturevalue(request.param)


# ----------------------------------------------------------------------------------- pure functions
def test_uniform_position_formula():
    # p' = floor((p1 + p2) / 2 + 1/2)
    for p1, p2 in [(5, 580), (5, 581), (0, 0), (3, 4), (10, 13)]:
        assert uniform_position([p1], [p2])[0] == math.floor((p1 + p2) / 2 + 0.5)
    np.testing.assert_array_equal(uniform_position([7, 7, 7], [7, 10, 12]), [7, 9, 10])


def test_rope_rotation_composes_like_transformers_rope():
    """R(b) applied after transformers' R(a) equals transformers' R(a + b), for 1-D and M-RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(0)
    d = 16
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))  # (8,)
    k = torch.randn(2, 5, d, generator=gen)  # (H_kv, V, D)
    a = torch.tensor([[3], [10], [50], [7], [0]])  # (V, 1)
    b = torch.tensor([[4], [-6], [-30], [0], [2]])  # (V, 1)
    cos_a, sin_a = rope_rotation(a, inv_freq)
    ka = rotate_keys(k, cos_a, sin_a)
    # transformers' reference rotation at positions a (cos/sin built as in LlamaRotaryEmbedding)
    freqs = a.float() * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    _, k_ref = apply_rotary_pos_emb(k, k, emb.cos(), emb.sin(), unsqueeze_dim=0)
    torch.testing.assert_close(ka, k_ref, atol=1e-5, rtol=1e-5)
    cos_b, sin_b = rope_rotation(b, inv_freq)
    cos_ab, sin_ab = rope_rotation(a + b, inv_freq)
    torch.testing.assert_close(rotate_keys(ka, cos_b, sin_b), rotate_keys(k, cos_ab, sin_ab), atol=1e-5, rtol=1e-5)
    # M-RoPE: sections [2, 3, 3]; frequency f follows axis t, h or w
    delta = torch.tensor([[1, 2, 3], [0, -4, 5]])  # (V, 3)
    cos, _ = rope_rotation(delta, inv_freq, [2, 3, 3])
    axis = [0, 0, 1, 1, 1, 2, 2, 2]
    want = torch.stack([delta[:, ax].double() * inv_freq[f].double() for f, ax in enumerate(axis)], dim=1).cos()
    torch.testing.assert_close(cos[:, :8], want.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(cos[:, 8:], cos[:, :8])
    with pytest.raises(ValueError, match="sections"):
        rope_rotation(delta, inv_freq, [2, 2, 2])


def test_attention_column_mean_chunked_equals_full():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 37, 8, generator=gen)  # (H, N, D)
    k = torch.randn(3, 37, 8, generator=gen)
    full = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1).mean(dim=(0, 1))  # (N,)
    for budget in (1, 3 * 37 * 5, 10**9):  # one row, 5 rows, all rows per chunk
        got = attention_column_mean(q, k, 0.5, budget=budget)
        torch.testing.assert_close(got, full, atol=1e-6, rtol=0)
    assert abs(float(full.sum()) - 1.0) < 1e-5


def test_block_edges_and_index():
    np.testing.assert_array_equal(block_edges(24, 6), [0, 4, 8, 12, 16, 20, 24])
    np.testing.assert_array_equal(np.diff(block_edges(18, 6)), [3] * 6)
    sizes = np.diff(block_edges(20, 6))
    assert sizes.sum() == 20 and sizes.max() - sizes.min() <= 1
    rows, cols = np.divmod(np.arange(576), 24)
    block = region_block_index(rows, cols, (24, 24), 6)
    assert np.all(np.bincount(block, minlength=36) == 16)
    assert block[0] == 0 and block[575] == 35 and block[4] == 1 and block[24 * 4] == 6
    with pytest.raises(PosbiasError, match="region.grid"):
        block_edges(24, 0)


def test_edge_mask_seed_layout():
    mask = edge_mask(6)
    assert mask.sum() == 20 and (~mask).sum() == 16  # seed 000: 20 edge blocks, 16 centre
    assert not mask[1:5, 1:5].any()
    assert edge_mask(2).all()


def test_gram_logdet_equals_direct_covariance():
    rng = np.random.default_rng(0)
    eps = 1e-3
    for m, d in [(16, 40), (16, 16), (30, 12), (1, 5)]:
        x = rng.normal(size=(m, d)) * 0.3  # (m, D)
        xc = x - x.mean(axis=0)
        direct = np.linalg.slogdet(xc.T @ xc / m + eps * np.eye(d))[1]
        assert gram_logdet(x, eps) == pytest.approx(direct, rel=1e-9, abs=1e-8)
    assert math.isnan(gram_logdet(np.zeros((0, 4)), eps))


def test_region_logdet_per_block_and_empty_blocks():
    rng = np.random.default_rng(1)
    rows, cols = np.divmod(np.arange(24), 6)  # 4 x 6 grid
    feats = rng.normal(size=(24, 10))
    h = region_logdet(feats, rows, cols, (4, 6), n=2, eps=1e-2)
    assert h.shape == (2, 2)
    block = (rows >= 2) * 2 + (cols >= 3)
    for b in range(4):
        assert h[b // 2, b % 2] == pytest.approx(gram_logdet(feats[block == b], 1e-2))
    # a denser (higher-variance) block has higher H
    feats2 = feats.copy()
    feats2[block == 3] *= 10
    assert region_logdet(feats2, rows, cols, (4, 6), n=2, eps=1e-2)[1, 1] > h[1, 1]
    # grid smaller than n: empty blocks are NaN, the others finite
    h3 = region_logdet(feats, rows, cols, (4, 6), n=5, eps=1e-2)
    assert np.isnan(h3).sum() == 5 and np.isfinite(h3).sum() == 20
    with pytest.raises(PosbiasError, match="eps"):
        region_logdet(feats, rows, cols, (4, 6), n=2, eps=0.0)


def test_parse_signals():
    assert parse_signals("all") == SIGNALS
    assert parse_signals("attn_pa") == ("attn", "attn_pa")
    assert parse_signals(["region_logdet", "attn"]) == ("attn", "region_logdet")
    with pytest.raises(PosbiasError, match="unknown"):
        parse_signals("attn,bogus")


# ---------------------------------------------------------------------- position-agnostic attention
def _direct_pa(adapter, inputs, layout) -> tuple[np.ndarray, np.ndarray]:
    """(V, L) ordinary and position-agnostic last-row attention, computed from PRE-RoPE q/k.

    Hooks record each layer's q_proj/k_proj outputs and the position ids the model's rotary module
    really received; the rows are then rebuilt with transformers' own rotary module and
    ``apply_rotary_pos_emb``, once at the true positions and once with every visual token moved to
    p' = floor((p1 + p2) / 2 + 1/2) on every axis.
    """
    import importlib

    lm = adapter.language_model()
    mod = importlib.import_module(type(lm.layers[0].self_attn).__module__)
    qs, ks, pos = {}, {}, {}
    def grab_positions(module, args, kwargs):
        pos.setdefault("p", (args[1] if len(args) > 1 else kwargs["position_ids"]).clone())

    hooks = [lm.rotary_emb.register_forward_pre_hook(grab_positions, with_kwargs=True)]
    for i, layer in enumerate(lm.layers):
        attn = layer.self_attn
        hooks.append(attn.q_proj.register_forward_hook(lambda m, a, o, i=i: qs.__setitem__(i, o.detach())))
        hooks.append(attn.k_proj.register_forward_hook(lambda m, a, o, i=i: ks.__setitem__(i, o.detach())))
    try:
        with torch.no_grad():
            adapter.model(**inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    position_ids = pos["p"]  # (1, S) or (3, 1, S)
    vi = torch.as_tensor(layout.visual_index)
    moved = position_ids.clone()
    vis = moved[..., vi]  # (..., V)
    target = (vis[..., :1] + vis[..., -1:] + 1) // 2  # per axis
    moved[..., vi] = target.expand_as(vis)
    cfg = lm.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // n_heads
    mask = inputs.get("attention_mask")
    out = {"attn": [], "pa": []}
    for i in range(len(lm.layers)):
        q = qs[i].view(1, -1, n_heads, head_dim).transpose(1, 2)  # (1, H, S, D)
        k = ks[i].view(1, -1, n_kv, head_dim).transpose(1, 2)  # (1, H_kv, S, D)
        cos, sin = lm.rotary_emb(q, position_ids)
        q_rot, k_rot = mod.apply_rotary_pos_emb(q, k, cos, sin)
        cos_m, sin_m = lm.rotary_emb(q, moved)
        _, k_moved = mod.apply_rotary_pos_emb(q, k, cos_m, sin_m)
        for name, keys in (("attn", k_rot), ("pa", k_moved)):
            kk = keys.repeat_interleave(n_heads // n_kv, dim=1)
            s = (q_rot[:, :, -1:] @ kk.transpose(-1, -2))[0, :, 0] * head_dim**-0.5  # (H, S)
            if mask is not None:
                s = s.masked_fill(mask[0][None, :] == 0, float("-inf"))
            out[name].append(torch.softmax(s, dim=-1)[:, vi].mean(dim=0).numpy())
    return np.stack(out["attn"], axis=1), np.stack(out["pa"], axis=1)


def test_attn_pa_equals_direct_computation(adapter, noise_image):
    inputs = adapter.prepare(noise_image, "what color is the object in the picture?")
    layout = adapter.layout(inputs)
    with SignalCapture(adapter, signals="attn,attn_pa") as cap:
        sig = cap.run(inputs, layout)
    attn_direct, pa_direct = _direct_pa(adapter, inputs, layout)
    np.testing.assert_allclose(sig.attn, attn_direct, atol=2e-6, rtol=0)
    pa = sig.token_data["attn_pa"]
    assert pa.shape == sig.attn.shape and pa.dtype == np.float32
    np.testing.assert_allclose(pa, pa_direct, atol=2e-6, rtol=0)
    # it is a different signal: the position change moves the row well beyond rounding
    assert np.abs(pa - sig.attn).max() > 20 * np.abs(pa - pa_direct).max()
    assert np.abs(pa - sig.attn).max() > 1e-5
    assert np.all(pa.sum(axis=0) < 1) and np.all(pa > 0)


def test_attn_pa_with_left_padding(tiny_llava_adapter, noise_image):
    adapter = tiny_llava_adapter
    inputs = dict(adapter.prepare(noise_image, "what is in the image?"))
    pad = adapter.processor.tokenizer.pad_token_id
    inputs["input_ids"] = torch.cat([torch.full((1, 3), pad), inputs["input_ids"]], dim=1)
    inputs["attention_mask"] = torch.cat([torch.zeros(1, 3, dtype=torch.long), inputs["attention_mask"]], dim=1)
    layout = adapter.layout(inputs)
    sig = SignalCapture(adapter, signals="attn_pa").run(inputs, layout)
    _, pa_direct = _direct_pa(adapter, inputs, layout)
    np.testing.assert_allclose(sig.token_data["attn_pa"], pa_direct, atol=2e-6, rtol=0)


def test_attn_pa_at_layer0_follows_the_token_not_its_position(tiny_llava_adapter, noise_image):
    """Layer-0 keys depend only on token content, so with one uniform position PA must move WITH the
    visual features when they are shuffled among the visual slots; ordinary attention does not."""
    adapter = tiny_llava_adapter
    inputs = adapter.prepare(noise_image, "describe the image")
    layout = adapter.layout(inputs)
    base = SignalCapture(adapter, signals="attn_pa").run(inputs, layout)
    perm = torch.randperm(layout.n_visual, generator=torch.Generator().manual_seed(0))
    hook = adapter.model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: o[:, perm])
    try:
        shuffled = SignalCapture(adapter, signals="attn_pa").run(inputs, layout)
    finally:
        hook.remove()
    np.testing.assert_allclose(shuffled.token_data["attn_pa"][:, 0], base.token_data["attn_pa"][perm.numpy(), 0],
                               atol=1e-7, rtol=1e-5)
    assert np.abs(shuffled.attn[:, 0] - base.attn[perm.numpy(), 0]).max() > 1e-5


# ------------------------------------------------------------------------------- vision importance
def test_llava_vision_importance_equals_eager_cls_row(tiny_llava_adapter, noise_image):
    adapter = tiny_llava_adapter
    inputs = adapter.prepare(noise_image, "what is this?")
    layout = adapter.layout(inputs)
    sig = SignalCapture(adapter, signals="vision_importance").run(inputs, layout)
    got = sig.token_data["vision_importance"]
    tower = copy.deepcopy(adapter.vision_tower())
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    n_layers = adapter.model.config.vision_config.num_hidden_layers
    feature_layer = adapter.model.config.vision_feature_layer  # -2: penultimate layer's output
    layer = (feature_layer % (n_layers + 1)) - 1
    # the layer recorded is the one whose output is hidden_states[feature_layer]
    hooked = {}

    def grab(module, args, output):
        hooked["out"] = output[0] if isinstance(output, tuple) else output

    h = adapter.vision_tower().encoder.layers[layer].register_forward_hook(grab)
    try:
        with torch.no_grad():
            ref = adapter.vision_tower()(inputs["pixel_values"], output_hidden_states=True)
    finally:
        h.remove()
    torch.testing.assert_close(hooked["out"], ref.hidden_states[feature_layer])
    expected = out.attentions[layer][0, :, 0, 1:].mean(dim=0).numpy()  # (V,) [CLS] -> patches, head mean
    assert got.shape == (layout.n_visual,) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert 0 < got.sum() < 1  # the [CLS] column itself takes the rest


def _qwen_unpermute(adapter, inputs) -> torch.Tensor:
    """(N,) index p such that window-permuted row p[j] holds processor-order patch j, found by matching
    the patch embeddings to the first block's input (independent of the window-index function)."""
    visual = adapter.vision_tower()
    got = {}

    def grab_embed(module, args, output):
        got["embed"] = output.detach()

    def grab_block_input(module, args, kwargs):
        got["perm"] = (args[0] if args else kwargs["hidden_states"]).detach()

    hooks = [
        visual.patch_embed.register_forward_hook(grab_embed),
        visual.blocks[0].register_forward_pre_hook(grab_block_input, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        for h in hooks:
            h.remove()
    dist = torch.cdist(got["embed"].double(), got["perm"].double())  # (N, N)
    p = dist.argmin(dim=1)
    assert torch.all(dist.min(dim=1).values < 1e-5) and len(set(p.tolist())) == p.shape[0]  # exact copies
    return p


def test_qwen_vision_importance_equals_eager_column_means(tiny_qwen_adapter, noise_image):
    import importlib

    adapter = tiny_qwen_adapter
    inputs = adapter.prepare(noise_image, "what is this?")
    layout = adapter.layout(inputs)
    sig = SignalCapture(adapter, signals="vision_importance").run(inputs, layout)
    got = sig.token_data["vision_importance"]
    visual = adapter.vision_tower()
    mod = importlib.import_module(type(visual).__module__)
    full_blocks = list(visual.fullatt_block_indexes)
    seen = {}
    hooks = [
        visual.blocks[i].attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen.__setitem__(i, (a[0] if a else kw["hidden_states"], kw["position_embeddings"])),
            with_kwargs=True,
        )
        for i in full_blocks
    ]
    try:
        with torch.no_grad():
            visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        for h in hooks:
            h.remove()
    cols = []
    with torch.no_grad():
        for i in full_blocks:
            attn = visual.blocks[i].attn
            x, (cos, sin) = seen[i]
            n = x.shape[0]
            q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = mod.apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
            _, weights = mod.eager_attention_forward(attn, q, k, v, None, scaling=attn.scaling)  # (1, H, N, N)
            cols.append(weights[0].mean(dim=(0, 1)))  # (N,) mean attention each patch receives
    col = torch.stack(cols).mean(dim=0)  # (N,) window-permuted order
    p = _qwen_unpermute(adapter, inputs)
    in_processor_order = col[p]  # (N,) processor order: 4 consecutive patches per merged token, raster
    expected = in_processor_order.reshape(-1, 4).mean(dim=1).numpy()  # (V,)
    assert got.shape == (layout.n_visual,)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert np.isclose(got.sum() * 4, 1.0, atol=1e-4)  # column means sum to 1 over the N = 4 V patches
    # window permutation is not the identity on this grid: mapping matters
    assert not torch.equal(p, torch.arange(p.shape[0]))


# --------------------------------------------------------------------------------- region log-det
def test_region_logdet_from_llm_input_and_encoder_features(adapter, noise_image):
    inputs = adapter.prepare(noise_image, "what is this?")
    layout = adapter.layout(inputs)
    cap = SignalCapture(adapter, signals="region_logdet", region_grid=2, region_eps=1e-2)
    sig = cap.run(inputs, layout)
    h = sig.sample_data["region_logdet"]
    assert h.shape == (2, 2) and h.dtype == np.float32 and np.isfinite(h).all()
    inner = adapter.model.model
    with torch.no_grad():
        if adapter.name == "llava":
            llm_feats = inner.get_image_features(pixel_values=inputs["pixel_values"])
            llm_feats = (llm_feats.pooler_output if hasattr(llm_feats, "pooler_output") else llm_feats)
            llm_feats = torch.cat(list(llm_feats), 0) if isinstance(llm_feats, (list, tuple)) else llm_feats
            enc = adapter.vision_tower()(inputs["pixel_values"], output_hidden_states=True)
            enc_feats = enc.hidden_states[adapter.model.config.vision_feature_layer][0, 1:]  # (V, D_v)
        else:
            llm_feats = inner.get_image_features(pixel_values=inputs["pixel_values"],
                                                 image_grid_thw=inputs["image_grid_thw"])
            llm_feats = (llm_feats.pooler_output if hasattr(llm_feats, "pooler_output") else llm_feats)
            llm_feats = torch.cat(list(llm_feats), 0) if isinstance(llm_feats, (list, tuple)) else llm_feats
            out = adapter.vision_tower()(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
            p = _qwen_unpermute(adapter, inputs)
            enc_feats = out.last_hidden_state[p].reshape(layout.n_visual, -1)  # (V, 4 D_v) processor order
    llm_feats = llm_feats.reshape(layout.n_visual, -1).double().numpy()
    expected = region_logdet(llm_feats, layout.rows, layout.cols, layout.grid, 2, 1e-2)
    np.testing.assert_allclose(h, expected, rtol=1e-5)
    expected_v = region_logdet(enc_feats.double().numpy(), layout.rows, layout.cols, layout.grid, 2, 1e-2)
    np.testing.assert_allclose(sig.sample_data["region_logdet_vision"], expected_v, rtol=1e-5)
    blocks = sig.token_data["region_block"]
    np.testing.assert_array_equal(blocks, region_block_index(layout.rows, layout.cols, layout.grid, 2))
    np.testing.assert_array_equal(cap.static_data()["samples/region_is_edge"], edge_mask(2))
    assert cap.attrs()["region_grid"] == 2


# ----------------------------------------------------------------------- all at once, per head, restore
def test_all_signals_in_one_forward(adapter, noise_image):
    inputs = adapter.prepare(noise_image, "how many animals are there?")
    layout = adapter.layout(inputs)
    plain = adapter.forward_last_logits(inputs)
    lm_before = adapter.language_model().config._attn_implementation
    vision_before = adapter.vision_tower().config._attn_implementation
    calls = []
    hook = adapter.language_model().register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with SignalCapture(adapter, signals="all", per_head=True, region_grid=2) as cap:
            sig = cap.run(inputs, layout)
            assert adapter.vision_tower().config._attn_implementation != vision_before
    finally:
        hook.remove()
    assert len(calls) == 1  # every signal from ONE forward
    torch.testing.assert_close(cap.last_logits, plain, atol=1e-5, rtol=0)
    n_heads = adapter.model.config.text_config.num_attention_heads
    v, n_layers = layout.n_visual, adapter.n_layers
    assert sig.attn.shape == (v, n_layers)
    assert sig.token_data["attn_heads"].shape == (v, n_layers, n_heads)
    np.testing.assert_allclose(sig.token_data["attn_heads"].mean(axis=2), sig.attn, atol=1e-7)
    assert set(sig.token_data) == {"attn_heads", "attn_pa", "vision_importance", "region_block"}
    assert set(sig.sample_data) == {"region_logdet", "region_logdet_vision"}
    # the plain capture still gives the same attn
    from posbias.profiler.capture import capture_attention

    np.testing.assert_allclose(capture_attention(adapter, inputs, layout), sig.attn, atol=1e-7)
    assert adapter.language_model().config._attn_implementation == lm_before
    assert adapter.vision_tower().config._attn_implementation == vision_before


def test_restored_after_exception(adapter):
    lm_before = adapter.language_model().config._attn_implementation
    vision_before = adapter.vision_tower().config._attn_implementation
    n_hooks = len(adapter.language_model()._forward_pre_hooks)
    with pytest.raises(ValueError, match="boom"):
        with SignalCapture(adapter, signals="all"):
            raise ValueError("boom")
    assert adapter.language_model().config._attn_implementation == lm_before
    assert adapter.vision_tower().config._attn_implementation == vision_before
    assert len(adapter.language_model()._forward_pre_hooks) == n_hooks


def test_bad_options(tiny_llava_adapter):
    with pytest.raises(PosbiasError, match="region.grid"):
        SignalCapture(tiny_llava_adapter, region_grid=0)
    with pytest.raises(PosbiasError, match="unknown"):
        SignalCapture(tiny_llava_adapter, signals="attn,vision")


# ------------------------------------------------------------------------------ through the profiler
@pytest.mark.parametrize("per_head", [False, True])
def test_profile_loop_stores_signals(tiny_qwen_adapter, tmp_path, per_head):
    from posbias.data.registry import iter_samples, resolve_sources
    from posbias.profiler.run import profile_samples
    from posbias.profiler.store import ProfileStore

    adapter = tiny_qwen_adapter
    samples = list(iter_samples(resolve_sources(["embedded"]), n=2, seed=0))
    path = tmp_path / "profile.h5"
    capture = SignalCapture(adapter, signals="all", per_head=per_head, region_grid=3)
    summary = profile_samples(adapter, samples, path, seed=0, progress=False, capture=capture)
    assert summary.n_profiled == 2
    with ProfileStore(path) as store:
        names = store.signal_names()
        want_tokens = {"attn_pa", "vision_importance", "region_block"} | ({"attn_heads"} if per_head else set())
        assert set(names["tokens"]) == want_tokens
        assert set(names["samples"]) == {"region_logdet", "region_logdet_vision"}
        assert store.static("samples/region_is_edge").shape == (3, 3)
        assert store.token_data("attn_pa").shape == (store.n_tokens, adapter.n_layers)
        assert store.sample_data("region_logdet").shape == (2, 3, 3)
        assert store.attrs["region_grid"] == 3 and "attn_pa" in store.attrs["signals"]
        # the stored rows of sample 1 are what a direct capture of that sample gives
        item = samples[1]
        inputs = adapter.prepare(item.image, item.question)
        direct = SignalCapture(adapter, signals="all", per_head=per_head, region_grid=3)
        sig = direct.run(inputs, adapter.layout(inputs))
        np.testing.assert_allclose(store.sample_attn(1), sig.attn, atol=1e-6)
        np.testing.assert_allclose(store.sample_token_data("attn_pa", 1), sig.token_data["attn_pa"], atol=1e-6)
        np.testing.assert_allclose(store.sample_token_data("vision_importance", 1),
                                   sig.token_data["vision_importance"], atol=1e-6)
        np.testing.assert_allclose(store.sample_data("region_logdet")[1], sig.sample_data["region_logdet"], rtol=1e-5)
        if per_head:
            heads = store.sample_token_data("attn_heads", 1)
            np.testing.assert_allclose(heads.mean(axis=-1), store.sample_attn(1), atol=1e-6)


def test_density_fitter_reads_the_stored_region_data(tiny_llava_adapter, tmp_path):
    """The density test of the fitters (seed 000, Fig. 2) reads what the profiler wrote."""
    from posbias.data.registry import iter_samples, resolve_sources
    from posbias.fitters.density import read_region_density
    from posbias.profiler.run import profile_samples

    samples = list(iter_samples(resolve_sources(["embedded"]), n=2, seed=0))
    path = tmp_path / "profile.h5"
    capture = SignalCapture(tiny_llava_adapter, signals="region_logdet", region_grid=4)
    profile_samples(tiny_llava_adapter, samples, path, seed=0, progress=False, capture=capture)
    logdet, is_edge = read_region_density(path)
    assert logdet.shape == (2, 4, 4) and np.isfinite(logdet).all()
    np.testing.assert_array_equal(is_edge, edge_mask(4))


def test_cli_profile_signal_flags(tmp_path, capsys):
    from posbias.cli import main
    from posbias.profiler.store import ProfileStore

    out = tmp_path / "run"
    rc = main(["profile", "--model", "tiny-llava", "--n", "2", "--out", str(out), "--no-progress",
               "--signals", "attn_pa,region_logdet", "--per-head", "--region-grid", "2"])
    assert rc == 0
    with ProfileStore(out / "profile.h5") as store:
        assert set(store.signal_names()["tokens"]) == {"attn_pa", "attn_heads", "region_block"}
        assert store.sample_data("region_logdet").shape == (2, 2, 2)
        assert not store.has("vision_importance")
    rc = main(["profile", "--model", "tiny-llava", "--n", "1", "--out", str(tmp_path / "bad"), "--no-progress",
               "--signals", "attn,nope"])
    assert rc == 2
    assert "unknown ['nope']" in capsys.readouterr().err


def test_signals_in_bfloat16_close_to_float32(noise_image):
    from posbias.models.registry import load_adapter

    fp32 = load_adapter("tiny-qwen2.5-vl")
    bf16 = load_adapter("tiny-qwen2.5-vl", dtype="bfloat16")
    ref_inputs = fp32.prepare(noise_image, "what is this?")
    ref = SignalCapture(fp32, signals="attn_pa,vision_importance").run(ref_inputs, fp32.layout(ref_inputs))
    inputs = bf16.prepare(noise_image, "what is this?")
    got = SignalCapture(bf16, signals="attn_pa,vision_importance").run(inputs, bf16.layout(inputs))
    for name in ("attn_pa", "vision_importance"):
        assert got.token_data[name].dtype == np.float32
        np.testing.assert_allclose(got.token_data[name], ref.token_data[name], atol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["demo-llava", "demo-qwen2.5-vl"])
def test_demo_models_signals_match_direct_computation(name):
    """On the real SmolLM2 decoder (30 layers, rope_theta 1e5): attn_pa equals the direct computation
    from pre-RoPE q/k, differs from attn, and every signal is finite."""
    from PIL import Image
    from skimage import data as skdata

    from posbias.models.registry import load_adapter

    adapter = load_adapter(name)
    inputs = adapter.prepare(Image.fromarray(skdata.astronaut()), "What is the person wearing?")
    layout = adapter.layout(inputs)
    sig = SignalCapture(adapter, signals="all").run(inputs, layout)
    _, pa_direct = _direct_pa(adapter, inputs, layout)
    np.testing.assert_allclose(sig.token_data["attn_pa"], pa_direct, atol=1e-5, rtol=0)
    assert np.abs(sig.token_data["attn_pa"] - sig.attn).max() > 1e-3
    assert np.isfinite(sig.token_data["vision_importance"]).all()
    h = sig.sample_data["region_logdet"]
    assert h.shape == (6, 6) and np.isfinite(h).all()
