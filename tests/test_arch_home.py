"""The architecture home: a new architecture is one adapter module + one registry line, nothing in src/.

A TOY architecture is defined here only: a tiny LLaVA whose config says ``model_type = "toy_tiles"`` and whose
16 visual tokens are laid out as TWO tiles of 2x4 (top and bottom half of the image). It is registered with
:func:`posbias.models.registry.register_adapter`, saved to a folder, loaded with ``load_adapter``, profiled
into a real store and pruned with ``enable_pruning`` (the runtime learns the grid and the vision importance
from the toy architecture).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

import posbias.runtime as rt
from posbias.errors import PosbiasError
from posbias.models import registry
from posbias.models.base import TokenGrid
from posbias.models.llava import LlavaAdapter, LlavaArchitecture


class ToyTilesConfig(LlavaConfig):
    model_type = "toy_tiles"


class ToyTilesModel(LlavaForConditionalGeneration):
    config_class = ToyTilesConfig


class ToyTilesArchitecture(LlavaArchitecture):
    """LLaVA's square grid read as two tiles: rows 0..side/2-1 are tile 0, the rest tile 1."""

    model_type: ClassVar[str] = "toy_tiles"
    label: ClassVar[str] = "Toy tiles"

    def fixed_grid(self) -> None:
        return None

    def token_grid(self, inputs: dict[str, Any], visual_index: np.ndarray) -> TokenGrid:
        square = super().token_grid(inputs, visual_index)  # raster over side x side
        side = square.grid[0]
        half = side // 2
        return TokenGrid(rows=square.rows % half, cols=square.cols, tiles=((half, side), (side - half, side)),
                         tile=(square.rows // half).astype(np.int64))

    @classmethod
    def crop_image(cls, image: Any) -> Any:
        w, h = image.size
        return image.crop((0, 0, w, h // 2))  # a rule of its own, to see the report ask for it


class ToyTilesAdapter(LlavaAdapter):
    name: ClassVar[str] = "toy_tiles"
    architecture: ClassVar[type] = ToyTilesArchitecture

    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype="float32", model_id=None, revision=None,
                        hub_kwargs=None, **options):
        from transformers import AutoProcessor

        model = ToyTilesModel.from_pretrained(str(path)).eval()
        processor = AutoProcessor.from_pretrained(str(path))
        return cls(model, processor, model_id=model_id or str(path), revision=revision)


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory, tiny_llava_adapter):
    """The tiny LLaVA saved as a ``toy_tiles`` checkpoint; the toy adapter registered while the module runs."""
    registry.register_adapter("toy_tiles", ToyTilesAdapter)  # the one registry line, from a test file
    folder = tmp_path_factory.mktemp("toy") / "ckpt"
    src = tiny_llava_adapter.model
    cfg = src.config.to_dict()
    cfg.pop("model_type")
    toy = ToyTilesModel(ToyTilesConfig(**cfg)).eval()
    toy.load_state_dict(src.state_dict())
    toy.save_pretrained(folder)
    tiny_llava_adapter.processor.save_pretrained(folder)
    yield folder
    registry.ADAPTERS.pop("toy_tiles", None)


def test_unregistered_architecture_is_one_line_naming_the_supported(tiny_llava_adapter):
    class Other(LlavaConfig):
        model_type = "not_a_vlm_we_know"

    cfg = tiny_llava_adapter.model.config.to_dict()
    cfg.pop("model_type")
    model = LlavaForConditionalGeneration(Other(**cfg))
    assert model.config.model_type == "not_a_vlm_we_know"
    with pytest.raises(PosbiasError) as err:
        rt.enable_pruning(model, method="fastv", keep=4)
    msg = str(err.value)
    assert "\n" not in msg and "'not_a_vlm_we_know'" in msg and "docs/architecture.md" in msg
    assert all(name in msg for name in ("llava", "qwen2_5_vl", "qwen2_vl"))
    with pytest.raises(PosbiasError, match="docs/architecture.md"):
        registry.adapter_class("not_a_vlm_we_know")


def test_toy_architecture_loads_profiles_and_prunes(toy_folder, tmp_path, tiny_llava_adapter):
    from posbias.data.registry import iter_samples, resolve_sources
    from posbias.models import load_adapter
    from posbias.profiler import ProfileStore
    from posbias.profiler.run import profile_samples
    from posbias.profiler.signals import SignalCapture

    adapter = load_adapter(toy_folder)
    assert isinstance(adapter, ToyTilesAdapter) and isinstance(adapter.arch, ToyTilesArchitecture)
    assert registry.architecture_of(adapter.model).model_type == "toy_tiles"
    assert "toy_tiles" in registry.supported_model_types()

    samples = list(iter_samples(resolve_sources(["embedded"]), n=2, seed=0))
    inputs = adapter.prepare(samples[0].image, samples[0].question)
    layout = adapter.layout(inputs)
    assert layout.n_tiles == 2 and layout.tiles == ((2, 4), (2, 4))
    assert layout.tile.tolist() == [0] * 8 + [1] * 8 and layout.rows.max() == 1

    # profile into a real store, through the toy's layout and vision importance
    path = tmp_path / "toy.h5"
    capture = SignalCapture(adapter, signals="attn,vision_importance")
    assert profile_samples(adapter, samples, path, seed=0, progress=False, capture=capture).n_profiled == 2
    with ProfileStore(path) as store:
        assert store.attrs["adapter"] == "toy_tiles"
        attn = store.sample_attn(0)  # (16, L)
        vi = store.sample_token_data("vision_importance", 0)
        assert attn.shape == (16, adapter.n_layers) and vi.shape == (16,)
        assert store.rows[:16].max() == 1  # the toy's tile-local rows reached the store

    # prune: the runtime asks the toy architecture for the grid, scores the stored row
    model = adapter.model
    with torch.no_grad():
        plain = model(**inputs).logits[0, -1]
    with rt.enable_pruning(model, method="fastv", keep=16, layer=1) as pruner:
        with torch.no_grad():
            same = model(**inputs).logits[0, -1]
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)  # keep all: nothing changes
    with rt.enable_pruning(model, method="fastv", keep=5, layer=1) as pruner:
        assert pruner.kind == "toy_tiles"
        with torch.no_grad():
            pruned = model(**inputs).logits[0, -1]
        rec = pruner.last
    assert rec.n_visual == 16 and rec.kept.shape == (5,)
    np.testing.assert_allclose(rec.scoring_rows[1].numpy(), attn[:, 1], atol=1e-5)
    assert np.array_equal(np.sort(rec.kept.numpy()), np.sort(np.argsort(-attn[:, 1], kind="stable")[:5]))
    assert not torch.allclose(pruned, plain, atol=1e-6)
    # the vision importance the runtime computes through the toy architecture equals the stored one
    from posbias.runtime.vision import VisionImportance

    vis = VisionImportance(registry.architecture_of(model))
    vis.attach()
    try:
        with torch.no_grad():
            model(**inputs)
        np.testing.assert_allclose(vis.importance.numpy(), vi, atol=1e-5)
    finally:
        vis.detach()


def test_report_crop_rule_comes_from_the_architecture(toy_folder, make_noise_image):
    from posbias.reports.pictures import crop_for_adapter

    image = make_noise_image(60, 100, 0)  # H x W
    toy = crop_for_adapter(image, "toy_tiles", (2, 4), max_side=40)
    llava = crop_for_adapter(image, "llava", (4, 4), max_side=40)
    unknown = crop_for_adapter(image, "no_such_adapter", (2, 4), max_side=40)
    assert toy.shape == unknown.shape == (20, 40, 3) and llava.shape == (40, 40, 3)
    # toy: top half of the image resized; unknown: the whole image resized (the base rule)
    top = np.asarray(image.crop((0, 0, 100, 30)).resize((40, 20)), dtype=np.uint8)
    whole = np.asarray(image.resize((40, 20)), dtype=np.uint8)
    assert np.array_equal(toy, top) and np.array_equal(unknown, whole) and not np.array_equal(toy, whole)
