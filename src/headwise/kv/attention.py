"""Attention for a layer whose KV heads keep different tokens (kv.cache.MixedLayer).

Full heads: SDPA over every stored key (GQA without repeating keys). Streaming heads: each
query at position t sees the keys at positions j <= t with j < S (sinks) or j > t - W (its
recent window), plus, with compensation, RazorAttention's compensation token: the mean k^
and v^ of the l tokens evicted for that query, entered with logit q.k^ * scale + log(l), i.e.
as l copies of the mean token (RazorAttention, arXiv 2407.15891, eq. 5). During a prefill
the queries are processed in chunks, each against sinks + (chunk + W) keys only, so memory
stays bounded by the chunk, never by the context. With a whole-prompt prefill (Policy.prefill
"whole", RazorAttention's way) a multi-token call lets streaming heads see every key they still
hold plus the call's own; the cache drops what falls out of the window once the layer is done.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import HeadwiseError
from ..instrument import sink_window_mask
from .cache import MixedView, StreamingKeys

CHUNK_BYTES = 8 * 2**20


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


def streaming_heads_attention(query: Tensor, st: StreamingKeys, scaling: float, query_start: int, sink: int,
                              window: int, compensate: bool, chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """Sink + window (+ compensation token) attention of the streaming heads. [b, hq_s, m, d]."""
    b, hq, m, d = query.shape
    n_kv = st.keys.shape[1]
    g = hq // n_kv
    q5 = query.reshape(b, n_kv, g, m, d)
    if m == 1 and st.positions.numel():  # a decoded query: the cache stored it first, so all it holds is visible
        return _decode_step(query, st, scaling, compensate)
    kp = st.positions.to(query.device)
    qpos = torch.arange(query_start, query_start + m, device=query.device)
    n_sinks = int((kp < sink).sum())
    if compensate:
        kp_ns = kp[n_sinks:]
        cs_k = st.keys[:, :, n_sinks:].float().cumsum(2)
        cs_v = st.values[:, :, n_sinks:].float().cumsum(2)
    out = query.new_empty(b, n_kv, g, m, d)
    per_query = b * hq * (n_sinks + min(window, kp.numel()) + 2) * 4 * 3
    step = max(1, min(m, chunk_bytes // max(1, per_query)))
    for a in range(0, m, step):
        e = min(m, a + step)
        qp = qpos[a:e]
        lo = max(n_sinks, int(torch.searchsorted(kp, qp[0] - window, right=True)))
        hi = int(torch.searchsorted(kp, qp[-1], right=True))
        kk = torch.cat([st.keys[:, :, :n_sinks], st.keys[:, :, lo:hi]], 2)
        vv = torch.cat([st.values[:, :, :n_sinks], st.values[:, :, lo:hi]], 2)
        kpc = torch.cat([kp[:n_sinks], kp[lo:hi]])
        allowed = sink_window_mask(qp, kpc, sink, window)
        if not compensate:  # SDPA's fused kernel with the band as its mask (every query sees at least itself)
            out[:, :, :, a:e] = F.scaled_dot_product_attention(
                query[:, :, a:e], kk.to(query.dtype), vv.to(query.dtype), attn_mask=allowed, scale=scaling,
                enable_gqa=g > 1).reshape(b, n_kv, g, e - a, d)
            continue
        # The compensation token's extra logit does not fit SDPA: explicit float32 softmax.
        kk, vv = kk.float(), vv.float()
        qc = q5[:, :, :, a:e].float()
        scores = torch.matmul(qc, kk[:, :, None].transpose(-1, -2)) * scaling  # [b, kv, g, c, K]
        scores = scores.masked_fill(~allowed, float("-inf"))
        n_ev = torch.searchsorted(kp_ns, qp - window, right=True)  # stored non-sink keys evicted per query
        count = (st.comp_count + n_ev).to(torch.float32)
        take = (n_ev - 1).clamp(min=0)
        sum_k = cs_k[:, :, take] * (n_ev > 0)[None, None, :, None] if cs_k.shape[2] else \
            cs_k.new_zeros(b, n_kv, e - a, d)
        sum_v = cs_v[:, :, take] * (n_ev > 0)[None, None, :, None] if cs_v.shape[2] else \
            cs_v.new_zeros(b, n_kv, e - a, d)
        if st.comp_k is not None:
            sum_k = sum_k + st.comp_k[:, :, None]
            sum_v = sum_v + st.comp_v[:, :, None]
        k_hat = sum_k / count.clamp(min=1)[:, None]
        v_hat = sum_v / count.clamp(min=1)[:, None]
        logit = (qc * k_hat[:, :, None]).sum(-1) * scaling + torch.log(count.clamp(min=1))
        logit = logit.masked_fill(count == 0, float("-inf"))
        probs = torch.softmax(torch.cat([scores, logit[..., None]], -1), -1)
        chunk = torch.matmul(probs[..., :-1], vv[:, :, None]) + probs[..., -1:] * v_hat[:, :, None]
        out[:, :, :, a:e] = chunk.to(out.dtype)
    return out.reshape(b, hq, m, d)


def whole_prefill_attention(query: Tensor, st: StreamingKeys, scaling: float, query_start: int, sink: int,
                            compensate: bool) -> Tensor:
    """Streaming heads in a multi-token call of a whole-prompt prefill: causal over every key held. [b, hq_s, m, d]"""
    m = query.shape[2]
    if st.comp_count == 0 and st.positions.numel() == query_start + m:  # nothing dropped yet: plain causal SDPA
        return full_heads_attention(query, st.keys.to(query.dtype), st.values.to(query.dtype), None, scaling)
    # A later prompt chunk: sinks + the window before the call + the call, and the compensation token.
    return streaming_heads_attention(query, st, scaling, query_start, sink, query_start + m + 1, compensate)


def _decode_step(query: Tensor, st: StreamingKeys, scaling: float, compensate: bool) -> Tensor:
    """One query after the cache update: every stored key is in its sinks + window, evicted ones in the sums."""
    b, hq, _, d = query.shape
    n_kv = st.keys.shape[1]
    q = query.float().reshape(b, n_kv, hq // n_kv, d)
    scores = torch.matmul(q, st.keys.float().transpose(-1, -2)) * scaling  # [b, kv, g, K]
    values = st.values.float()
    if compensate and st.comp_count:
        k_hat, v_hat = st.comp_k / st.comp_count, st.comp_v / st.comp_count
        logit = torch.matmul(q, k_hat[..., None]) * scaling + math.log(st.comp_count)  # [b, kv, g, 1]
        scores = torch.cat([scores, logit], -1)
        values = torch.cat([values, v_hat[:, :, None]], 2)
    out = torch.matmul(torch.softmax(scores, -1), values)  # [b, kv, g, d]
    return out.reshape(b, hq, 1, d).to(query.dtype)


def mixed_attention(view: MixedView, query: Tensor, attention_mask: Tensor | None, scaling: float,
                    session: Any = None, **kwargs: Any) -> Tensor:
    """The whole layer's attention output, [batch, queries, q_heads, head_dim]."""
    layer = view.layer
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise HeadwiseError("HeadwiseCache streaming heads do not support attention logit soft-capping or learned "
                            "sinks (Gemma2, gpt-oss); use the full policy for this model")
    if session is not None and session.observers:
        raise HeadwiseError("observers cannot see heads whose cache drops tokens; profile without a HeadwiseCache")
    check_no_padding(attention_mask)
    # Without padding, the mask of a non-sliding layer is plain causal: SDPA's own causal path (flash, no
    # [q, T] mask in memory) does the same; full_heads_attention rebuilds a mask only for chunked prefill.
    attention_mask = None
    b, hq, m, d = query.shape
    if m > 1 and view.call_keys is not None:  # the whole prompt in one call: the full cache's attention
        out = full_heads_attention(query, view.call_keys, view.call_values, None, scaling)
        if layer.middle:
            layer.keep_middle(query, view.call_keys, view.call_values, scaling)
        return out.transpose(1, 2)
    g = hq // layer.n_kv_heads
    out = query.new_empty(b, hq, m, d)
    st = layer.streaming
    full_qi, stream_qi = layer.head_index(g, query.device)
    if len(layer.full_heads):
        out[:, full_qi] = full_heads_attention(query[:, full_qi], view.full_keys, view.full_values, attention_mask,
                                               scaling)
    if len(layer.stream_heads):
        q = query[:, stream_qi]
        if m > 1 and layer.whole_prefill:
            out[:, stream_qi] = whole_prefill_attention(q, view.stream, scaling, view.query_start, st.sink,
                                                        st.compensate)
        else:
            out[:, stream_qi] = streaming_heads_attention(q, view.stream, scaling, view.query_start, st.sink,
                                                          st.window, st.compensate)
    return out.transpose(1, 2)


