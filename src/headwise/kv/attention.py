"""Attention primitives every cache policy shares: the full cache's causal SDPA, the padding
refusal, and SnapKV's token vote (which SnapKV evicts by and the head-aware policy picks its
middle tokens by)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import HeadwiseError

# SnapKV's vote (Li et al., arXiv 2404.14469): the last 32 prompt queries, pooled with kernel 7.
OBSERVATION_WINDOW = 32
KERNEL = 7


def check_no_padding(attention_mask: Tensor | None) -> None:
    """Refuse padded batches: sinks would be padding and windows would differ per row."""
    if attention_mask is None:
        return
    last = attention_mask[..., -1, :]
    ok = bool(last.all()) if last.dtype == torch.bool else bool((last == 0).all())
    if not ok:
        raise HeadwiseError("HeadwiseCache with streaming heads or SnapKV does not support padded batches (its sinks "
                            "and windows are positional); run one prompt per call, or use the full policy")


def full_heads_attention(query: Tensor, keys: Tensor, values: Tensor, attention_mask: Tensor | None,
                         scaling: float) -> Tensor:
    """Causal SDPA of the last `m` positions over all T stored keys. [b, hq, m, d]."""
    m, t = query.shape[2], keys.shape[2]
    mask, causal = None, False
    if attention_mask is not None:
        mask = attention_mask[..., -t:]
        if mask.dtype != torch.bool:
            mask = mask.to(query.dtype)
    elif m > 1:
        if m == t:
            causal = True
        else:
            mask = torch.arange(t, device=query.device)[None, :] <= torch.arange(t - m, t, device=query.device)[:, None]
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal, scale=scaling,
                                          enable_gqa=keys.shape[1] != query.shape[1])


def token_votes(query_obs: Tensor, keys: Tensor, scaling: float, kernel: int) -> Tensor:
    """How much the last w prompt queries attend to each earlier token, pooled: [b, kv, T - w].

    query_obs: [b, hq, w, d] the last w prompt queries; keys: [b, kv, T, d].
    """
    b, hq, w, d = query_obs.shape
    n_kv, t = keys.shape[1], keys.shape[2]
    g = hq // n_kv
    # The group's queries as one [g * w, d] matrix: a broadcast over g would copy the keys g times.
    scores = torch.matmul(query_obs.float().reshape(b, n_kv, g * w, d), keys.float().transpose(-1, -2))
    scores = scores.mul_(scaling).view(b, n_kv, g, w, t)
    # Causal: only the observation window's own keys can lie after a query.
    scores[..., t - w:].masked_fill_(torch.ones(w, w, dtype=torch.bool, device=keys.device).triu_(1), float("-inf"))
    votes = torch.softmax(scores, -1)[..., :t - w].sum(-2).mean(2)  # [b, kv, T - w]
    return F.avg_pool1d(votes, kernel_size=kernel, padding=kernel // 2, stride=1, count_include_pad=False)


__all__ = ["KERNEL", "OBSERVATION_WINDOW", "check_no_padding", "full_heads_attention", "token_votes"]
