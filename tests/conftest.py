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
def noise_image() -> Image.Image:
    """A 100x150 (H x W) RGB noise image, non-square on purpose."""
    return _noise_image(100, 150, seed=0)


@pytest.fixture(scope="session")
def make_noise_image():
    """Factory ``make_noise_image(height, width, seed=0) -> PIL.Image``."""
    return _noise_image


# ----------------------------------------------------------------------------- deprecations from posbias calls
_POSBIAS_SRC = __import__("os").path.dirname(__import__("posbias").__file__)


class PosbiasDeprecationError(AssertionError):
    """A FutureWarning/DeprecationWarning was raised while a posbias frame was on the stack."""


def _posbias_frame(frame):
    """The innermost frame of posbias's own code on the stack of ``frame``, or None."""
    while frame is not None:
        if frame.f_code.co_filename.startswith(_POSBIAS_SRC):
            return frame
        frame = frame.f_back
    return None


@pytest.fixture(autouse=True)
def posbias_deprecations_are_errors():
    """Every test: a FutureWarning or DeprecationWarning issued while posbias code is on the call stack
    (posbias called something deprecated, directly or through a library it called) raises
    :class:`PosbiasDeprecationError` at the warning's call site. Other warnings keep pytest's handling."""
    import sys
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always", FutureWarning)
        warnings.simplefilter("always", DeprecationWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, (FutureWarning, DeprecationWarning)):
                frame = _posbias_frame(sys._getframe(1))
                if frame is not None:
                    raise PosbiasDeprecationError(
                        f"{category.__name__} under posbias {frame.f_code.co_filename}:{frame.f_lineno}: {message}"
                    )
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
