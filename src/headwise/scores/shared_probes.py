"""Probes and settings that several families share: natural text (sink, streaming, distance), the
repeated random-token block (patterns, razor) and the image probe (every image family)."""

from __future__ import annotations

from typing import Any

from ..geometry import Geometry
from ..probes import ImageProbe, Probe, image_probe, natural_text
from .base import Setting

TEXT_SETTINGS: tuple[Setting, ...] = (
    Setting("context", 2048, "tokens per natural-text probe sequence (sink, streaming, distance)", minimum=1),
    Setting("text_sequences", 2, "natural-text probe sequences", minimum=1),
)
IMAGE_SETTINGS: tuple[Setting, ...] = (
    Setting("images", None, "directory of PNG/JPEG images for the image probes (default: the bundled digits' "
                            "test split)", kind=str),
    Setting("image_count", 64, "images of the image probe", minimum=1, maximum=4096),
)
BLOCK_LEN = Setting("block_len", 64, "random tokens per block of the repeated-token probes", minimum=2)


def text_probe_key(settings: Any) -> tuple:
    return ("text", settings.context, settings.text_sequences, settings.seed, str(settings.text))


def make_text_probe(tokenizer: Any, geometry: Geometry, settings: Any) -> Probe:
    geometry.check_context(settings.context)
    return natural_text(tokenizer, context=settings.context, n_sequences=settings.text_sequences, seed=settings.seed,
                        text=settings.text)


def image_probe_key(settings: Any) -> tuple:
    return ("images", settings.image_count, settings.seed, str(settings.images))


def make_image_probe(processor: Any, geometry: Geometry, settings: Any) -> ImageProbe:
    return image_probe(processor, geometry, count=settings.image_count, seed=settings.seed, images=settings.images)


__all__ = ["BLOCK_LEN", "IMAGE_SETTINGS", "TEXT_SETTINGS", "image_probe_key", "make_image_probe", "make_text_probe",
           "text_probe_key"]
