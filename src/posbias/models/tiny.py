"""Tiny random LLaVA, LLaVA-NeXT, Qwen2.5-VL and Qwen2-VL models for tests.

These are the REAL transformers classes (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``) with tiny configs and
seeded random weights, plus a small word-level tokenizer built in code with the ``tokenizers`` library (about 150 words, the special tokens
of both architectures, ``<unk>`` for anything else), so they build offline in well under a second.
Their outputs mean nothing; their shapes, masks and positions follow the real models exactly.

- ``tiny_llava``: CLIP vision 56x56 px, patch 14 -> 4x4 = 16 visual tokens (+[CLS], dropped),
  Llama decoder 3 layers, 4 heads / 2 KV heads, hidden 64.
- ``tiny_llava_next``: the same CLIP tower and decoder as ``tiny_llava`` in LLaVA-NeXT, crops of 56 px,
  ``image_grid_pinpoints`` = LLaVA-1.6's pattern at 1/6 scale (1x2, 2x1, 2x2, 1x3, 3x1 crops): a 100x150
  image gives the 4x4 base grid + a 6x8 unpadded raster with 6 newlines = 70 visual tokens.
- ``tiny_qwen2_5_vl``: Qwen2.5-VL vision 2 blocks (block 0 windowed, block 1 full attention), patch 14,
  merge 2, pixel limits 56*56 .. 112*168 (a 100x150 image gives a 4x5 merged grid); decoder 3 layers,
  4 heads / 2 KV heads, hidden 64, M-RoPE sections [2, 3, 3].
- ``tiny_internvl``: InternViT 2 layers, 56 px tiles, patch 14 -> 4x4 patches -> pixel shuffle 0.5 ->
  2x2 = 4 tokens per tile, 1..4 crops + thumbnail (a 60x130 image gives 2 crops + thumbnail = 12 visual
  tokens); Qwen2 decoder 3 layers, 4 heads / 2 KV heads, hidden 64.
- ``tiny_qwen2_vl``: Qwen2-VL vision 2 blocks (both full attention, no windows), width 32, patch 14,
  merge 2, the same pixel limits and the same decoder as ``tiny_qwen2_5_vl``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "tiny_tokenizer", "tiny_llava", "tiny_llava_next", "TINY_LLAVA_NEXT_PINPOINTS", "tiny_qwen2_5_vl", "tiny_qwen2_vl",
    "tiny_internvl", "tiny_qwen3_vl", "TINY_QWEN_MIN_PIXELS",
    "TINY_QWEN_MAX_PIXELS",
]

TINY_QWEN_MIN_PIXELS = 56 * 56
#: (height, width) resolutions of tiny LLaVA-NeXT: LLaVA-1.6's [[336, 672], [672, 336], [672, 672], [1008, 336],
#: [336, 1008]] divided by 6
TINY_LLAVA_NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
TINY_QWEN_MAX_PIXELS = 112 * 168

_SPECIALS = [
    "<unk>", "<pad>", "<s>", "</s>",
    "<image>",
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
_WORDS = (
    "USER ASSISTANT system user assistant You are a an the helpful is are what which who where how many "
    "much in on of to and or with this that these those there it its image picture photo scene object "
    "objects color colour shape red green blue yellow black white orange purple brown gray pink left right "
    "top bottom middle center above below next person people man woman child cat dog bird car bus truck "
    "tree sky water table chair food animal animals count describe answer question yes no one two three "
    "four five six seven eight nine ten visible shown show does do can see kind type doing holding wearing "
    "sitting standing looking large small big little many few some any all not at by for from as be "
    "word single please briefly"
).split()
_PUNCT = list(":.,?!;'\"()-/") + list("0123456789")


def tiny_tokenizer(extra_specials: tuple[str, ...] = ()) -> Any:
    """A word-level fast tokenizer with the special tokens of both architectures (built in code).

    ``extra_specials`` are appended after the vocabulary (the ids of every other token stay as they are).

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        ``<unk>`` for words outside its ~150-word vocabulary; whitespace and newlines are dropped.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in _SPECIALS + _WORDS + _PUNCT + list(extra_specials):
        if token not in vocab:
            vocab[token] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": _SPECIALS[4:] + list(extra_specials)})
    return tokenizer


