"""Probes and settings that several families share: natural text (sink, streaming, distance) and the
repeated random-token block (patterns, razor)."""

from __future__ import annotations

from typing import Any

from ..geometry import Geometry
from ..probes import Probe, natural_text
from .base import Setting

TEXT_SETTINGS: tuple[Setting, ...] = (
    Setting("context", 2048, "tokens per natural-text probe sequence (sink, streaming, distance)", minimum=1),
    Setting("text_sequences", 2, "natural-text probe sequences", minimum=1),
)
BLOCK_LEN = Setting("block_len", 64, "random tokens per block of the repeated-token probes", minimum=2)


def text_probe_key(settings: Any) -> tuple:
    return ("text", settings.context, settings.text_sequences, settings.seed, str(settings.text))


def make_text_probe(tokenizer: Any, geometry: Geometry, settings: Any) -> Probe:
    geometry.check_context(settings.context)
    return natural_text(tokenizer, context=settings.context, n_sequences=settings.text_sequences, seed=settings.seed,
                        text=settings.text)


__all__ = ["BLOCK_LEN", "TEXT_SETTINGS", "make_text_probe", "text_probe_key"]
