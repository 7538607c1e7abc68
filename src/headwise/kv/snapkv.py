"""SnapKV-style token eviction (Li et al., arXiv 2404.14469), in the same cache framework.

At the end of the prompt (any forward call with more than one query), every KV head keeps
the prompt tokens most attended by the last `observation` (32) prompt queries: their attention
over the prefix, summed over those queries and averaged over the KV group's query heads
(GQA, as kvpress does), smoothed with a 1-D average pool of `kernel` (7), top-k; plus the
observation window itself. Decoded tokens are then appended to every head. Tokens not kept
are freed, so the bytes really shrink (kept keys hold their original rotary positions).
The budget is `budget` x prompt tokens per head (a fraction < 1) or `budget` tokens (>= 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

from ..errors import HeadwiseError
from ..geometry import Geometry
from .attention import KERNEL, OBSERVATION_WINDOW, token_votes
from .layers import PromptEvictionLayer
from .policy import CachePolicy


@dataclass
class SnapKVPolicy(CachePolicy):
    policy_type: ClassVar[str] = "snapkv"
    geometry: Geometry
    budget: float
    observation: int = OBSERVATION_WINDOW  # the last prompt queries whose attention votes
    kernel: int = KERNEL
    name: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    # The whole prompt is attended in full and evicted at its end, so it goes in one call.
    prefill: ClassVar[str] = "whole"
    accepts_chunks: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.budget) or self.budget <= 0:
            raise HeadwiseError(f"SnapKV budget must be positive (a fraction of the prompt or a token count), got "
                                f"{self.budget}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise HeadwiseError(f"SnapKV pooling kernel must be odd and positive, got {self.kernel}")
        if self.observation < 1:
            raise HeadwiseError(f"SnapKV needs at least one observation query, got {self.observation}")
        self.name = self.name or f"snapkv@{self.budget:g}"
        self.source = {"method": "snapkv", "budget": self.budget, "observation": self.observation,
                       "kernel": self.kernel}

    def tokens_kept(self, prompt: int) -> int:
        k = round(self.budget * prompt) if self.budget < 1 else int(self.budget)
        return min(prompt, max(k, self.observation))

    def tokens_held(self, context: int) -> np.ndarray:
        g = self.geometry
        return np.full((g.n_layers, g.n_kv_heads), self.tokens_kept(context))

    def make_layer(self, layer: int, max_length: int | None) -> CacheLayerMixin:
        return SnapKVLayer(layer, self.geometry.n_kv_heads, self.geometry.head_dim, self, max_length)

    def describe(self) -> str:
        return (f"{self.name}: every KV head keeps its top prompt tokens (observation {self.observation}, "
                f"pool {self.kernel})")

    def fields(self) -> dict[str, Any]:
        return {"budget": self.budget, "observation": self.observation, "kernel": self.kernel}

    @classmethod
    def from_fields(cls, geometry: Geometry, fields: dict[str, Any], name: str,
                    source: dict[str, Any]) -> SnapKVPolicy:
        return cls(geometry, float(fields["budget"]), observation=int(fields["observation"]),
                   kernel=int(fields["kernel"]), name=name)


def snapkv_select(query_obs: Tensor, keys: Tensor, scaling: float, keep: int, window: int, kernel: int) -> Tensor:
    """Indices [b, kv, keep] (sorted) of the tokens to keep: the top voted plus the w observation tokens."""
    b, n_kv, t = keys.shape[0], keys.shape[1], keys.shape[2]
    w = query_obs.shape[2]
    votes = token_votes(query_obs, keys, scaling, kernel)
    top = votes.topk(keep - w, dim=-1).indices
    recent = torch.arange(t - w, t, device=keys.device).expand(b, n_kv, w)
    return torch.cat([top, recent], -1).sort(-1).values


class SnapKVLayer(PromptEvictionLayer):
    """Full cache through the prompt, then the SnapKV selection; decoded tokens appended."""

    method = "SnapKV"

    def choose(self, query: Tensor, scaling: float) -> Tensor | None:
        p, t = self.policy, self.store.length
        keep, w = p.tokens_kept(t), min(p.observation, t)
        if keep >= t or t <= w:
            return None
        return snapkv_select(query[:, :, -w:], self.store.keys, scaling, keep, w, p.kernel)


__all__ = ["SnapKVPolicy", "snapkv_select"]
