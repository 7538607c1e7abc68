"""echo and razor_induction: RazorAttention's head scores (Tang et al., arXiv 2407.15891).

Probe: a block of random distinct tokens repeated 4 times. For every query whose token
already occurred earlier (copies 2-4):
- echo = attention on the earlier positions holding the same token;
- razor_induction = attention on the positions right after those earlier copies
  (the token that "came next" last time).
Each head's score is the mean over those queries, then over sequences. RazorAttention keeps
the full cache for the top ~14% induction and ~1% echo heads, taking the max over each KV
group for GQA models: that is the `kv_max` aggregate the atlas stores for every score.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import HeadwiseError
from ..geometry import Geometry
from ..instrument import AttentionChunk
from ..probes import Probe, repeated_tokens
from .base import PerSequence, ProbeScoreFamily, Score, ScoreObserver, ScoreResult, Setting, mean_ratio, weighted_sum
from .shared_probes import BLOCK_LEN


class _RazorObserver(ScoreObserver):
    def __init__(self, geometry: Geometry):
        self.count = PerSequence(geometry)
        self.echo = PerSequence(geometry)
        self.induction = PerSequence(geometry)

    def observe(self, chunk: AttentionChunk) -> None:
        a = chunk.weights
        qi = chunk.query_index
        n_keys = a.shape[-1]
        tokens = self.tokens.to(a.device)[:, :n_keys]  # profiling runs without a cache: key j is token j
        keys = torch.arange(n_keys, device=a.device)
        same = (tokens[:, None, :] == tokens[:, qi][:, :, None]) & (keys[None, None, :] < qi[None, :, None])
        after = torch.zeros_like(same)
        after[..., 1:] = same[..., :-1]  # key j follows an earlier copy at j-1 (so j <= query)
        repeated = same.any(-1)  # [b, q]: queries with an earlier copy
        self.count.add(chunk.layer, repeated.sum(-1)[:, None].expand(-1, a.shape[1]))
        self.echo.add(chunk.layer, weighted_sum(a, same & repeated[:, :, None]))
        self.induction.add(chunk.layer, weighted_sum(a, after & repeated[:, :, None]))

    def result(self) -> ScoreResult:
        return ScoreResult(scores={"echo": mean_ratio(self.echo, self.count),
                                   "razor_induction": mean_ratio(self.induction, self.count)})


class RazorScores(ProbeScoreFamily):
    family = "razor"
    # RazorAttention keeps the whole cache of its top echo and induction heads.
    scores = (
        Score("echo", "RazorAttention echo score: attention on earlier copies of the current token (4x repeated "
                      "block)", needs_full="high", default=True),
        Score("razor_induction", "RazorAttention induction score: attention on the token after earlier copies",
              needs_full="high", default=True),
    )
    settings = (BLOCK_LEN, Setting("razor_sequences", 4, "sequences of the 4x repeated probe (RazorAttention "
                                                         "scores)", minimum=1))
    batch_size = 4

    def probe_key(self, settings: Any) -> tuple:
        return ("repeated", settings.block_len, 4, settings.razor_sequences, settings.seed)

    def make_probe(self, tokenizer: Any, geometry: Geometry, settings: Any) -> Probe:
        return repeated_tokens(tokenizer, geometry.vocab_size, block_len=settings.block_len, repeats=4,
                               n_sequences=settings.razor_sequences, seed=settings.seed, name="repeated_x4")

    def check_probe(self, probe: Probe, settings: Any) -> None:
        if probe.settings.get("repeats", 0) < 2:
            raise HeadwiseError("the RazorAttention scores need a probe of repeated token blocks")

    def observer(self, geometry: Geometry, probe: Probe, settings: Any) -> ScoreObserver:
        return _RazorObserver(geometry)


__all__ = ["RazorScores"]
