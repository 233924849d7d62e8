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
def tiny_qwen3_adapter():
    """Tiny random Qwen3-VL (patch 16: 100x150 image -> 3x5 merged grid; deepstack after decoder layers 0-2 of 4,
    q/k norms, interleaved M-RoPE); shared, do not mutate."""
    from posbias.models.tiny import tiny_qwen3_vl

    return tiny_qwen3_vl(seed=0)


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
_STDLIB = __import__("sysconfig").get_paths()["stdlib"]
#: frames between a caller and the deprecated function that belong to neither (module call dispatch)
_DISPATCH = ("torch/nn/modules/module.py",)


class PosbiasDeprecationError(AssertionError):
    """posbias called something deprecated: a FutureWarning/DeprecationWarning whose caller is posbias code."""


def _package(filename: str) -> str:
    """'posbias', a third-party top-level package name, or '' for stdlib / import machinery / dispatch frames."""
    if filename.startswith(_POSBIAS_SRC):
        return "posbias"
    if filename.startswith("<") or filename.endswith(_DISPATCH):
        return ""
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0]
    if filename.startswith(_STDLIB):
        return ""
    return filename


def _deprecated_call_from_posbias(frame) -> bool:
    """True when the code that called into the warning's package is posbias's: walk out from the frame that
    issued the warning past its own package (and stdlib / nn.Module dispatch frames) to the first other
    package. A deprecation one library triggers in another that posbias merely imported is not counted."""
    issuer = None
    while frame is not None:
        pkg = _package(frame.f_code.co_filename)
        if issuer is None:
            if pkg:
                issuer = pkg
                if pkg == "posbias":
                    return True
        elif pkg and pkg != issuer:
            return pkg == "posbias"
        frame = frame.f_back
    return False


@pytest.fixture(autouse=True)
def posbias_deprecations_are_errors():
    """Every test: a FutureWarning or DeprecationWarning caused by a call in posbias's own code (directly,
    or through nn.Module dispatch) raises :class:`PosbiasDeprecationError` at the warning's call site.
    Other warnings keep pytest's handling."""
    import sys
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always", FutureWarning)
        warnings.simplefilter("always", DeprecationWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, (FutureWarning, DeprecationWarning)):
                if _deprecated_call_from_posbias(sys._getframe(1)):
                    raise PosbiasDeprecationError(f"{category.__name__} from a posbias call: {message}")
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


@pytest.fixture(scope="session")
def tiny_internvl_adapter():
    """Tiny random InternVL (56 px tiles -> 2x2 tokens each; a 60x130 image -> 2 crops + thumbnail); shared."""
    from posbias.models.tiny import tiny_internvl

    return tiny_internvl(seed=0)
