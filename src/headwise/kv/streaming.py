"""What a streaming KV head keeps, and how its queries attend.

A streaming head keeps the first S tokens (attention sinks), a ring buffer of the last W
tokens and, with `compensate`, RazorAttention's compensation token (running sums of the
evicted keys and values), or, after a whole-prompt prefill, M middle tokens chosen by the
token vote. Each query at position t sees the keys at positions j <= t with j < S (sinks) or
j > t - W (its recent window), plus, with compensation, the mean k^ and v^ of the l tokens
evicted for that query, entered with logit q.k^ * scale + log(l), i.e. as l copies of the mean
token (RazorAttention, arXiv 2407.15891, eq. 5). During a prefill the queries are processed in
chunks, each against sinks + (chunk + W) keys only, so memory stays bounded by the chunk, never
by the context.

Positions: HF models rotate keys (RoPE) before the cache update, so each stored key keeps the
rotation of its ORIGINAL position (DuoAttention's choice). StreamingLLM's paper variant
re-rotates keys to their position inside the cache; headwise does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import HeadwiseError
from ..instrument import sink_window_mask
from .attention import full_heads_attention

CHUNK_BYTES = 8 * 2**20


class StreamingBuffer:
    """Sinks + ring buffer (+ compensation sums) of the streaming KV heads of one layer.

    One buffer per tensor: slots [0, S) hold the sinks, slots [S, S + W) the ring. Until the
    ring wraps, what a decoded query sees is the buffer's prefix, handed over without a copy.
    With middle tokens (`add_middle`, once, after a whole-prompt call) the buffer becomes
    [S sinks | M middle | W ring]. With `limit` (the most tokens the sequence will have, when the
    caller knows it), a sequence shorter than S + W allocates only what it can fill, so the bytes
    held are the policy's prediction.
    """

    def __init__(self, sink: int, window: int, compensate: bool, limit: int | None = None):
        self.sink, self.window, self.compensate, self.limit = sink, window, compensate, limit
        self.k: Tensor | None = None  # [batch, heads, S (+ M) + W, dim]
        self.v: Tensor | None = None
        self.pos: Tensor | None = None  # position held by each slot (-1: empty)
        self.n_sinks = 0
        self.n_middle = 0
        self.ring_len = 0
        self.ring_next = 0
        self.comp_k: Tensor | None = None  # float32 sums of evicted keys / values [batch, heads, dim]
        self.comp_v: Tensor | None = None
        self.comp_count = 0

    @property
    def ring_at(self) -> int:
        """First slot of the ring."""
        return self.sink + self.n_middle

    @property
    def ring_k(self) -> Tensor | None:
        return None if self.k is None or self.k.shape[2] == self.ring_at else self.k[:, :, self.ring_at:]

    @property
    def ring_pos(self) -> Tensor | None:
        return None if self.pos is None or self.pos.numel() == self.ring_at else self.pos[self.ring_at:]

    def _reserve(self, slots: int, like: Tensor) -> None:
        """Grow the buffer to `slots` (the sinks first; sinks + window once a token lands in the ring)."""
        if self.k is not None and self.k.shape[2] >= slots:
            return
        b, h, _, d = like.shape
        k, v = like.new_empty(b, h, slots, d), like.new_empty(b, h, slots, d)
        pos = torch.full((slots,), -1, dtype=torch.long, device=like.device)
        if self.k is not None:
            n = self.k.shape[2]
            k[:, :, :n], v[:, :, :n], pos[:n] = self.k, self.v, self.pos
        self.k, self.v, self.pos = k, v, pos

    def visible(self, ordered: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Everything held (sinks, then the ring), with positions; `ordered`: sorted by position."""
        if self.k is None:
            return None, None, None
        if self.ring_len < self.window or self.ring_next == 0 or not ordered:  # a prefix of the buffer, in order
            n = self.n_sinks + self.n_middle + self.ring_len
            return self.k[:, :, :n], self.v[:, :, :n], self.pos[:n]
        s = self.ring_at
        order = torch.cat([torch.arange(s), s + torch.arange(self.ring_next, self.window),
                           s + torch.arange(0, self.ring_next)]).to(self.k.device)
        return self.k[:, :, order], self.v[:, :, order], self.pos[order]

    def _evict(self, k: Tensor, v: Tensor) -> None:
        if not self.compensate or k.shape[2] == 0:
            return
        if self.comp_k is None:
            self.comp_k = k.new_zeros(k.shape[0], k.shape[1], k.shape[3], dtype=torch.float32)
            self.comp_v = v.new_zeros(v.shape[0], v.shape[1], v.shape[3], dtype=torch.float32)
        self.comp_k += k.float().sum(2)
        self.comp_v += v.float().sum(2)
        self.comp_count += k.shape[2]

    def append(self, k: Tensor, v: Tensor, start: int) -> None:
        """Store tokens at positions start .. start + n - 1, evicting what falls out of the window."""
        n = k.shape[2]
        n_sink = max(0, min(n, self.sink - start))
        if n_sink:
            self._reserve(self.sink if self.limit is None else min(self.sink, self.limit), k)
            self.k[:, :, start:start + n_sink] = k[:, :, :n_sink]
            self.v[:, :, start:start + n_sink] = v[:, :, :n_sink]
            self.pos[start:start + n_sink] = torch.arange(start, start + n_sink, device=k.device)
            self.n_sinks = start + n_sink
        k, v = k[:, :, n_sink:], v[:, :, n_sink:]
        n = k.shape[2]
        if n == 0:
            return
        pos = torch.arange(start + n_sink, start + n_sink + n, device=k.device)
        need = min(self.window, self.ring_len + n)  # a sequence longer than `limit` still gets its slots
        self._reserve(self.ring_at + (self.window if self.limit is None else
                                      min(self.window, max(need, self.limit - self.sink))), k)
        s, w = self.ring_at, self.window
        ring_k, ring_v, ring_pos = self.k[:, :, s:], self.v[:, :, s:], self.pos[s:]
        if n >= w:  # the new tokens alone fill the window: everything older is evicted
            if self.ring_len:
                old_k, old_v, _ = self.visible()
                self._evict(old_k[:, :, self.ring_at:], old_v[:, :, self.ring_at:])
            self._evict(k[:, :, :n - w], v[:, :, :n - w])
            ring_k.copy_(k[:, :, n - w:])
            ring_v.copy_(v[:, :, n - w:])
            ring_pos.copy_(pos[n - w:])
            self.ring_len, self.ring_next = w, 0
            return
        if n == 1:  # decode: the next slot, without index tensors; once the ring is full it holds the oldest token
            j = self.ring_next
            if self.ring_len == w:
                self._evict(ring_k[:, :, j:j + 1], ring_v[:, :, j:j + 1])
            ring_k[:, :, j:j + 1] = k
            ring_v[:, :, j:j + 1] = v
            ring_pos[j] = start + n_sink
        else:
            slots = (self.ring_next + torch.arange(n, device=k.device)) % w
            n_old = max(0, self.ring_len + n - w)
            if n_old:  # the last n_old slots written still hold the oldest tokens: evict them
                evict = slots[n - n_old:]
                self._evict(ring_k[:, :, evict], ring_v[:, :, evict])
            ring_k[:, :, slots] = k
            ring_v[:, :, slots] = v
            ring_pos[slots] = pos
        self.ring_len = min(w, self.ring_len + n)
        self.ring_next = (self.ring_next + n) % w

    def add_middle(self, k: Tensor, v: Tensor) -> None:
        """Insert M kept middle tokens [batch, heads, M, dim] between the sinks and the (full) ring.

        Their slots get placeholder positions S .. S + M - 1: each head keeps other tokens, all of
        them earlier than the ring and later than the sinks, and only that order is ever used
        (every held key is visible to the queries after a whole-prompt call).
        """
        if self.n_middle or self.compensate or self.n_sinks < self.sink or self.ring_len < self.window:
            raise HeadwiseError("middle tokens are added once, after a whole prompt longer than sinks + window, "
                                "and not with the compensation token")
        m = k.shape[2]
        old_k, old_v, old_pos = self.visible()  # sinks, then the ring in order
        s = self.sink
        self.k = torch.cat([old_k[:, :, :s], k.to(old_k.dtype), old_k[:, :, s:]], 2)
        self.v = torch.cat([old_v[:, :, :s], v.to(old_v.dtype), old_v[:, :, s:]], 2)
        self.pos = torch.cat([old_pos[:s], torch.arange(s, s + m, device=old_pos.device), old_pos[s:]])
        self.n_middle, self.ring_next = m, 0

    def per_head_bytes(self) -> float:
        total = 0.0
        if self.k is not None:
            total += (self.k.numel() * self.k.element_size() * 2) / self.k.shape[1]
        if self.comp_k is not None:
            total += (self.comp_k.numel() * 4 * 2) / self.comp_k.shape[1]
        return total


