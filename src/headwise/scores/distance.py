"""How far each head looks: attention mass per log2 token-distance bin, mean distance, entropy.

The language-model analogue of the ViT visual-analytics paper's strength-vs-distance profile
(Li et al., arXiv 2303.13731). Distance d = query position - key position; bin 0 holds d = 0,
bin k >= 1 holds 2^(k-1) <= d < 2^k (1, 2-3, 4-7, ...). Per head: the mass in each bin
averaged over queries, the mean distance sum_j A[i, j] (i - j), and the entropy
-sum_j A[i, j] ln A[i, j] (nats), each averaged over queries and natural-text sequences.
"""

from __future__ import annotations

from typing import Any

import torch

from ..geometry import Geometry
from ..instrument import AttentionChunk
from ..probes import Probe
from .base import PerSequence, ProbeScoreFamily, Score, ScoreObserver, ScoreResult, mean_ratio
from .shared_probes import TEXT_SETTINGS, make_text_probe, text_probe_key


def distance_bins(max_distance: int) -> list[tuple[int, int]]:
    """Inclusive [lo, hi] distance ranges: (0,0), (1,1), (2,3), (4,7), ... up to max_distance."""
    bins = [(0, 0)]
    k = 1
    while 2 ** (k - 1) <= max_distance:
        bins.append((2 ** (k - 1), 2**k - 1))
        k += 1
    return bins


class _DistanceObserver(ScoreObserver):
    def __init__(self, geometry: Geometry, context: int):
        self.bins = distance_bins(context - 1)
        self.lo = torch.tensor([b[0] for b in self.bins])
        self.hi = torch.tensor([b[1] for b in self.bins])
        self.profile = PerSequence(geometry, len(self.bins))
        self.distance = PerSequence(geometry)
        self.entropy = PerSequence(geometry)
        self.queries = PerSequence(geometry)

    def observe(self, chunk: AttentionChunk) -> None:
        a = chunk.weights
        b, h, q, n_keys = a.shape
        qi = chunk.query_index
        keys = torch.arange(n_keys, device=a.device, dtype=a.dtype)
        self.queries.add(chunk.layer, torch.full((b, h), q, dtype=torch.float64))
        self.distance.add(chunk.layer, (qi.to(a.dtype) * a.sum(-1) - a @ keys).sum(-1))
        log_a = torch.log(a).clamp_(min=-1e4)  # log 0 -> finite, so 0 * log 0 = 0 (xlogy is 2x slower)
        self.entropy.add(chunk.layer, -(a * log_a).sum((-1, -2)))
        del log_a
        # Mass on keys [qi - hi, qi - lo] = C(qi - lo + 1) - C(qi - hi), C(n) = mass on keys < n.
        upper = (qi[:, None] - self.lo[None, :] + 1).clamp(0, n_keys)
        lower = torch.minimum((qi[:, None] - self.hi[None, :]).clamp(0, n_keys), upper)
        cs = a.cumsum(-1)

        def mass_before(n: torch.Tensor) -> torch.Tensor:
            idx = (n - 1).clamp_min(0).expand(b, h, q, -1)
            return cs.gather(-1, idx) * (n > 0).to(a.dtype)

        self.profile.add(chunk.layer, (mass_before(upper) - mass_before(lower)).sum(2))

    def result(self) -> ScoreResult:
        n, den = self.profile.all(), self.queries.all()
        profile = (n / den[..., None].clamp_min(1)).mean(0).numpy()
        return ScoreResult(
            scores={"mean_distance": mean_ratio(self.distance, self.queries),
                    "entropy": mean_ratio(self.entropy, self.queries)},
            profiles={"distance": {"bins": [list(x) for x in self.bins], "values": profile,
                                   "description": "attention mass per token-distance bin [lo, hi], mean over queries"}},
        )


class DistanceScores(ProbeScoreFamily):
    family = "distance"
    # Heads that look far or spread their attention read the middle of the context: they need it whole.
    scores = (
        Score("mean_distance", "mean token distance of the attention (query position - key position)",
              needs_full="high", default=True),
        Score("entropy", "mean entropy of the attention distribution, nats", needs_full="high", default=True),
    )
    settings = TEXT_SETTINGS

    def probe_key(self, settings: Any) -> tuple:
        return text_probe_key(settings)

    def make_probe(self, tokenizer: Any, geometry: Geometry, settings: Any) -> Probe:
        return make_text_probe(tokenizer, geometry, settings)

    def observer(self, geometry: Geometry, probe: Probe, settings: Any) -> ScoreObserver:
        return _DistanceObserver(geometry, probe.length)


__all__ = ["DistanceScores", "distance_bins"]
