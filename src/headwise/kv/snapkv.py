"""SnapKV-style token eviction (Li et al., arXiv 2404.14469), in the same cache framework.

At the end of the prompt (any forward call with more than one query), every KV head keeps
the prompt tokens most attended by the last `window` (32) prompt queries: their attention
over the prefix, summed over those queries and averaged over the KV group's query heads
(GQA, as kvpress does), smoothed with a 1-D average pool of `kernel` (7), top-k; plus the
observation window itself. Decoded tokens are then appended to every head. Tokens not kept
are freed, so the bytes really shrink (kept keys hold their original rotary positions).
The budget is `budget` x prompt tokens per head (a fraction < 1) or `budget` tokens (>= 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import HeadwiseError
from ..geometry import Geometry
from .attention import check_no_padding, full_heads_attention
from .cache import _HeadwiseLayer, _Store

OBSERVATION_WINDOW = 32
KERNEL = 7


@dataclass
class SnapKVPolicy:
    geometry: Geometry
    budget: float
    window: int = OBSERVATION_WINDOW
    kernel: int = KERNEL
    name: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    # The whole prompt is attended in full and evicted at its end, so it goes in one call (as Policy "whole").
    prefill: ClassVar[str] = "whole"

    def __post_init__(self) -> None:
        if self.budget <= 0:
            raise HeadwiseError(f"SnapKV budget must be positive (a fraction of the prompt or a token count), got "
                                f"{self.budget}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise HeadwiseError(f"SnapKV pooling kernel must be odd and positive, got {self.kernel}")
        self.name = self.name or f"snapkv@{self.budget:g}"
        self.source = {"method": "snapkv", "budget": self.budget, "window": self.window, "kernel": self.kernel}

    def tokens_kept(self, prompt: int) -> int:
        k = round(self.budget * prompt) if self.budget < 1 else int(self.budget)
        return min(prompt, max(k, self.window))

    def kv_bytes(self, context: int, batch: int = 1, dtype_bytes: int = 4) -> int:
        g = self.geometry
        per_tok = 2 * g.head_dim * dtype_bytes * batch * g.n_kv_heads
        return sum(per_tok * (min(context, w - 1) if windowed else self.tokens_kept(context))
                   for windowed, w in zip(g.windowed, g.sliding_window))

    def check(self, geometry: Geometry) -> None:
        if (geometry.n_layers, geometry.n_kv_heads, geometry.head_dim) != \
                (self.geometry.n_layers, self.geometry.n_kv_heads, self.geometry.head_dim):
            raise HeadwiseError("SnapKV policy was built for another model's geometry; build it for this model")

    def describe(self) -> str:
        return f"{self.name}: every KV head keeps its top prompt tokens (window {self.window}, pool {self.kernel})"


def snapkv_votes(query_obs: Tensor, keys: Tensor, scaling: float, kernel: int) -> Tensor:
    """How much the last w prompt queries attend to each earlier token, pooled: [b, kv, T - w].

    query_obs: [b, hq, w, d] the last w prompt queries; keys: [b, kv, T, d].
    """
    b, hq, w, _ = query_obs.shape
    n_kv, t = keys.shape[1], keys.shape[2]
    g = hq // n_kv
    k = keys[:, :, None].float()  # [b, kv, 1, T, d]
    q = query_obs.float().reshape(b, n_kv, g, w, -1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [b, kv, g, w, T]
    qpos = torch.arange(t - w, t, device=keys.device)
    scores = scores.masked_fill(torch.arange(t, device=keys.device)[None, :] > qpos[:, None], float("-inf"))
    votes = torch.softmax(scores, -1)[..., :t - w].sum(-2).mean(2)  # [b, kv, T - w]
    return F.avg_pool1d(votes, kernel_size=kernel, padding=kernel // 2, stride=1, count_include_pad=False)


def snapkv_select(query_obs: Tensor, keys: Tensor, scaling: float, keep: int, window: int, kernel: int) -> Tensor:
    """Indices [b, kv, keep] (sorted) of the tokens to keep: the top voted plus the w observation tokens."""
    b, n_kv, t = keys.shape[0], keys.shape[1], keys.shape[2]
    w = query_obs.shape[2]
    votes = snapkv_votes(query_obs, keys, scaling, kernel)
    top = votes.topk(keep - w, dim=-1).indices
    recent = torch.arange(t - w, t, device=keys.device).expand(b, n_kv, w)
    return torch.cat([top, recent], -1).sort(-1).values


class _SnapView:
    def __init__(self, layer: SnapKVLayer, keys: Tensor, values: Tensor):
        self.layer, self.keys, self.values = layer, keys, values

    def headwise_attend(self, module: torch.nn.Module, query: Tensor, attention_mask: Tensor | None, scaling: float,
                        session: Any = None, **kwargs: Any) -> Tensor:
        if session is not None and session.observers:
            raise HeadwiseError("observers cannot see heads whose cache drops tokens; profile without a HeadwiseCache")
        check_no_padding(attention_mask)
        out = full_heads_attention(query, self.keys, self.values, None, scaling)  # no padding: plain causal
        self.layer.compress(query, scaling)
        return out.transpose(1, 2)


class SnapKVLayer(_HeadwiseLayer):
    """Full cache through the prompt, then the SnapKV selection; decoded tokens appended."""

    def __init__(self, layer: int, n_kv_heads: int, head_dim: int, policy: SnapKVPolicy,
                 max_length: int | None = None):
        super().__init__(layer, n_kv_heads, head_dim)
        self.policy = policy
        self.max_length = max_length
        self.store = _Store(max_length)
        self.compressed = False

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.compressed and key_states.shape[2] > 1:
            raise HeadwiseError("SnapKV compresses at the end of the prompt; feed the whole prompt in one call")
        self.store.append(key_states, value_states)
        self.seen += key_states.shape[2]
        if key_states.shape[2] > 1:
            view = _SnapView(self, self.store.keys, self.store.values)
            return view, view
        return self.store.keys, self.store.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # After eviction the stored keys no longer line up with positions: the mask covers what is stored.
        return self.store.length + query_length, 0

    def compress(self, query: Tensor, scaling: float) -> None:
        p = self.policy
        t = self.store.length
        keep = p.tokens_kept(t)
        w = min(p.window, t)
        if keep >= t or t <= w:
            self.compressed = True
            return
        index = snapkv_select(query[:, :, -w:], self.store.keys, scaling, keep, w, p.kernel)
        # Room for the tokens still to be decoded, when the caller said how many (HeadwiseCache max_length).
        self.store.select(index, room=max(0, self.max_length - t) if self.max_length else 0)
        self.compressed = True

    def head_bytes(self) -> np.ndarray:
        return np.full(self.n_kv_heads, self.store.per_head_bytes())
