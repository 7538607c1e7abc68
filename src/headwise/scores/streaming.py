"""streamable_mass: the share of a head's attention a streaming cache would keep.

A streaming cache (StreamingLLM; DuoAttention's and RazorAttention's non-retrieval heads)
keeps the first S tokens (attention sinks) and the most recent W tokens. For each query at
position i >= S + W (earlier queries lose nothing) we take the attention mass on keys j < S
or i - W < j <= i, and average over those queries and over the natural-text sequences.
A low value marks a head that reads the middle of the context: it needs the full cache.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import HeadwiseError
from ..geometry import Geometry
from ..instrument import AttentionChunk, sink_window_mask
from ..probes import Probe
from ..roles import RoleRule
from .base import PerSequence, ProbeScoreFamily, Score, ScoreObserver, ScoreResult, Setting, mean_ratio, weighted_sum
from .shared_probes import TEXT_SETTINGS, make_text_probe, text_probe_key


class _StreamingObserver(ScoreObserver):
    def __init__(self, geometry: Geometry, sink_tokens: int, window: int):
        self.sink_tokens, self.window = sink_tokens, window
        self.kept = PerSequence(geometry)
        self.queries = PerSequence(geometry)

    def observe(self, chunk: AttentionChunk) -> None:
        a = chunk.weights
        positions = chunk.query_index + chunk.key_offset  # [q]
        scored = positions >= self.sink_tokens + self.window
        n_scored = int(scored.sum())
        if n_scored == 0:
            return
        keys = torch.arange(a.shape[-1], device=a.device) + chunk.key_offset
        keep = sink_window_mask(positions, keys, self.sink_tokens, self.window) & scored[:, None]  # [q, k]
        self.kept.add(chunk.layer, weighted_sum(a, keep))
        self.queries.add(chunk.layer, torch.full(a.shape[:2], n_scored, dtype=torch.float64))

    def result(self) -> ScoreResult:
        return ScoreResult(scores={"streamable_mass": mean_ratio(self.kept, self.queries)},
                           settings={"sink_tokens": self.sink_tokens, "window": self.window})


class StreamingScores(ProbeScoreFamily):
    family = "streaming"
    scores = (Score("streamable_mass", "share of attention on the first S + last W tokens (what a streaming cache "
                                       "keeps); low = needs the full cache",
                    needs_full="low", default=True,
                    role=RoleRule("streaming", "streamable_mass", ">=", 0.95,
                                  "headwise: a sink + recent-window cache keeps >= 95% of the head's attention "
                                  "mass", precedence=4)),)
    settings = TEXT_SETTINGS + (
        Setting("sink_tokens", 64, "S of streamable_mass: the sink tokens a streaming cache keeps", minimum=1),
        Setting("window", 256, "W of streamable_mass: the recent tokens a streaming cache keeps", minimum=1),
    )

    def probe_key(self, settings: Any) -> tuple:
        return text_probe_key(settings)

    def make_probe(self, tokenizer: Any, geometry: Geometry, settings: Any) -> Probe:
        return make_text_probe(tokenizer, geometry, settings)

    def check_probe(self, probe: Probe, settings: Any) -> None:
        # Queries within the first S + W positions lose nothing to the cache: nothing would be measured.
        if probe.length <= settings.sink_tokens + settings.window:
            raise HeadwiseError(f"streamable_mass needs a context longer than sink + window "
                                f"({settings.sink_tokens} + {settings.window}); raise --context or lower "
                                f"--sink-tokens/--window")

    def observer(self, geometry: Geometry, probe: Probe, settings: Any) -> ScoreObserver:
        return _StreamingObserver(geometry, settings.sink_tokens, settings.window)


__all__ = ["StreamingScores"]
