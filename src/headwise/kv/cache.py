"""HeadwiseCache: a transformers Cache whose KV heads store either every token or only sinks + a window.

Per layer:
- a layer the model itself windows (Gemma3's sliding layers) keeps transformers' own
  DynamicSlidingWindowLayer: the model's behaviour, untouched;
- a layer whose KV heads are all full stores plain [batch, kv_heads, T, head_dim] tensors and
  hands them to the model like DynamicLayer does (SDPA, token-identical outputs);
- a layer with streaming heads ("mixed") stores its full heads as above and, for each
  streaming head, only the first S tokens, a ring buffer of the last W tokens and, with
  `compensate`, RazorAttention's compensation token (running sums of the evicted keys and
  values), or, with `middle` (whole-prompt prefill only), M prompt tokens from between the
  two chosen by SnapKV's vote. Dropped tokens are freed, not masked: `nbytes()` is what is
  really allocated.
  Its `update` returns a `MixedView` (the same object as keys and values) instead of
  tensors; headwise's attention function sees it and lets kv.attention compute the layer.

Positions: HF models rotate keys (RoPE) before the cache update, so each stored key keeps the
rotation of its ORIGINAL position (DuoAttention's choice). StreamingLLM's paper variant
re-rotates keys to their position inside the cache; headwise does not.

Full-head storage grows in place (capacity +25%, or exactly `max_length` if given) instead
of re-concatenating the whole cache at every decoded token as DynamicLayer does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from ..errors import HeadwiseError

GROWTH = 1.25
GROWTH_ALIGN = 16


class _Store:
    """Growable [batch, heads, capacity, dim] keys and values; the first `length` tokens are valid."""

    def __init__(self, reserve: int | None = None):
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0
        self.reserve = reserve

    def append(self, k: Tensor, v: Tensor) -> None:
        need = self.length + k.shape[2]
        if self.k is None or need > self.k.shape[2]:
            if self.k is None and self.reserve is not None:
                cap = max(need, self.reserve)
            else:
                cap = max(need, int((0 if self.k is None else self.k.shape[2]) * GROWTH))
                cap = -(-cap // GROWTH_ALIGN) * GROWTH_ALIGN
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if self.k is not None:
                new_k[:, :, :self.length] = self.k[:, :, :self.length]
                new_v[:, :, :self.length] = self.v[:, :, :self.length]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length:need] = k
        self.v[:, :, self.length:need] = v
        self.length = need

    @property
    def keys(self) -> Tensor:
        return self.k[:, :, :self.length]

    @property
    def values(self) -> Tensor:
        return self.v[:, :, :self.length]

    def per_head_bytes(self) -> float:
        if self.k is None:
            return 0.0
        return (self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()) / self.k.shape[1]

    def select(self, index: Tensor, room: int = 0) -> None:
        """Keep token slots `index` [batch, heads, n] (SnapKV) in a new buffer with `room` free slots."""
        gather = index[..., None].expand(-1, -1, -1, self.k.shape[-1])
        n = index.shape[-1]
        new_k = self.k.new_empty(self.k.shape[0], self.k.shape[1], n + room, self.k.shape[3])
        new_v = self.v.new_empty(self.v.shape[0], self.v.shape[1], n + room, self.v.shape[3])
        new_k[:, :, :n] = self.keys.gather(2, gather)
        new_v[:, :, :n] = self.values.gather(2, gather)
        self.k, self.v, self.length, self.reserve = new_k, new_v, n, None


class _HeadwiseLayer(CacheLayerMixin):
    """Shared bookkeeping: tokens seen so far and the geometry check."""

    is_sliding = False
    is_croppable = False

    def __init__(self, layer: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.layer, self.n_kv_heads, self.head_dim = layer, n_kv_heads, head_dim
        self.seen = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        if key_states.shape[1] != self.n_kv_heads or key_states.shape[3] != self.head_dim:
            raise HeadwiseError(f"layer {self.layer} hands the cache {key_states.shape[1]} KV heads of dim "
                                f"{key_states.shape[3]}, but the policy was built for {self.n_kv_heads} of dim "
                                f"{self.head_dim}; build the policy for this model")
        self.device = key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def reset(self) -> None:
        raise HeadwiseError("HeadwiseCache cannot be reset; make a new one per prompt")

    def crop(self, tokens_to_remove: int) -> None:
        raise HeadwiseError("HeadwiseCache cannot be cropped (assisted decoding and contrastive search are not "
                            "supported)")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise HeadwiseError("HeadwiseCache does not support beam search; use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise HeadwiseError("HeadwiseCache does not support num_return_sequences > 1")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise HeadwiseError("HeadwiseCache does not support batch selection")

    def head_bytes(self) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class FullLayer(_HeadwiseLayer):
    """Every KV head keeps every token: plain tensors, like transformers' DynamicLayer."""

    def __init__(self, layer: int, n_kv_heads: int, head_dim: int, reserve: int | None = None):
        super().__init__(layer, n_kv_heads, head_dim)
        self.store = _Store(reserve)

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.store.append(key_states, value_states)
        self.seen += key_states.shape[2]
        return self.store.keys, self.store.values

    @property
    def keys(self) -> Tensor | None:  # what DynamicLayer exposes, for code that reads cache.layers[i].keys
        return self.store.keys if self.store.k is not None else None

    @keys.setter
    def keys(self, value: Any) -> None:  # CacheLayerMixin.__init__ assigns None
        pass

    @property
    def values(self) -> Tensor | None:
        return self.store.values if self.store.v is not None else None

    @values.setter
    def values(self, value: Any) -> None:
        pass

    def head_bytes(self) -> np.ndarray:
        return np.full(self.n_kv_heads, self.store.per_head_bytes())


