"""Qwen3-VL (real ``Qwen3VLForConditionalGeneration``, tiny config): what differs from Qwen2-VL.

- interleaved M-RoPE: the kernel's rotation equals the model's rotary module (tiny and 7B-size head dims);
- deepstack: features added to the visual positions after decoder layers 0-2. Pruning before the last of them
  (the papers' K=2 is layer 1) adds each KEPT token's own rows and nothing else: checked against the decoder
  run by hand; ARP (before layer 0) too; ``generate`` decodes from the pruned cache;
- per-head q/k norms: the pruner scores the queries and keys after them (also covered by the kernel parity
  tests, which include Qwen3-VL).
The stages end to end and keep-all generation run in tests/test_qwen2_vl.py (parametrised over both).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import posbias.runtime as rt
from posbias import kernels
from tests.test_llava_next_runtime import decoder_call
from tests.test_pruning import make_calibration


def _rotary_cos(rotary, position: list[int]) -> torch.Tensor:
    """(D,) cos of the model's rotary module at one (t, h, w) position."""
    pos = torch.tensor(position, dtype=torch.long).view(3, 1, 1)  # (3, B=1, S=1)
    cos, _ = rotary(torch.zeros(1, dtype=torch.float32), pos)
    return cos[0, 0].float()  # (D,)


def test_interleaved_mrope_rotation_equals_the_rotary_module(tiny_qwen3_adapter):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextConfig, Qwen3VLTextRotaryEmbedding

    real = Qwen3VLTextConfig(head_dim=128, hidden_size=4096, num_attention_heads=32,
                             rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                              "mrope_section": [24, 20, 20], "mrope_interleaved": True})
    cases = [(tiny_qwen3_adapter.language_model().rotary_emb, [2, 3, 3]), (Qwen3VLTextRotaryEmbedding(real), [24, 20, 20])]
    for rotary, sections in cases:
        position = [7, 19, 42]  # distinct per axis: a wrong axis for any frequency shows
        want = _rotary_cos(rotary, position)
        got, _ = kernels.rope_rotation(torch.tensor([position]), rotary.inv_freq, sections, interleaved=True)
        torch.testing.assert_close(got[0], want, rtol=0, atol=1e-5)
        chunked, _ = kernels.rope_rotation(torch.tensor([position]), rotary.inv_freq, sections)
        assert not torch.allclose(chunked[0], want, atol=1e-3)  # Qwen2-VL's layout would be wrong here
    axes = kernels.mrope_axes([24, 20, 20], 64, interleaved=True)
    assert np.bincount(axes).tolist() == [24, 20, 20] and axes[:6].tolist() == [0, 1, 2, 0, 1, 2]


def _manual_prefill(model, inputs, drops: dict[int, torch.Tensor], *, deepstack_first: bool = False):
    """Reference: the decoder run by hand. ``drops`` maps a layer (-1: before layer 0) to the prompt positions
    kept after it; original RoPE angles; deepstack rows are added to the visual positions still present, each
    its own row (``deepstack_first``: the first rows instead, what the full-prompt mask would give a shorter
    sequence if applied as is)."""
    lm = model.model.language_model
    seen = decoder_call(model, inputs)
    with torch.no_grad():
        x = seen["inputs_embeds"]  # (1, S, D)
        mask = seen["visual_pos_masks"][0]  # (S,)
        deep = seen["deepstack_visual_embeds"]  # list of (V, D)
        pos = seen["position_ids"]
        pos = pos[1:] if pos.shape[0] == 4 else pos  # (3, 1, S)
        cos, sin = lm.rotary_emb(x, pos)
        seq = torch.arange(x.shape[1])  # (S_cur,) prompt positions alive

        def drop(after, x, cos, sin, seq):
            if after not in drops:
                return x, cos, sin, seq
            sel = torch.isin(seq, drops[after])
            return x[:, sel], cos[:, sel], sin[:, sel], seq[sel]

        x, cos, sin, seq = drop(-1, x, cos, sin, seq)
        for i, layer in enumerate(lm.layers):
            x = layer(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=None)
            if i < len(deep):
                here = mask[seq]  # (S_cur,)
                rows = torch.cumsum(mask.long(), 0)[seq[here]] - 1
                if deepstack_first:
                    rows = torch.arange(int(here.sum()))
                x = x.clone()
                x[0, here] = x[0, here] + deep[i][rows]
            x, cos, sin, seq = drop(i, x, cos, sin, seq)
        return model.lm_head(lm.norm(x))[0, -1]


