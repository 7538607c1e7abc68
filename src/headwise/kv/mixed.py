"""The layer of the head-aware policy: some KV heads keep every token, the others stream.

Its full heads store plain [batch, n_full, T, dim] tensors; its streaming heads a
StreamingBuffer (sinks + ring, optionally the compensation token or middle tokens). Dropped
tokens are freed, not masked: `head_bytes()` is what is really allocated. Its `update` returns
a `MixedView` (the same object as keys and values) instead of tensors; headwise's attention
function sees the view's `headwise_attend` and lets `mixed_attention` compute the layer.

With a whole-prompt prefill (RazorAttention's way) the first call attends like the full
cache (streaming heads see the whole prompt), and the layer keeps sinks + window once it has
been computed; with middle tokens, the M prompt tokens between them that the token vote of the
prompt's last queries picks. With the tail prefill the first call is the same one call, but the
streaming heads' queries attend to sinks + window except the prompt's last N (`_tail_prefill`),
in every layer but the first L (`+earlyL`), which read the prompt as the whole prefill does; with
`+strideK` those bounded queries also see every K-th earlier token, with `+blocksK` the K key
blocks their query block picks (block_sparse.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import HeadwiseError
from .attention import KERNEL, OBSERVATION_WINDOW, check_no_padding, full_heads_attention, token_votes
from .block_sparse import block_sparse_prefill_attention
from .layers import HeadwiseLayer, Store
from .quantized import QuantizedStore
from .streaming import (
    StreamingBuffer,
    StreamingKeys,
    streaming_heads_attention,
    strided_prefill_attention,
    whole_prefill_attention,
)


@dataclass
class MixedView:
    """Handed to the attention function in place of key/value tensors by a mixed layer."""

    layer: MixedLayer
    full_keys: Tensor | None  # [batch, n_full, T, dim]
    full_values: Tensor | None
    stream: StreamingKeys
    query_start: int  # position of the first query of this call
    # The first call of a whole-prompt prefill: every head attends to every key of the call, so the layer is
    # computed as the full cache computes it, from the call's own [batch, kv_heads, n, dim] keys and values.
    call_keys: Tensor | None = None
    call_values: Tensor | None = None

    def headwise_attend(self, module: torch.nn.Module, query: Tensor, attention_mask: Tensor | None, scaling: float,
                        **kwargs: Any) -> Tensor:
        return mixed_attention(self, query, attention_mask, scaling, **kwargs)


class MixedLayer(HeadwiseLayer):
    """Some KV heads full, the others sinks + window (+ compensation token)."""

    def __init__(self, layer: int, full: np.ndarray, head_dim: int, sink: int, window: int, compensate: bool,
                 reserve: int | None = None, whole_prefill: bool = False, middle: int = 0, tail: int | None = None,
                 stride: int = 0, blocks: int = 0, quant: int = 0):
        super().__init__(layer, len(full), head_dim)
        # Multi-token calls: streaming heads attend to all they hold plus the call (prefill "whole" or "tail").
        self.whole_prefill = whole_prefill
        self.middle = middle
        # The prompt's one call: streaming heads' queries before its last `tail` see sinks + window only (None: none).
        self.tail = tail
        self.stride = stride  # ... and, K > 0, see every K-th earlier token too (sinks + window + a stride)
        self.blocks = blocks  # ... or the K key blocks their query block picks (block_sparse.py)
        self.full_heads = torch.tensor(np.flatnonzero(full), dtype=torch.long)
        self.stream_heads = torch.tensor(np.flatnonzero(~full), dtype=torch.long)
        self.full = QuantizedStore(head_dim, quant, reserve) if quant else Store(reserve)  # KIVI's, with +qB
        self.streaming = StreamingBuffer(sink, window, compensate, limit=reserve)
        self._index: dict[tuple[int, Any], tuple[Tensor, Tensor]] = {}

    def head_index(self, group: int, device: Any) -> tuple[Tensor, Tensor]:
        """Indices of the full and the streaming heads' query heads (group 1: the KV heads), on `device`."""
        key = (group, device)
        if key not in self._index:  # built once: decoding calls this twice per layer and token
            self._index[key] = tuple((h[:, None] * group + torch.arange(group)).flatten().to(device)
                                     for h in (self.full_heads, self.stream_heads))
        return self._index[key]

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, n = self.seen, key_states.shape[2]
        full_k = full_v = None
        call: tuple[Tensor | None, Tensor | None] = (None, None)
        full_idx, stream_idx = self.head_index(1, key_states.device)
        if len(self.full_heads):
            full_k, full_v = self.full.update(key_states.index_select(1, full_idx),
                                              value_states.index_select(1, full_idx))
        sk, sv = key_states.index_select(1, stream_idx), value_states.index_select(1, stream_idx)
        st = self.streaming
        if n == 1:
            # Decode: store first, then the buffer holds exactly what this query may see.
            st.append(sk, sv, start)
            stream = self._stored(st, sk, ordered=False)
        else:
            # Prefill: the queries need the window as it was before this call plus all new keys.
            before = self._stored(st, sk)
            new_pos = torch.arange(start, start + n, device=sk.device)
            if before.keys.shape[2] == 0:  # the first call: no copy of a whole prompt's keys
                stream = StreamingKeys(sk, sv, new_pos, None, None, 0)
                if self.whole_prefill and start == 0:
                    call = (key_states, value_states)
            else:
                stream = StreamingKeys(torch.cat([before.keys, sk], 2), torch.cat([before.values, sv], 2),
                                       torch.cat([before.positions, new_pos]),
                                       None if before.comp_k is None else before.comp_k.clone(),
                                       None if before.comp_v is None else before.comp_v.clone(), before.comp_count)
            st.append(sk, sv, start)
        self.seen += n
        view = MixedView(self, full_k, full_v, stream, start, *call)
        return view, view

    def keep_middle(self, query: Tensor, keys: Tensor, values: Tensor, scaling: float) -> None:
        """After the prompt's one call: each streaming head also keeps the `middle` evicted prompt tokens
        that its KV group's last prompt queries attend to most, by SnapKV's vote (summed over the
        last 32 queries, averaged over the group, pooled with kernel 7).

        query [b, hq, T, d]; keys/values: the call's streaming KV heads' [b, kv_s, T, d]. Candidates are the
        tokens between the sinks and the ring; the observation queries lie inside the ring.
        """
        st = self.streaming
        t = keys.shape[2]
        lo, hi = st.sink, t - st.window
        if hi <= lo or not len(self.stream_heads):
            return
        w = min(OBSERVATION_WINDOW, st.window)
        q_idx = self.head_index(query.shape[1] // self.n_kv_heads, query.device)[1]
        votes = token_votes(query[:, q_idx, -w:], keys, scaling, KERNEL)[..., lo:hi]  # [b, n_stream, hi - lo]
        top = votes.topk(min(self.middle, hi - lo), dim=-1).indices.sort(-1).values + lo
        gather = top[..., None].expand(-1, -1, -1, keys.shape[-1])
        st.add_middle(keys.gather(2, gather), values.gather(2, gather))

    @staticmethod
    def _stored(st: StreamingBuffer, like: Tensor, ordered: bool = True) -> StreamingKeys:
        # Decoding needs no order (every stored key is visible to the one query): no gather, no copy.
        keys, values, positions = st.visible(ordered)
        if keys is None:
            empty = like[:, :, :0]
            return StreamingKeys(empty, empty, torch.empty(0, dtype=torch.long, device=like.device), None, None, 0)
        return StreamingKeys(keys, values, positions, st.comp_k, st.comp_v, st.comp_count)

    def head_bytes(self) -> np.ndarray:
        out = np.zeros(self.n_kv_heads)
        out[self.full_heads.numpy()] = self.full.per_head_bytes()
        out[self.stream_heads.numpy()] = self.streaming.per_head_bytes()
        return out


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
    if m > 1 and view.call_keys is not None:  # the whole prompt in one call
        if layer.tail is not None and layer.tail < m and len(layer.stream_heads):
            out = _tail_prefill(view, query, scaling)
        else:  # the full cache's attention
            out = full_heads_attention(query, view.call_keys, view.call_values, None, scaling)
        if layer.middle:
            layer.keep_middle(query, view.stream.keys, view.stream.values, scaling)  # the call's, streaming heads
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


def _tail_prefill(view: MixedView, query: Tensor, scaling: float) -> Tensor:
    """The prompt's one call under the tail prefill, [b, hq, m, d]: full heads attend causally to the whole
    prompt; streaming heads' queries attend to sinks + window (+ every `stride`-th earlier token, or + the
    `blocks` key blocks of block_sparse.py), except the last `tail`, which attend to the whole prompt (their keys
    are the call's, so nothing is dropped before they have seen it)."""
    layer = view.layer
    st, m = layer.streaming, query.shape[2]
    g = query.shape[1] // layer.n_kv_heads
    full_qi, stream_qi = layer.head_index(g, query.device)
    out = torch.empty_like(query)
    if len(layer.full_heads):  # from the call's own keys, as the whole prefill (stored ones may be quantized)
        full_kv = layer.head_index(1, query.device)[0]
        out[:, full_qi] = full_heads_attention(query[:, full_qi], view.call_keys.index_select(1, full_kv),
                                               view.call_values.index_select(1, full_kv), None, scaling)
    keys, cut = view.stream, m - layer.tail
    if layer.blocks:  # written into `out` in place: no copy of the streaming heads' queries and outputs
        block_sparse_prefill_attention(query[:, :, :cut], keys, scaling, st.sink, st.window, layer.blocks,
                                       heads=stream_qi, out=out[:, :, :cut])
    elif layer.stride:
        out[:, stream_qi, :cut] = strided_prefill_attention(query[:, stream_qi, :cut], keys, scaling, st.sink,
                                                            st.window, layer.stride)
    else:
        out[:, stream_qi, :cut] = streaming_heads_attention(query[:, stream_qi, :cut], keys, scaling, 0, st.sink,
                                                            st.window, st.compensate)
    if cut < m:
        out[:, stream_qi, cut:] = full_heads_attention(query[:, stream_qi, cut:], keys.keys.to(query.dtype),
                                                       keys.values.to(query.dtype), None, scaling)
    return out


__all__ = ["MixedLayer", "MixedView", "mixed_attention"]
