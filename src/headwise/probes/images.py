"""The image probe: a fixed set of images, through the model's own image processor.

Images come from scikit-learn's bundled handwritten digits (the test split, so a model trained
on the training split is probed on images it never saw) or from a directory of PNG/JPEG files.
Either way they become PIL images and pass through the model's image processor, so the pixels
are exactly what the model expects. Labels: the digits' true labels; a directory has none, and
the scores that need labels use the model's own clean predictions instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..digits import digits_split
from ..errors import HeadwiseError
from ..geometry import Geometry
from .base import Probe

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
THUMBNAIL_SIDE = 64  # pixels of the copies the report draws attention over


@dataclass
class ImageProbe(Probe):
    """Images as pixel values [n, C, H, W] (held in `input_ids`, the model's main input), their labels
    (None for unlabelled images), small RGB copies for display and where each image came from."""

    labels: Tensor | None = None
    thumbnails: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1, 3), np.uint8))  # [n, h, w, 3] uint8
    sources: list[str] = field(default_factory=list)
    n_tokens: int = 0

    @property
    def pixel_values(self) -> Tensor:
        return self.input_ids

    @property
    def length(self) -> int:
        return self.n_tokens

    def model_inputs(self, batch: Tensor) -> dict[str, Any]:
        return {"pixel_values": batch}


def _digit_images(count: int, seed: int, offset: int) -> tuple[list[Any], list[int], list[str]]:
    from PIL import Image

    x, y = digits_split()["test"]
    order = np.random.default_rng(seed).permutation(len(x))[offset:offset + count]
    if len(order) == 0:
        raise HeadwiseError(f"the digits' test split has {len(x)} images; none is left after the first {offset}")
    images = [Image.fromarray(np.round(x[i] * 255).astype(np.uint8), mode="L") for i in order]
    return images, [int(y[i]) for i in order], [f"digits-test[{int(i)}]" for i in order]


def _directory_images(directory: Path, count: int, offset: int) -> tuple[list[Any], list[str]]:
    from PIL import Image, UnidentifiedImageError

    if directory.is_file():
        raise HeadwiseError(f"--images {directory} is a file, not a directory; pass a directory of PNG/JPEG files")
    if not directory.is_dir():
        raise HeadwiseError(f"--images {directory}: no such directory; pass a directory of PNG/JPEG files")
    files = sorted(f for f in directory.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise HeadwiseError(f"--images {directory} holds no .png, .jpg or .jpeg files")
    files = files[offset:offset + count]
    if not files:
        raise HeadwiseError(f"--images {directory} holds no images after the first {offset}; add more images")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(_eight_bit(im))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            raise HeadwiseError(f"cannot read image {f} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                                f"remove or replace it") from None
    return images, [str(f) for f in files]


def _eight_bit(image: Any) -> Any:
    """16-bit and 32-bit greyscale scaled to 8 bits (PIL's convert would clip them to white); others as they are."""
    from PIL import Image

    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
        return image.copy()
    a = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(a.max()), 1.0)
    return Image.fromarray(np.clip(np.round(a / top * 255), 0, 255).astype(np.uint8), mode="L")


def _thumbnail(image: Any) -> np.ndarray:
    from PIL import Image

    return np.asarray(image.convert("RGB").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.NEAREST), dtype=np.uint8)


def image_probe(processor: Any, geometry: Geometry, *, count: int = 64, seed: int = 0, images: str | None = None,
                name: str = "images", offset: int = 0) -> ImageProbe:
    """`count` images (bundled digits by default, in a seeded order; else the files of `images`, sorted by
    name), skipping the first `offset` (held-out images for validation)."""
    if geometry.modality != "image":
        raise HeadwiseError("the image probe needs an image model; this model reads text")
    if processor is None:
        raise HeadwiseError("this image model has no image processor; load it with headwise.load or pass "
                            "processor= to headwise.from_model")
    if images is None:
        pil, labels, sources = _digit_images(count, seed, offset)
    else:
        pil, sources = _directory_images(Path(images).expanduser(), count, offset)
        labels = None
    channels = _channels(processor)
    converted = [im.convert("L" if channels == 1 else "RGB") for im in pil]
    try:
        pixels = processor(images=converted, return_tensors="pt")["pixel_values"].float()
    except Exception as e:
        raise HeadwiseError(f"the model's image processor failed on the probe images ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160]})") from None
    where = {} if images is None else {"directory": str(Path(images).expanduser().resolve())}
    settings = {"source": "digits (test split)" if images is None else str(images), **where, "count": len(pil),
                "seed": seed, "offset": offset, "pixel_shape": list(pixels.shape[1:]), "labels": labels is not None}
    return ImageProbe(name=name, input_ids=pixels, settings=settings,
                      labels=None if labels is None else torch.tensor(labels), sources=sources,
                      thumbnails=np.stack([_thumbnail(im) for im in pil]), n_tokens=geometry.n_tokens or 0)


def _channels(processor: Any) -> int:
    mean = getattr(processor, "image_mean", None)
    return len(mean) if isinstance(mean, (list, tuple)) else 3


__all__ = ["IMAGE_SUFFIXES", "ImageProbe", "THUMBNAIL_SIDE", "image_probe"]
