"""The embedded sample source: real photos shipped inside installed packages, with hand-written questions.

No download, no dataset folder: scikit-image's ``skimage.data`` photos, scikit-learn's sample images and
matplotlib's Grace Hopper portrait, each with several questions grounded in what the photo shows:

* POPE-style object probes, ``"Is there a {object} in the image?"``, for objects present (answer
  ``"yes"``) and absent (``"no"``);
* MME-style yes/no questions ending in ``"Please answer yes or no."``;
* short open questions (``"What color is the cup?"``) with a short reference answer.

Records are in a fixed order (photo order, then question order), so record ``i`` is the same on every
machine. Photos are loaded on first use and cached per photo; a photo that cannot be loaded makes each of
its records raise :class:`~posbias.data.base.BadSample` with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from posbias.data.base import BadSample, Sample, SampleSource
from posbias.errors import PosbiasError

__all__ = ["Photo", "EmbeddedRecord", "EmbeddedSource", "PHOTOS", "RECORDS", "load_photo"]


@dataclass(frozen=True)
class Photo:
    """A photo and where it comes from.

    Attributes
    ----------
    name : str
        Short name, the first part of record keys ("chelsea").
    origin : str
        ``"skimage:<function>"`` (``"skimage:<function>#<i>"`` for element i of a tuple result),
        ``"sklearn:<file>"`` (``sklearn.datasets.load_sample_image``), ``"matplotlib:<file>"``
        (``matplotlib.cbook.get_sample_data``) or ``"file:<path>"``.
    caption : str
        One line saying what the photo shows (documentation; the questions are grounded in it).
    """

    name: str
    origin: str
    caption: str


@dataclass(frozen=True)
class EmbeddedRecord:
    """One (photo, question, answer) record; ``key`` is ``"<photo>/<kind>-<slug>"``."""

    photo: str
    kind: str  # "pope" | "mme" | "open"
    slug: str
    question: str
    answer: str | None

    @property
    def key(self) -> str:
        return f"{self.photo}/{self.kind}-{self.slug}"


PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", "skimage:astronaut", "astronaut Eileen Collins in an orange suit, US flag and shuttle model behind"),
    Photo("coffee", "skimage:coffee", "a red cup of coffee on a red saucer with a spoon, on a wooden table"),
    Photo("chelsea", "skimage:chelsea", "close-up of a tabby cat's face with green-yellow eyes"),
    Photo("rocket", "skimage:rocket", "a rocket on its launch pad at dusk between lightning towers, lights below"),
    Photo("motorcycle", "skimage:stereo_motorcycle#0", "a red motorcycle in a garage with shelves and boxes"),
    Photo("hubble", "skimage:hubble_deep_field", "Hubble deep field: many small galaxies on a black sky"),
    Photo("retina", "skimage:retina", "fundus photograph of a human retina, blood vessels on orange-red"),
    Photo("ihc", "skimage:immunohistochemistry", "microscope image of tissue stained brown (DAB) and blue"),
    Photo("cameraman", "skimage:camera", "grayscale: a man in a dark coat behind a camera on a tripod, on grass"),
    Photo("coins", "skimage:coins", "grayscale: 24 old coins in 4 rows of 6 on a dark background"),
    Photo("brick", "skimage:brick", "grayscale: a wall of bricks seen at an angle"),
    Photo("text", "skimage:text", "grayscale: handwritten mathematical formulas on paper"),
    Photo("china", "sklearn:china.jpg", "a Chinese pagoda with red pillars above trees and a lake"),
    Photo("flower", "sklearn:flower.jpg", "an orange dahlia in front of blurred green leaves"),
    Photo("grace_hopper", "matplotlib:grace_hopper.jpg", "Grace Hopper in a navy uniform and cap, US flag behind"),
    Photo("moon", "skimage:moon", "grayscale: close view of the cratered surface of the moon"),
)


def _pope(photo: str, obj: str, present: bool) -> EmbeddedRecord:
    article = "an" if obj[0] in "aeiou" else "a"
    slug = obj.replace(" ", "-")
    return EmbeddedRecord(photo, "pope", slug, f"Is there {article} {obj} in the image?", "yes" if present else "no")


def _mme(photo: str, slug: str, question: str, yes: bool) -> EmbeddedRecord:
    return EmbeddedRecord(photo, "mme", slug, f"{question} Please answer yes or no.", "yes" if yes else "no")


def _open(photo: str, slug: str, question: str, answer: str | None) -> EmbeddedRecord:
    return EmbeddedRecord(photo, "open", slug, question, answer)


RECORDS: tuple[EmbeddedRecord, ...] = (
    # astronaut
    _pope("astronaut", "person", True),
    _pope("astronaut", "flag", True),
    _pope("astronaut", "helmet", True),
    _pope("astronaut", "dog", False),
    _pope("astronaut", "car", False),
    _mme("astronaut", "spacesuit", "Is the person in this image wearing a spacesuit?", True),
    _mme("astronaut", "underwater", "Was this photo taken underwater?", False),
    _open("astronaut", "suit-color", "What color is the person's suit?", "orange"),
    _open("astronaut", "model", "What kind of vehicle is the model behind the person?", "a space shuttle"),
    # coffee
    _pope("coffee", "cup", True),
    _pope("coffee", "spoon", True),
    _pope("coffee", "saucer", True),
    _pope("coffee", "laptop", False),
    _pope("coffee", "cake", False),
    _mme("coffee", "coffee", "Is this a photo of a cup of coffee?", True),
    _mme("coffee", "glass", "Is the drink served in a glass?", False),
    _open("coffee", "cup-color", "What color is the cup?", "red"),
    _open("coffee", "table", "What is the table made of?", "wood"),
    # chelsea
    _pope("chelsea", "cat", True),
    _pope("chelsea", "dog", False),
    _pope("chelsea", "bird", False),
    _mme("chelsea", "cat", "Is this a photo of a cat?", True),
    _mme("chelsea", "dog", "Is this a photo of a dog?", False),
    _mme("chelsea", "closeup", "Is this a close-up of an animal's face?", True),
    _open("chelsea", "eye-color", "What color are the cat's eyes?", "green"),
    _open("chelsea", "animal", "What animal is shown in the image?", "a cat"),
    # rocket
    _pope("rocket", "rocket", True),
    _pope("rocket", "tower", True),
    _pope("rocket", "boat", False),
    _pope("rocket", "airplane", False),
    _mme("rocket", "launch-pad", "Is there a rocket standing on a launch pad?", True),
    _mme("rocket", "daylight", "Was this photo taken in bright daylight?", False),
    _open("rocket", "sky-color", "What color is the sky?", "dark blue"),
    _open("rocket", "center", "What stands in the middle of the image?", "a rocket"),
    # motorcycle (left frame of skimage's stereo pair)
    _pope("motorcycle", "motorcycle", True),
    _pope("motorcycle", "shelf", True),
    _pope("motorcycle", "box", True),
    _pope("motorcycle", "horse", False),
    _pope("motorcycle", "bus", False),
    _mme("motorcycle", "motorcycle", "Is this a photo of a motorcycle?", True),
    _mme("motorcycle", "outdoors", "Was this photo taken outdoors?", False),
    _open("motorcycle", "color", "What color is the motorcycle?", "red"),
    _open("motorcycle", "wheels", "How many wheels does the motorcycle have?", "2"),
    # hubble deep field
    _pope("hubble", "galaxy", True),
    _pope("hubble", "tree", False),
    _pope("hubble", "person", False),
    _mme("hubble", "space", "Is this an image of outer space?", True),
    _mme("hubble", "city", "Is this a photo of a city at night?", False),
    _open("hubble", "background", "What color is the background?", "black"),
    _open("hubble", "objects", "What are the small bright objects in this image?", "galaxies"),
    # retina
    _pope("retina", "blood vessel", True),
    _pope("retina", "person", False),
    _pope("retina", "car", False),
    _mme("retina", "retina", "Is this a photograph of the retina at the back of an eye?", True),
    _mme("retina", "xray", "Is this an X-ray image?", False),
    _open("retina", "color", "What is the main color of the image?", "orange-red"),
    _open("retina", "shape", "What shape is the bright part of the image?", "a circle"),
    # immunohistochemistry
    _pope("ihc", "cell", True),
    _pope("ihc", "dog", False),
    _pope("ihc", "car", False),
    _mme("ihc", "microscope", "Is this a microscope image of stained tissue?", True),
    _mme("ihc", "landscape", "Is this a photo of a landscape?", False),
    _open("ihc", "colors", "Which two colors dominate the stained tissue?", "brown and blue"),
    _open("ihc", "kind", "What kind of image is this?", "a microscope image of stained tissue"),
    # cameraman
    _pope("cameraman", "person", True),
    _pope("cameraman", "tripod", True),
    _pope("cameraman", "camera", True),
    _pope("cameraman", "bicycle", False),
    _pope("cameraman", "dog", False),
    _mme("cameraman", "grayscale", "Is this a black-and-white photo?", True),
    _mme("cameraman", "indoors", "Was this photo taken indoors?", False),
    _open("cameraman", "doing", "What is the man doing?", "taking a picture with a camera on a tripod"),
    _open("cameraman", "coat", "What color is the man's coat?", "black"),
    # coins
    _pope("coins", "coin", True),
    _pope("coins", "banknote", False),
    _pope("coins", "key", False),
    _mme("coins", "coins", "Is this a photo of coins?", True),
    _mme("coins", "color", "Is this a color photograph?", False),
    _open("coins", "count", "How many coins are in the image?", "24"),
    _open("coins", "rows", "How many rows of coins are there?", "4"),
    _open("coins", "background", "What color is the background?", "black"),
    # brick
    _pope("brick", "brick", True),
    _pope("brick", "window", False),
    _pope("brick", "person", False),
    _mme("brick", "wall", "Is this a photo of a brick wall?", True),
    _mme("brick", "color", "Is this a color photograph?", False),
    _open("brick", "material", "What is the wall made of?", "bricks"),
    # handwritten text
    _pope("text", "person", False),
    _pope("text", "cat", False),
    _mme("text", "handwriting", "Does this image show handwritten text?", True),
    _mme("text", "printed", "Is the text in this image printed by a machine?", False),
    _mme("text", "color", "Is this a color photograph?", False),
    _open("text", "content", "What is written in the image?", "mathematical formulas"),
    # china (sklearn)
    _pope("china", "pagoda", True),
    _pope("china", "tree", True),
    _pope("china", "car", False),
    _pope("china", "elephant", False),
    _mme("china", "chinese", "Is there a traditional Chinese building in this image?", True),
    _mme("china", "desert", "Was this photo taken in a desert?", False),
    _open("china", "pillars", "What color are the pillars of the building?", "red"),
    _open("china", "building", "What kind of building is shown?", "a pagoda"),
    # flower (sklearn)
    _pope("flower", "flower", True),
    _pope("flower", "leaf", True),
    _pope("flower", "vase", False),
    _pope("flower", "cat", False),
    _mme("flower", "flower", "Is this a photo of a flower?", True),
    _mme("flower", "blue", "Is the flower blue?", False),
    _open("flower", "color", "What color is the flower?", "orange"),
    _open("flower", "background", "What color is the background?", "green"),
    # grace hopper (matplotlib)
    _pope("grace_hopper", "person", True),
    _pope("grace_hopper", "flag", True),
    _pope("grace_hopper", "hat", True),
    _pope("grace_hopper", "cat", False),
    _pope("grace_hopper", "umbrella", False),
    _mme("grace_hopper", "glasses", "Is the person wearing glasses?", True),
    _mme("grace_hopper", "uniform", "Is the person wearing a military uniform?", True),
    _mme("grace_hopper", "child", "Is this a photo of a child?", False),
    _open("grace_hopper", "flag-country", "Which country's flag is in the background?", "the United States"),
    _open("grace_hopper", "uniform-color", "What color is the uniform?", "dark blue"),
    # moon
    _pope("moon", "crater", True),
    _pope("moon", "tree", False),
    _pope("moon", "house", False),
    _mme("moon", "moon", "Does this image show the surface of the moon?", True),
    _mme("moon", "color", "Is this a color photograph?", False),
    _open("moon", "surface", "What covers the surface shown in the image?", "craters"),
)


def _to_rgb(data: Any) -> Any:
    """An RGB ``PIL.Image.Image`` from an array (gray, RGB, RGBA; bool, float or uint8) or a PIL image."""
    from PIL import Image

    if isinstance(data, Image.Image):
        return data.convert("RGB")
    arr = np.asarray(data)  # (H, W) or (H, W, C)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        arr = np.clip(arr * scale, 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        return Image.fromarray(arr).convert("RGB")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(arr).convert("RGB")
    raise ValueError(f"unsupported image array shape {arr.shape}")


def load_photo(origin: str) -> Any:
    """Load the photo at ``origin`` (see :class:`Photo`) as an RGB ``PIL.Image.Image``.

    Raises whatever the underlying loader raises (missing file, missing optional download, ...).
    """
    kind, _, ref = origin.partition(":")
    if kind == "skimage":
        import skimage.data

        name, _, item = ref.partition("#")
        data = getattr(skimage.data, name)()
        if item:
            data = data[int(item)]
        return _to_rgb(data)
    if kind == "sklearn":
        from sklearn.datasets import load_sample_image

        return _to_rgb(load_sample_image(ref))
    if kind == "matplotlib":
        from matplotlib import cbook
        from PIL import Image

        with Image.open(cbook.get_sample_data(ref, asfileobj=False)) as im:
            return _to_rgb(im)
    if kind == "file":
        from PIL import Image

        with Image.open(ref) as im:
            return _to_rgb(im)
    raise ValueError(f"unknown photo origin {origin!r}; use skimage:, sklearn:, matplotlib: or file:")


class EmbeddedSource(SampleSource):
    """Photos shipped in installed packages, with hand-written POPE/MME-style and open questions.

    Parameters
    ----------
    name : str
        Source name, the prefix of sample ids (``"embedded:chelsea/pope-cat"``).

    Notes
    -----
    Subclasses may override the class attributes ``photos`` and ``records`` to serve other photos
    (``file:`` origins) with the same loading, caching and error handling.
    """

    photos: Sequence[Photo] = PHOTOS
    records: Sequence[EmbeddedRecord] = RECORDS

    def __init__(self, name: str = "embedded") -> None:
        if not isinstance(name, str) or not name or ":" in name:
            raise PosbiasError(f"source name {name!r} must be a non-empty string without ':'")
        self.name = name
        self._photos = {p.name: p for p in self.photos}
        keys = [r.key for r in self.records]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise PosbiasError(f"source {name!r} has duplicate record keys {dup}; make keys unique")
        unknown = sorted({r.photo for r in self.records} - set(self._photos))
        if unknown:
            raise PosbiasError(f"source {name!r} has records for unknown photos {unknown}; add them to photos")
        self._cache: dict[str, Any] = {}  # photo name -> RGB PIL image
        self._failed: dict[str, str] = {}  # photo name -> reason it failed to load

    @classmethod
    def from_spec(cls, arg: str | None) -> EmbeddedSource:
        """Registry factory: ``--data embedded`` (no path part)."""
        if arg:
            raise PosbiasError(f"source 'embedded' takes no path (got 'embedded:{arg}'); use the source 'embedded'")
        return cls()

    def __len__(self) -> int:
        return len(self.records)

    def _record(self, index: int) -> EmbeddedRecord:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"record index must be an int, got {type(index).__name__}")
        if not 0 <= int(index) < len(self.records):
            raise IndexError(f"record index {index} out of range for source {self.name!r} with {len(self)} records")
        return self.records[int(index)]

    def key(self, index: int) -> str:
        return self._record(index).key

    def _image(self, photo: Photo, sample_id: str) -> Any:
        if photo.name in self._failed:
            raise BadSample(sample_id, self._failed[photo.name])
        if photo.name not in self._cache:
            try:
                self._cache[photo.name] = load_photo(photo.origin)
            except Exception as exc:  # recorded as the skip reason, never swallowed
                reason = f"cannot load photo {photo.name!r} from {photo.origin}: {type(exc).__name__}: {exc}"
                reason = " ".join(reason.split())  # one line
                self._failed[photo.name] = reason
                raise BadSample(sample_id, reason) from exc
        return self._cache[photo.name]

    def load(self, index: int) -> Sample:
        rec = self._record(index)
        sample_id = f"{self.name}:{rec.key}"
        if not rec.question.strip():
            raise BadSample(sample_id, "empty question")
        photo = self._photos[rec.photo]
        image = self._image(photo, sample_id).copy()  # callers may modify their copy
        return Sample(
            id=sample_id,
            source=self.name,
            image=image,
            question=rec.question,
            answer=rec.answer,
            meta={"photo": rec.photo, "kind": rec.kind, "origin": photo.origin},
        )