class _Streaming:
    """Sinks + ring buffer (+ compensation sums) of the streaming KV heads of one layer.

    One buffer per tensor: slots [0, S) hold the sinks, slots [S, S + W) the ring. Until the
    ring wraps, what a decoded query sees is the buffer's prefix, handed over without a copy.
    With middle tokens (`add_middle`, once, after a whole-prompt call) the buffer becomes
    [S sinks | M middle | W ring].
    """

    def __init__(self, sink: int, window: int, compensate: bool):
        self.sink, self.window, self.compensate = sink, window, compensate
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
            self._reserve(self.sink, k)
            self.k[:, :, start:start + n_sink] = k[:, :, :n_sink]
            self.v[:, :, start:start + n_sink] = v[:, :, :n_sink]
            self.pos[start:start + n_sink] = torch.arange(start, start + n_sink, device=k.device)
            self.n_sinks = start + n_sink
        k, v = k[:, :, n_sink:], v[:, :, n_sink:]
        n = k.shape[2]
        if n == 0:
            return
        pos = torch.arange(start + n_sink, start + n_sink + n, device=k.device)
        self._reserve(self.ring_at + self.window, k)
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
        from .attention import mixed_attention

        return mixed_attention(self, query, attention_mask, scaling, **kwargs)


class MixedLayer(_HeadwiseLayer):
    """Some KV heads full, the others sinks + window (+ compensation token)."""

    def __init__(self, layer: int, full: np.ndarray, head_dim: int, sink: int, window: int, compensate: bool,
                 reserve: int | None = None, whole_prefill: bool = False, middle: int = 0):
        super().__init__(layer, len(full), head_dim)
        # Multi-token calls: streaming heads attend to all they hold plus the call (Policy.prefill == "whole").
        self.whole_prefill = whole_prefill
        self.middle = middle
        self.full_heads = torch.tensor(np.flatnonzero(full), dtype=torch.long)
        self.stream_heads = torch.tensor(np.flatnonzero(~full), dtype=torch.long)
        self.full = _Store(reserve)
        self.streaming = _Streaming(sink, window, compensate)
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
            self.full.append(key_states.index_select(1, full_idx), value_states.index_select(1, full_idx))
            full_k, full_v = self.full.keys, self.full.values
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

        query [b, hq, T, d]; keys/values: the call's [b, kv, T, d]. Candidates are the tokens between
        the sinks and the ring; the observation queries lie inside the ring.
        """
        from .snapkv import KERNEL, OBSERVATION_WINDOW, snapkv_votes

        st = self.streaming
        t = keys.shape[2]
        lo, hi = st.sink, t - st.window
        if hi <= lo or not len(self.stream_heads):
            return
        w = min(OBSERVATION_WINDOW, st.window)
        kv_idx = self.head_index(1, keys.device)[1]
        q_idx = self.head_index(query.shape[1] // self.n_kv_heads, query.device)[1]
        ks, vs = keys.index_select(1, kv_idx), values.index_select(1, kv_idx)
        votes = snapkv_votes(query[:, q_idx, -w:], ks, scaling, KERNEL)[..., lo:hi]  # [b, n_stream, hi - lo]
        top = votes.topk(min(self.middle, hi - lo), dim=-1).indices.sort(-1).values + lo
        gather = top[..., None].expand(-1, -1, -1, ks.shape[-1])
        st.add_middle(ks.gather(2, gather), vs.gather(2, gather))

    @staticmethod
    def _stored(st: _Streaming, like: Tensor, ordered: bool = True) -> StreamingKeys:
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


class HeadwiseCache(Cache):
    """A KV cache that follows a Policy (or a SnapKVPolicy): pass it as `cache=` (transformers 5.2x;
    the older `past_key_values=` still works there, with a deprecation warning).

    `max_length` (prompt + new tokens), when known, lets full heads allocate once.
    """

    def __init__(self, policy: Any, max_length: int | None = None):
        from .snapkv import SnapKVLayer, SnapKVPolicy

        g = policy.geometry
        layers: list[Any] = []
        for layer in range(g.n_layers):
            if g.windowed[layer]:
                layers.append(DynamicSlidingWindowLayer(sliding_window=g.sliding_window[layer]))
            elif isinstance(policy, SnapKVPolicy):
                layers.append(SnapKVLayer(layer, g.n_kv_heads, g.head_dim, policy, max_length))
            elif policy.full[layer].all():
                layers.append(FullLayer(layer, g.n_kv_heads, g.head_dim, max_length))
            else:
                layers.append(MixedLayer(layer, policy.full[layer], g.head_dim, policy.sink, policy.window,
                                         policy.compensate, max_length, whole_prefill=policy.prefill == "whole",
                                         middle=policy.middle))
        super().__init__(layers=layers)
        self.policy = policy

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[Any, Any]:
        if layer_idx >= len(self.layers):
            raise HeadwiseError(f"the model has more layers than the policy ({len(self.layers)}); build the policy "
                                f"for this model")
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def nbytes_by_head(self) -> np.ndarray:
        """Allocated KV bytes [layers, kv_heads] (sliding layers: their window split over their heads)."""
        g = self.policy.geometry
        out = np.zeros((g.n_layers, g.n_kv_heads))
        for i, layer in enumerate(self.layers):
            if isinstance(layer, _HeadwiseLayer):
                out[i] = layer.head_bytes()
            elif layer.is_initialized and layer.keys is not None:
                out[i] = (layer.keys.numel() * layer.keys.element_size() * 2) / g.n_kv_heads
        return out

    def nbytes(self) -> int:
        return int(round(self.nbytes_by_head().sum()))

    def report(self) -> dict[str, Any]:
        by_head = self.nbytes_by_head()
        return {"total_bytes": int(round(by_head.sum())), "per_layer_bytes": [int(round(x)) for x in by_head.sum(1)],
                "per_head_bytes": [[int(round(x)) for x in row] for row in by_head],
                "tokens_seen": self.get_seq_length()}
