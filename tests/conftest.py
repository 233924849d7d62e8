"""Shared pytest fixtures: tiny random models of the real architectures and small test images.

Other test files may add fixtures here.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

__all__: list[str] = []


def _noise_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)  # (H, W, 3) uint8
    return Image.fromarray(pixels, mode="RGB")


@pytest.fixture(scope="session")
def tiny_llava_adapter():
    """Tiny random LLaVA (4x4 = 16 visual tokens, 3 decoder layers, GQA 4/2); shared, do not mutate."""
    from posbias.models.tiny import tiny_llava

    return tiny_llava(seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_adapter():
    """Tiny random Qwen2.5-VL (100x150 image -> 4x5 merged grid, 3 decoder layers, GQA 4/2); shared."""
    from posbias.models.tiny import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl(seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_adapter():
    """Tiny random Qwen2-VL (no vision windows; 100x150 image -> 4x5 merged grid, 3 decoder layers); shared."""
    from posbias.models.tiny import tiny_qwen2_vl

    return tiny_qwen2_vl(seed=0)


@pytest.fixture(scope="session")
def noise_image() -> Image.Image:
    """A 100x150 (H x W) RGB noise image, non-square on purpose."""
    return _noise_image(100, 150, seed=0)


@pytest.fixture(scope="session")
def make_noise_image():
    """Factory ``make_noise_image(height, width, seed=0) -> PIL.Image``."""
    return _noise_image
