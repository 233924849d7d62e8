"""Processors that work without torchvision.

transformers 5.23's ``Qwen2_5_VLProcessor`` refuses to build when torchvision is missing (its video
processor check raises), and there is no CPU build of torchvision here. :class:`QwenImageProcessor`
is a small :class:`~transformers.ProcessorMixin` around ``Qwen2VLImageProcessorPil`` and a tokenizer that
expands ``<|image_pad|>`` to one token per merged patch and returns ``mm_token_type_ids`` (needed for
M-RoPE), i.e. the image half of the official processor.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoTokenizer, ProcessorMixin, Qwen2VLImageProcessorPil

__all__ = ["QwenImageProcessor", "load_qwen_processor"]


class QwenImageProcessor(ProcessorMixin):
    """Image + text processor for Qwen2.5-VL (images only; no video).

    Parameters
    ----------
    image_processor : transformers.Qwen2VLImageProcessorPil
        Resizes to multiples of ``patch_size * merge_size`` within ``[min_pixels, max_pixels]`` and
        flattens patches.
    tokenizer : transformers.PreTrainedTokenizerBase
        Must know ``<|image_pad|>`` (and ``<|video_pad|>`` when present).
    chat_template : str, optional
        Jinja chat template.
    """

    return_mm_token_type_ids = True

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """``<|image_pad|>`` repeated once per merged patch of image ``image_idx``."""
        merge_length = self.image_processor.merge_size**2
        n_tokens = int(image_inputs["image_grid_thw"][image_idx].prod()) // merge_length
        return self.image_token * n_tokens

    @property
    def model_input_names(self) -> list[str]:
        return list(super().model_input_names) + ["mm_token_type_ids"]


def load_qwen_processor(path: str | os.PathLike, *, min_pixels: int | None = None,
                        max_pixels: int | None = None,
                        hub_kwargs: dict[str, Any] | None = None) -> QwenImageProcessor:
    """Build a :class:`QwenImageProcessor` from a checkpoint folder.

    Parameters
    ----------
    path : str or PathLike
        Folder with ``preprocessor_config.json`` and the tokenizer files.
    min_pixels, max_pixels : int, optional
        Override the image processor's pixel limits (they decide the number of visual tokens:
        ``pixels / (28 * 28)`` merged tokens for patch 14, merge 2).
    hub_kwargs : dict, optional
        ``revision``/``cache_dir`` when ``path`` is a hub id.
    """
    kwargs: dict[str, Any] = dict(hub_kwargs or {})
    if min_pixels is not None:
        kwargs["min_pixels"] = int(min_pixels)
    if max_pixels is not None:
        kwargs["max_pixels"] = int(max_pixels)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path), **(hub_kwargs or {}))
    chat_template = getattr(tokenizer, "chat_template", None)
    return QwenImageProcessor(image_processor, tokenizer, chat_template=chat_template)
