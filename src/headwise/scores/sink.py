"""sink: mean attention on the first token over all queries (Gu et al., arXiv 2410.10781).

Heads above 0.3 are counted as sink heads there (the role rule below).
Scored on long natural text.
"""

from __future__ import annotations

from typing import Any

import torch

from ..geometry import Geometry
from ..instrument import AttentionChunk
from ..probes import Probe
from ..roles import RoleRule
from .base import PerSequence, ProbeScoreFamily, Score, ScoreObserver, ScoreResult, mean_ratio
from .shared_probes import TEXT_SETTINGS, make_text_probe, text_probe_key


class _SinkObserver(ScoreObserver):
    def __init__(self, geometry: Geometry):
        self.mass = PerSequence(geometry)
        self.queries = PerSequence(geometry)

    def observe(self, chunk: AttentionChunk) -> None:
        a = chunk.weights
        if chunk.key_offset != 0:  # key 0 is not the first token (a windowed cache dropped it)
            return
        self.mass.add(chunk.layer, a[..., 0].sum(-1))
        self.queries.add(chunk.layer, torch.full(a.shape[:2], a.shape[2], dtype=torch.float64))

    def result(self) -> ScoreResult:
        return ScoreResult(scores={"sink": mean_ratio(self.mass, self.queries)})


class SinkScores(ProbeScoreFamily):
    family = "sink"
    scores = (Score("sink", "mean attention on the first token (Gu et al.); sink heads > 0.3",
                    # A sink head parks its attention on the first token, which every cache keeps.
                    needs_full="low", default=True,
                    role=RoleRule("sink", "sink", ">", 0.3,
                                  "Gu et al. 2024 (arXiv 2410.10781): sink heads put > 0.3 on the first token",
                                  precedence=0)),)
    settings = TEXT_SETTINGS

    def probe_key(self, settings: Any) -> tuple:
        return text_probe_key(settings)

    def make_probe(self, tokenizer: Any, geometry: Geometry, settings: Any) -> Probe:
        return make_text_probe(tokenizer, geometry, settings)

    def observer(self, geometry: Geometry, probe: Probe, settings: Any) -> ScoreObserver:
        return _SinkObserver(geometry)


__all__ = ["SinkScores"]
