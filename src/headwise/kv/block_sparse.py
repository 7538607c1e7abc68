"""Block-sparse prompt attention for streaming heads (`+blocksK`): MInference's block-sparse pattern
(Jiang et al., arXiv 2407.02490) on top of sinks + window.

The prompt is cut into 64-token blocks. A query block of a streaming query head reads
- the sinks,
- the K key blocks whose mean key has the largest dot product with the block's mean query, for each
  query head, among the blocks wholly past the sinks and wholly before the window of the block's
  first query. One choice per KV head would let the group share one gather (with the PyTorch path,
  a prefill 1.31x faster than the full cache's at 8K, against 1.21x), but it lost a development prompt (from the group's
  pooled query) or a held-out one (every head's first choice, then second, ...): bench/RESULTS.md,
- its window (each query t: the keys t - window < j <= t).
A query block with at most K such candidates reads its whole prefix (the pattern would be the whole
prefix anyway).

On CPU the fused kernel of block_sparse_cpu.py computes it (SDPA's flash kernel, called per 64-query
block, costs 3x per key pair what it costs on a long causal call). Where that kernel cannot run, the
three parts are disjoint dense attention calls returning their log-sum-exps, merged exactly by them, so
no masked-out key is computed except in the small [64, window + 64] band.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .block_sparse_cpu import fused_available, fused_block_sparse

BLOCK = 64
CHUNK_BLOCKS = 8  # query blocks per gather: larger chunks fall out of the CPU caches


def candidate_blocks(n_blocks: int, sink: int, window: int) -> Tensor:
    """[query block, key block]: the key blocks a query block may pick, wholly past the sinks and wholly before
    the window of the block's first query."""
    qi, kj = torch.arange(n_blocks)[:, None], torch.arange(n_blocks)[None, :]
    return ((kj + 1) * BLOCK <= qi * BLOCK - window + 1) & (kj * BLOCK >= sink)


def _attend(query: Tensor, keys: Tensor, values: Tensor, bias: Tensor | None, scale: float,
            portable: bool = False) -> tuple[Tensor, Tensor]:
    """Attention output [B, 1, q, d] and its log-sum-exp [B, 1, q] (float32)."""
    if query.device.type == "cpu" and not portable:  # the flash kernel returns its log-sum-exp, fused
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, keys, values, attn_mask=bias,
                                                                              scale=scale)
        return out, lse.float()
    scores = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, -1)
    return torch.matmul(torch.exp(scores - lse[..., None]), values.float()).to(query.dtype), lse