def naive_sink_window_attention(query: Tensor, keys: Tensor, values: Tensor, scaling: float, sink: int, window: int,
                                compensate: bool = False, whole_calls: list[tuple[int, int]] = (),
                                middle: tuple[int, ...] = ()) -> Tensor:
    """Reference: each query at position t (t = index, all keys given) in an explicit loop. [b, h, T, d].

    For tests: no chunking, no cache, no prefix sums. keys/values already expanded to the
    query heads. `whole_calls`: (start, end) of the multi-token calls of a whole-prompt
    prefill, whose queries see sinks, the `window` tokens before `start`, and the call itself.
    `middle`: positions every query after the first call also sees (Policy.middle).
    """
    b, h, t, d = query.shape
    out = torch.zeros(b, h, t, d, dtype=torch.float64)
    q, k, v = query.double(), keys.double(), values.double()
    first_end = whole_calls[0][1] if whole_calls else 0
    for i in range(t):
        start = next((s for s, e in whole_calls if s <= i < e), None)
        lo = i - window + 1 if start is None else start - window
        kept = middle if i >= first_end else ()
        keep = [j for j in range(i + 1) if j < sink or j >= lo or j in kept]
        dropped = [j for j in range(i + 1) if j not in keep]
        logits = torch.einsum("bhd,bhkd->bhk", q[:, :, i], k[:, :, keep]) * scaling
        vals = v[:, :, keep]
        if compensate and dropped:
            k_hat, v_hat = k[:, :, dropped].mean(2), v[:, :, dropped].mean(2)
            extra = torch.einsum("bhd,bhd->bh", q[:, :, i], k_hat) * scaling + math.log(len(dropped))
            logits = torch.cat([logits, extra[..., None]], -1)
            vals = torch.cat([vals, v_hat[:, :, None]], 2)
        out[:, :, i] = torch.einsum("bhk,bhkd->bhd", torch.softmax(logits, -1), vals)
    return out
