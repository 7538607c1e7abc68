"""The natural-text probe shared by the sink, streaming and distance families."""

from __future__ import annotations

from typing import Any

from ..geometry import Geometry
from ..probes import Probe, natural_text


def text_probe_key(settings: Any) -> tuple:
    return ("text", settings.context, settings.text_sequences, settings.seed, str(settings.text))


def make_text_probe(tokenizer: Any, geometry: Geometry, settings: Any) -> Probe:
    geometry.check_context(settings.context)
    return natural_text(tokenizer, context=settings.context, n_sequences=settings.text_sequences, seed=settings.seed,
                        text=settings.text)