def block_sparse_prefill_attention(query: Tensor, st: Any, scaling: float, sink: int, window: int, blocks: int,
                                   heads: Tensor | None = None, out: Tensor | None = None,
                                   path: str | None = None) -> Tensor:
    """The queries at positions 0 .. m - 1 of `query` [b, h, m, d] (any strides) at the query heads `heads` (default:
    all; kv_s KV heads' groups, in order) over `st`'s keys and values at positions 0 .. n - 1 (n >= m;
    [b, kv_s, n, d]). Written into `out` [b, h, m, d] at those heads (default: a new tensor), which is returned.
    `path` (tests): "fused" (block_sparse_cpu.py, the CPU's default where it builds), "flash" (SDPA's CPU kernel
    per query block) or "portable" (the path other devices take); None: the fastest."""
    b, h_all, m, d = query.shape
    heads = torch.arange(h_all, device=query.device) if heads is None else heads.to(query.device)
    out = query.new_empty(b, h_all, m, d) if out is None else out
    if path is None:  # the kernel reads and writes rows in place: each row's last dimension must be contiguous
        fused = fused_available(query) and query.stride(-1) == 1 and out.stride(-1) == 1
        path = "fused" if fused else "flash" if query.device.type == "cpu" else "portable"
    portable = path == "portable"
    keys, values = st.keys.to(query.dtype), st.values.to(query.dtype)
    n, kv, hq = keys.shape[2], keys.shape[1], len(heads)
    g, nb, mb = hq // kv, -(-n // BLOCK), -(-m // BLOCK)
    # Padding: a padded key sits after every real query (never in its window); padded queries are dropped.
    keys, values = F.pad(keys, (0, 0, 0, nb * BLOCK - n)), F.pad(values, (0, 0, 0, nb * BLOCK - n))
    candidate = candidate_blocks(nb, sink, window)[:mb].to(query.device)
    sparse = (candidate.sum(1) > blocks).nonzero()
    first = int(sparse[0]) if len(sparse) else mb
    e0 = min(m, first * BLOCK)
    if e0:
        out[:, heads, :e0] = F.scaled_dot_product_attention(query[:, heads, :e0], keys[:, :, :e0], values[:, :, :e0],
                                                            is_causal=True, scale=scaling, enable_gqa=hq != kv)
    if first == mb:
        return out
    k_mean = keys.reshape(b, kv, 1, nb, BLOCK, d).float().mean(4)
    q_mean = _block_means(query, m).index_select(1, heads).reshape(b, kv, g, mb, d)  # each query head's own choice
    top = (q_mean @ k_mean.transpose(-1, -2)).masked_fill(~candidate, float("-inf")).topk(blocks, -1).indices
    if path == "fused":  # no copy of the queries: the kernel reads them and writes its output in place
        fused_block_sparse(query, heads, out, keys.reshape(b * kv, -1, d), values.reshape(b * kv, -1, d),
                           _table(top[..., first:, :].reshape(b * hq, mb - first, -1), first, sink, window),
                           blocks, e0, sink, window, scaling)
        return out
    q = F.pad(query[:, heads], (0, 0, 0, mb * BLOCK - m))
    res = torch.empty_like(q)
    top = top + torch.arange(b * kv, device=query.device).reshape(b, kv, 1, 1, 1) * nb  # rows of the block table
    key_blocks, value_blocks = keys.reshape(-1, BLOCK, d), values.reshape(-1, BLOCK, d)
    # The sinks: the same keys for every query of a KV head, so one call for all of them.
    rest = (mb - first) * BLOCK
    if sink:
        sink_out, sink_lse = _attend(q[:, :, e0:].reshape(b * kv, 1, g * rest, d),
                                     keys[:, :, :sink].reshape(b * kv, 1, sink, d),
                                     values[:, :, :sink].reshape(b * kv, 1, sink, d), None, scaling, portable)
        sink_out, sink_lse = sink_out.reshape(b, kv, g, rest, d), sink_lse.reshape(b, kv, g, rest)
    span = window + BLOCK  # a query block's band: the window before its first query, and itself
    t, j = torch.arange(BLOCK, device=query.device)[:, None] + window, torch.arange(span, device=query.device)[None]
    band = torch.zeros(BLOCK, span, dtype=q.dtype, device=query.device).masked_fill_(~((j <= t) & (j > t - window)),
                                                                                     float("-inf")).repeat(g, 1)
    for c0 in range(first, mb, CHUNK_BLOCKS):
        c1 = min(mb, c0 + CHUNK_BLOCKS)
        c = c1 - c0
        q6 = q[:, :, c0 * BLOCK:c1 * BLOCK].reshape(b, kv, g, c, BLOCK, d)
        pick = top[..., c0:c1, :].reshape(-1)  # [b, kv, g, c, blocks]
        picked_out, picked_lse = _attend(q6.reshape(-1, 1, BLOCK, d),
                                         key_blocks.index_select(0, pick).reshape(-1, 1, blocks * BLOCK, d),
                                         value_blocks.index_select(0, pick).reshape(-1, 1, blocks * BLOCK, d), None,
                                         scaling, portable)
        parts = [(picked_out.reshape(q6.shape), picked_lse.reshape(q6.shape[:-1]))]
        # The band is the group's: its query heads share one call over the same keys.
        s0 = c0 * BLOCK - window  # >= sink: a sparse block has candidates past the sinks
        band_keys, band_values = (x[:, :, s0:c1 * BLOCK].unfold(2, span, BLOCK).transpose(-1, -2).reshape(
            b * kv * c, 1, span, d) for x in (keys, values))
        band_out, band_lse = _attend(q6.transpose(2, 3).reshape(b * kv * c, 1, g * BLOCK, d), band_keys, band_values,
                                     band, scaling, portable)
        parts.append((band_out.reshape(b, kv, c, g, BLOCK, d).transpose(2, 3),
                      band_lse.reshape(b, kv, c, g, BLOCK).transpose(2, 3)))
        if sink:
            a0, a1 = (c0 - first) * BLOCK, (c1 - first) * BLOCK
            parts.append((sink_out[..., a0:a1, :].reshape(q6.shape), sink_lse[..., a0:a1].reshape(q6.shape[:-1])))
        top_lse = torch.stack([s for _, s in parts]).amax(0)
        weights = [(s - top_lse).exp_() for _, s in parts]
        merged = sum(o * w[..., None] for (o, _), w in zip(parts, weights)) / sum(weights)[..., None]
        res[:, :, c0 * BLOCK:c1 * BLOCK] = merged.reshape(b, hq, c * BLOCK, d).to(q.dtype)
    out[:, heads, e0:] = res[:, :, e0:m]
    return out


def _block_means(query: Tensor, m: int) -> Tensor:
    """[b, h, query blocks, d] float32: each block's mean query (a ragged last block's sum over 64, as if padded
    with zero queries), read from `query` in place."""
    whole = m // BLOCK
    sums = query[:, :, :whole * BLOCK].unflatten(2, (whole, BLOCK)).sum(3, dtype=torch.float32)
    if m > whole * BLOCK:
        sums = torch.cat([sums, query[:, :, whole * BLOCK:m].sum(2, keepdim=True, dtype=torch.float32)], 2)
    return sums / BLOCK


def _table(top: Tensor, first: int, sink: int, window: int) -> Tensor:
    """The fused kernel's key blocks for query blocks first, first + 1, ... ([rows, NQ, K] picked): the picked
    ones (read whole), then the blocks holding the sinks and the band (the window before the block's first
    query, and the block itself), masked per key."""
    nq = top.shape[1]
    qb = torch.arange(first, first + nq, device=top.device)
    band = torch.div(qb * BLOCK - window + 1, BLOCK, rounding_mode="floor")[:, None] + torch.arange(
        -(-window // BLOCK) + 1, device=top.device)  # the band's first block, and as many as it can span
    band = band.masked_fill(band > qb[:, None], -1)
    masked = torch.cat([torch.arange(-(-sink // BLOCK), device=top.device).expand(nq, -1), band], 1)
    return torch.cat([top, masked.expand(top.shape[0], -1, -1)], 2)


__all__ = ["BLOCK", "block_sparse_prefill_attention", "candidate_blocks"]