@dataclass
class StreamingKeys:
    """What the streaming heads of a mixed layer attend to for one call.

    keys/values [batch, n_stream, K, dim] sorted by `positions` [K] (sinks first); comp_* are
    the compensation sums/count of tokens evicted BEFORE these keys' window started.
    """

    keys: Tensor
    values: Tensor
    positions: Tensor
    comp_k: Tensor | None
    comp_v: Tensor | None
    comp_count: int


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


def strided_prefill_attention(query: Tensor, st: StreamingKeys, scaling: float, sink: int, window: int, stride: int,
                              chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """The prompt's first call, sinks + window + a stride: the query at t also sees the tokens j <= t - window at
    j = sink + stride - 1, sink + 2 stride - 1, ... (the sparse pattern for the middle of the prompt; every
    stride-th one of the tokens the bounded prefill drops). `st` holds the call's keys at positions 0 .. n - 1.
    [b, hq_s, m, d]"""
    b, hq, m, d = query.shape
    n = st.keys.shape[2]
    keys, values = st.keys.to(query.dtype), st.values.to(query.dtype)
    first = sink + stride - 1
    strided = torch.arange(first, max(first, n), stride, device=query.device)
    out = torch.empty_like(query)
    per_query = b * hq * (sink + len(strided) + window + 2) * 4 * 3
    step = max(1, min(m, chunk_bytes // max(1, per_query)))
    for a in range(0, m, step):
        e = min(m, a + step)
        lo = max(sink, a - window + 1)  # the chunk's first query's window; earlier tokens only on the stride
        kp = torch.cat([torch.arange(min(sink, e), device=query.device), strided[strided < lo],
                        torch.arange(lo, max(lo, e), device=query.device)])  # a chunk inside the sinks: no band
        t, j = torch.arange(a, e, device=query.device)[:, None], kp[None, :]
        seen = (j <= t) & ((j < sink) | (j > t - window) | ((j - sink) % stride == stride - 1))
        out[:, :, a:e] = F.scaled_dot_product_attention(query[:, :, a:e], keys[:, :, kp], values[:, :, kp],
                                                        attn_mask=seen, scale=scaling,
                                                        enable_gqa=hq != keys.shape[1])
    return out


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


__all__ = ["StreamingBuffer", "StreamingKeys", "streaming_heads_attention", "strided_prefill_attention",
           "whole_prefill_attention"]