def _kept_sequence(layout, kept: torch.Tensor) -> torch.Tensor:
    seq = torch.ones(layout.seq_len, dtype=torch.bool)
    vis = torch.as_tensor(layout.visual_index)
    seq[vis] = False
    seq[vis[kept]] = True
    return torch.nonzero(seq).flatten()


@pytest.fixture(scope="module")
def q3(tiny_qwen3_adapter, noise_image):
    ad = tiny_qwen3_adapter
    inputs = ad.prepare(noise_image, "what is in the image")
    layout = ad.layout(inputs)
    assert layout.grid == (3, 5) and len(ad.model.config.vision_config.deepstack_visual_indexes) == 3
    return ad, inputs, layout, make_calibration(ad, grid=layout.grid)


def test_pruning_before_the_last_deepstack_layer_adds_only_kept_rows(q3):
    """FastV at K=2 (scores layer 1, prunes after it; deepstack still adds after layer 2, read by layer 3): the
    pruned forward equals the decoder run by hand with each kept token's own deepstack row, and differs from
    misaligned rows (the first ones)."""
    ad, inputs, layout, cal = q3
    with rt.enable_pruning(ad.model, cal, method="fastv", keep=5, layer=1) as p:
        with torch.no_grad():
            got = ad.model(**inputs, use_cache=False).logits[0, -1]
    kept = p.last.kept
    assert kept.shape[0] == 5 and kept.tolist() != list(range(5))  # else the misaligned rows would be right
    seq = _kept_sequence(layout, kept)
    torch.testing.assert_close(got, _manual_prefill(ad.model, inputs, {1: seq}), rtol=1e-5, atol=1e-5)
    wrong = _manual_prefill(ad.model, inputs, {1: seq}, deepstack_first=True)
    assert not torch.allclose(got, wrong, atol=1e-4)
    n_after = layout.seq_len - layout.n_visual + 5
    assert p.last.tokens_per_layer == [layout.seq_len, layout.seq_len, n_after, n_after]


def test_arp_prunes_before_the_first_deepstack_layer_and_generate_decodes(q3):
    """PosPrune: ARP drops tokens before decoder layer 0 (deepstack then adds to its tokens at layers 0-2), PBC +
    MMR after layer 1; equal to the hand-run decoder with both drops; ``generate`` decodes from the pruned cache."""
    from posbias.runtime.methods import arp_select

    ad, inputs, layout, cal = q3
    with rt.enable_pruning(ad.model, cal, method="posprune", keep=4) as p:
        with torch.no_grad():
            got = ad.model(**inputs, use_cache=False).logits[0, -1]
            out = ad.model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    rec = p.last
    params = p.spec.params
    arp_kept = arp_select(rec.vision_importance, torch.as_tensor(layout.rows), torch.as_tensor(layout.cols),
                          layout.grid, blocks=int(params["arp_blocks"]), centre_ratio=float(params["arp_centre_ratio"]),
                          edge_ratio=float(params["arp_edge_ratio"]))
    assert dict(rec.stages)[-1] == arp_kept.shape[0] < layout.n_visual
    assert set(rec.kept.tolist()) <= set(arp_kept.tolist())
    drops = {-1: _kept_sequence(layout, arp_kept), 1: _kept_sequence(layout, rec.kept)}
    torch.testing.assert_close(got, _manual_prefill(ad.model, inputs, drops), rtol=1e-5, atol=1e-5)
    assert out.sequences.shape[1] == layout.seq_len + 3
    lens = [int(out.past_key_values.layers[i].keys.shape[-2]) for i in range(ad.n_layers)]
    n_text = layout.seq_len - layout.n_visual
    assert lens == [n_text + arp_kept.shape[0] + 2] * 2 + [n_text + 4 + 2] * 2


@pytest.mark.parametrize("made_for,applied_to", [("tiny_qwen2_adapter", "tiny_qwen3_adapter"),
                                                 ("tiny_llava_adapter", "tiny_internvl_adapter")])
def test_calibration_of_another_architecture_is_refused_before_compute(made_for, applied_to, request):
    """A calibration made on one architecture and applied to another: the fingerprint error, in one line, before
    any hook is attached (Qwen2-VL -> Qwen3-VL share the token layout, so only the fingerprint can tell)."""
    from posbias.errors import FingerprintMismatchError

    source, target = request.getfixturevalue(made_for), request.getfixturevalue(applied_to)
    cal = make_calibration(source)
    with pytest.raises(FingerprintMismatchError) as info:
        rt.enable_pruning(target.model, cal, method="fastv", keep=4)
    msg = str(info.value)
    assert "\n" not in msg and "fingerprint" in msg
    assert getattr(target.model, "_posbias_pruner", None) is None  # nothing attached, nothing computed
