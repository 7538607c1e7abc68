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
    """Every KV head keeps every token: plain tensors, like transformers' DynamicLayer."""

    def __init__(self, layer: int, n_kv_heads: int, head_dim: int, reserve: int | None = None):
        super().__init__(layer, n_kv_heads, head_dim)
        self.store = Store(reserve)

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


__all__ = ["FullLayer", "HeadwiseLayer", "Store"]
