"""The storage every cache policy builds on: a growable key/value store and the cache-layer base.

A policy's layer subclasses `HeadwiseLayer` (transformers' CacheLayerMixin with the
bookkeeping and the refusals every headwise layer shares) and keeps its tokens in `Store`s,
so a policy never reaches into another policy's file.

Full-head storage grows in place (capacity +25%, or exactly `reserve` if given) instead of
re-concatenating the whole cache at every decoded token as DynamicLayer does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

from ..errors import HeadwiseError
from .attention import check_no_padding, full_heads_attention
from .quantized import QuantizedStore

GROWTH = 1.25
GROWTH_ALIGN = 16


class Store:
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

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the call's tokens; the keys and values its queries attend to (QuantizedStore's interface)."""
        self.append(k, v)
        return self.keys, self.values

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


class HeadwiseLayer(CacheLayerMixin):
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
        """Allocated bytes per KV head of this layer."""
        raise NotImplementedError


class FullLayer(HeadwiseLayer):
    """Every KV head keeps every token: plain tensors, like transformers' DynamicLayer (`quant` bits: KIVI's
    quantized store)."""

    def __init__(self, layer: int, n_kv_heads: int, head_dim: int, reserve: int | None = None, quant: int = 0):
        super().__init__(layer, n_kv_heads, head_dim)
        self.store = QuantizedStore(head_dim, quant, reserve) if quant else Store(reserve)

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.store.update(key_states, value_states)
        self.seen += key_states.shape[2]
        return keys, values

    @property
    def keys(self) -> Tensor | None:  # what DynamicLayer exposes, for code that reads cache.layers[i].keys
        return self.store.keys if self.is_initialized else None

    @keys.setter
    def keys(self, value: Any) -> None:  # CacheLayerMixin.__init__ assigns None
        pass

    @property
    def values(self) -> Tensor | None:
        return self.store.values if self.is_initialized else None

    @values.setter
    def values(self, value: Any) -> None:
        pass

    def head_bytes(self) -> np.ndarray:
        return np.full(self.n_kv_heads, self.store.per_head_bytes())


class _PromptView:
    """Handed to the attention function for the prompt's call: the full cache's attention, then the eviction."""

    def __init__(self, layer: PromptEvictionLayer, keys: Tensor, values: Tensor):
        self.layer, self.keys, self.values = layer, keys, values

    def headwise_attend(self, module: Any, query: Tensor, attention_mask: Tensor | None, scaling: float,
                        session: Any = None, **kwargs: Any) -> Tensor:
        if session is not None and session.observers:
            raise HeadwiseError("observers cannot see heads whose cache drops tokens; profile without a HeadwiseCache")
        check_no_padding(attention_mask)
        out = full_heads_attention(query, self.keys, self.values, None, scaling)  # no padding: plain causal
        self.layer.evict(query, scaling)
        return out.transpose(1, 2)


class PromptEvictionLayer(HeadwiseLayer):
    """Full cache through the prompt (one call), one eviction at its end, decoded tokens appended: the
    layer of SnapKV-like policies, which say in `choose` which stored tokens each KV head keeps."""

    method: str = "this policy"  # named in the error a second prompt call gets

    def __init__(self, layer: int, n_kv_heads: int, head_dim: int, policy: Any, max_length: int | None = None):
        super().__init__(layer, n_kv_heads, head_dim)
        self.policy = policy
        self.max_length = max_length
        self.store = Store(max_length)
        self.compressed = False

    def choose(self, query: Tensor, scaling: float) -> Tensor | None:  # pragma: no cover - interface
        """Token slots [batch, kv_heads, n] to keep after the prompt (its queries [b, hq, T, d]); None: all."""
        raise NotImplementedError

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.compressed and key_states.shape[2] > 1:
            raise HeadwiseError(f"{self.method} compresses at the end of the prompt; feed the whole prompt in one call")
        self.store.append(key_states, value_states)
        self.seen += key_states.shape[2]
        if key_states.shape[2] > 1:
            view = _PromptView(self, self.store.keys, self.store.values)
            return view, view
        return self.store.keys, self.store.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # After eviction the stored keys no longer line up with positions: the mask covers what is stored.
        return self.store.length + query_length, 0

    def evict(self, query: Tensor, scaling: float) -> None:
        index = self.choose(query, scaling)
        self.compressed = True
        if index is not None:  # room for the tokens still to be decoded, when the caller said how many
            t = self.store.length
            self.store.select(index, room=max(0, self.max_length - t) if self.max_length else 0)

    def head_bytes(self) -> np.ndarray:
        return np.full(self.n_kv_heads, self.store.per_head_bytes())


__all__ = ["FullLayer", "HeadwiseLayer", "PromptEvictionLayer", "Store"]