def _tiny_clip_llama(tokenizer: Any) -> tuple[Any, Any]:
    """The tiny CLIP vision config (56 px, patch 14, 2 layers) and Llama decoder config (3 layers) of the LLaVAs."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return vision, text


def tiny_llava(seed: int = 0) -> Any:
    """A ready :class:`~posbias.models.llava.LlavaAdapter` around a tiny random LLaVA (fp32, CPU).

    Parameters
    ----------
    seed : int
        ``torch.manual_seed`` for the random weights (same seed, same weights).
    """
    import torch
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from posbias.models.llava import LlavaAdapter

    tokenizer = tiny_tokenizer()
    vision, text = _tiny_clip_llama(tokenizer)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    return LlavaAdapter(model, processor, model_id="tiny-llava", revision=None)


def tiny_llava_next(seed: int = 0) -> Any:
    """A ready :class:`~posbias.models.llava_next.LlavaNextAdapter` around a tiny random LLaVA-NeXT.

    Parameters
    ----------
    seed : int
        ``torch.manual_seed`` for the random weights.
    """
    import torch
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from posbias.models.llava_next import LlavaNextAdapter

    tokenizer = tiny_tokenizer()
    vision, text = _tiny_clip_llama(tokenizer)
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu",
        image_grid_pinpoints=TINY_LLAVA_NEXT_PINPOINTS,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=TINY_LLAVA_NEXT_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    return LlavaNextAdapter(model, processor, model_id="tiny-llava-next", revision=None)


def _qwen_text_config(tokenizer: Any) -> dict[str, Any]:
    """The tiny decoder (3 layers, 4 heads / 2 KV heads, hidden 64, M-RoPE [2, 3, 3]) and special token ids."""
    tid = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return dict(
        text_config=text, image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
    )


def _tiny_qwen(adapter_cls: Any, config_cls: Any, vision: dict[str, Any], seed: int, model_id: str,
               text: dict[str, Any] | None = None) -> Any:
    """Build ``adapter_cls.hf_class`` from ``config_cls(vision_config=vision, ...)`` with seeded weights;
    ``text`` overrides entries of the tiny decoder's config."""
    import torch
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    from posbias.models.processors import QwenImageProcessor

    tokenizer = tiny_tokenizer()
    kwargs = _qwen_text_config(tokenizer)
    kwargs["text_config"].update(text or {})
    config = config_cls(vision_config=vision, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, adapter_cls.hf_class)(config).eval()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=TINY_QWEN_MIN_PIXELS, max_pixels=TINY_QWEN_MAX_PIXELS,
                                               patch_size=int(vision["patch_size"]))
    processor = QwenImageProcessor(image_processor, tokenizer)
    return adapter_cls(model, processor, model_id=model_id, revision=None)


def tiny_qwen2_5_vl(seed: int = 0) -> Any:
    """A ready :class:`~posbias.models.qwen2_5_vl.Qwen25VLAdapter` around a tiny random Qwen2.5-VL.

    Parameters
    ----------
    seed : int
        ``torch.manual_seed`` for the random weights.
    """
    from transformers import Qwen2_5_VLConfig

    from posbias.models.qwen2_5_vl import Qwen25VLAdapter

    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=56, out_hidden_size=64, fullatt_block_indexes=[1],
    )
    return _tiny_qwen(Qwen25VLAdapter, Qwen2_5_VLConfig, vision, seed, "tiny-qwen2.5-vl")


def tiny_qwen2_vl(seed: int = 0) -> Any:
    """A ready :class:`~posbias.models.qwen2_vl.Qwen2VLAdapter` around a tiny random Qwen2-VL.

    Parameters
    ----------
    seed : int
        ``torch.manual_seed`` for the random weights.
    """
    from transformers import Qwen2VLConfig

    from posbias.models.qwen2_vl import Qwen2VLAdapter

    vision = dict(
        depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return _tiny_qwen(Qwen2VLAdapter, Qwen2VLConfig, vision, seed, "tiny-qwen2-vl")


def tiny_qwen3_vl(seed: int = 0) -> Any:
    """A ready :class:`~posbias.models.qwen3_vl.Qwen3VLAdapter` around a tiny random Qwen3-VL: patch 16 (a
    100x150 image -> 3x5 merged grid), 3 vision blocks each feeding deepstack (added after decoder layers 0, 1
    and 2 of the 4-layer decoder, as in the real models: pruning at K=2 comes before the last addition),
    per-head q/k norms, interleaved M-RoPE [2, 3, 3].

    Parameters
    ----------
    seed : int
        ``torch.manual_seed`` for the random weights.
    """
    from transformers import Qwen3VLConfig

    from posbias.models.qwen3_vl import Qwen3VLAdapter

    vision = dict(
        depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0, 1, 2],
    )
    text = dict(num_hidden_layers=4, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                               "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    return _tiny_qwen(Qwen3VLAdapter, Qwen3VLConfig, vision, seed, "tiny-qwen3-vl", text)


def tiny_internvl(seed: int = 0) -> Any:
    """A ready :class:`~posbias.models.internvl.InternVLAdapter` around a tiny random InternVL (fp32, CPU).

    Parameters
    ----------
    seed : int
        ``torch.manual_seed`` for the random weights.
    """
    import torch
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    from posbias.models.internvl import (
        CONTEXT_IMAGE, END_IMAGE, INTERNVL_CHAT_TEMPLATE, START_IMAGE, InternVLAdapter, InternVLImageTextProcessor,
    )

    tokenizer = tiny_tokenizer((START_IMAGE, END_IMAGE, CONTEXT_IMAGE))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=[56, 56], patch_size=[14, 14])
    text = dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    config = InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5, image_seq_length=4,
                            image_token_id=tokenizer.convert_tokens_to_ids(CONTEXT_IMAGE))
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    image_processor = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True,
                                               min_patches=1, max_patches=4)
    processor = InternVLImageTextProcessor(image_processor, tokenizer, chat_template=INTERNVL_CHAT_TEMPLATE,
                                           image_seq_length=4)
    return InternVLAdapter(model, processor, model_id="tiny-internvl", revision=None)
