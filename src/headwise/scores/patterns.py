"""previous_token, duplicate_token, induction: TransformerLens's head detector, "mul" measure.

score = sum(A * P) / sum(A) over one sequence's [query, key] attention pattern A and a 0/1
template P, averaged over the sequences of the repeated-random-tokens probe. Templates, as in
transformer_lens/head_detector.py:
- previous token: P[i, i-1] = 1;
- duplicate token: P[i, j] = 1 where token j equals token i and j < i;
- induction: the duplicate template shifted one key to the right, P[i, j] = dup[i, j-1].
Options exclude_bos (zero the attention on key 0) and exclude_current_token (zero the
diagonal) are applied to A before the ratio, exactly as there. Defaults are TransformerLens's
(both off), so numbers compare directly.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import HeadwiseError
from ..geometry import Geometry
from ..instrument import AttentionChunk
from ..probes import Probe, repeated_tokens
from ..roles import RoleRule
from .base import PerSequence, ProbeScoreFamily, Score, ScoreObserver, ScoreResult, Setting, mean_ratio, weighted_sum
from .shared_probes import BLOCK_LEN


class _PatternObserver(ScoreObserver):
    def __init__(self, geometry: Geometry, exclude_bos: bool, exclude_current_token: bool):
        self.exclude_bos, self.exclude_current = exclude_bos, exclude_current_token
        self.den = PerSequence(geometry)
        self.num = {name: PerSequence(geometry) for name in ("previous_token", "duplicate_token", "induction")}

    def observe(self, chunk: AttentionChunk) -> None:
        a = chunk.weights  # [b, h, q, k]
        qi = chunk.query_index
        n_keys = a.shape[-1]
        tokens = self.tokens.to(a.device)[:, :n_keys]  # profiling runs without a cache: key j is token j
        if self.exclude_bos or self.exclude_current:
            a = a.clone()
            if self.exclude_bos:
                a[..., 0] = 0
            if self.exclude_current:
                a[..., torch.arange(len(qi)), qi] = 0
        keys = torch.arange(n_keys, device=a.device)
        self.den.add(chunk.layer, a.sum((-1, -2)))
        rows = torch.nonzero(qi >= 1).flatten()
        self.num["previous_token"].add(chunk.layer, a[:, :, rows, qi[rows] - 1].sum(-1))
        q_tok = tokens[:, qi]  # [b, q]
        dup = (tokens[:, None, :] == q_tok[:, :, None]) & (keys[None, None, :] < qi[None, :, None])  # [b, q, k]
        self.num["duplicate_token"].add(chunk.layer, weighted_sum(a, dup))
        ind = torch.zeros_like(dup)
        ind[..., 1:] = dup[..., :-1]
        ind &= keys[None, None, :] <= qi[None, :, None]
        self.num["induction"].add(chunk.layer, weighted_sum(a, ind))

    def result(self) -> ScoreResult:
        return ScoreResult(scores={name: mean_ratio(acc, self.den) for name, acc in self.num.items()},
                           settings={"exclude_bos": self.exclude_bos, "exclude_current_token": self.exclude_current,
                                     "measure": "mul (TransformerLens head detector)"})


_TL_CUT = "TransformerLens detector score; 0.4 is the cut used with it in ARENA's induction-head exercises"


class PatternScores(ProbeScoreFamily):
    family = "patterns"
    scores = (
        Score("previous_token", "share of attention on the previous token (TransformerLens detector, mul)",
              default=True, role=RoleRule("previous-token", "previous_token", ">", 0.4, _TL_CUT, precedence=1)),
        Score("duplicate_token", "share of attention on earlier copies of the current token (TransformerLens "
                                 "detector, mul)",
              default=True, role=RoleRule("duplicate-token", "duplicate_token", ">", 0.4, "as previous-token",
                                          precedence=2)),
        # Induction heads copy from anywhere in the context: RazorAttention keeps their whole cache.
        Score("induction", "share of attention on the token after an earlier copy of the current one "
                           "(TransformerLens, mul)",
              needs_full="high", default=True,
              role=RoleRule("induction", "induction", ">", 0.4, "as previous-token", precedence=3)),
    )
    settings = (
        BLOCK_LEN,
        Setting("repeated_sequences", 8, "sequences of the 2x repeated probe (TransformerLens scores)", minimum=1),
        Setting("exclude_bos", False, "TransformerLens detector option: zero the attention on the first token"),
        Setting("exclude_current_token", False, "TransformerLens detector option: zero the attention on the "
                                                "query's own token"),
    )
    batch_size = 8

    def probe_key(self, settings: Any) -> tuple:
        return ("repeated", settings.block_len, 2, settings.repeated_sequences, settings.seed)

    def make_probe(self, tokenizer: Any, geometry: Geometry, settings: Any) -> Probe:
        return repeated_tokens(tokenizer, geometry.vocab_size, block_len=settings.block_len, repeats=2,
                               n_sequences=settings.repeated_sequences, seed=settings.seed, name="repeated")

    def check_probe(self, probe: Probe, settings: Any) -> None:
        if probe.settings.get("repeats", 0) < 2:
            raise HeadwiseError("the pattern scores need a probe of repeated token blocks")

    def observer(self, geometry: Geometry, probe: Probe, settings: Any) -> ScoreObserver:
        return _PatternObserver(geometry, settings.exclude_bos, settings.exclude_current_token)


__all__ = ["PatternScores"]
