"""HeadwiseCache: a transformers Cache whose layers a CachePolicy makes.

Per layer: a layer the model itself windows (Gemma3's sliding layers) keeps transformers' own
DynamicSlidingWindowLayer; every other layer is whatever the policy's `make_layer` returns
(head-aware: mixed.MixedLayer or layers.FullLayer; SnapKV: snapkv.SnapKVLayer). `nbytes()` is
what is really allocated, to compare with the policy's predicted `kv_bytes`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from ..errors import HeadwiseError
from .layers import HeadwiseLayer
from .policy import CachePolicy


class HeadwiseCache(Cache):
    """A KV cache that follows a CachePolicy: pass it as `cache=` (transformers 5.2x;
    the older `past_key_values=` still works there, with a deprecation warning).

    `max_length` (prompt + new tokens), when known, lets full heads allocate once.
    """

    def __init__(self, policy: CachePolicy, max_length: int | None = None):
        g = policy.geometry
        # The model's own sliding layers keep transformers' sliding-window layer: its behaviour, untouched.
        layers = [DynamicSlidingWindowLayer(sliding_window=g.sliding_window[layer]) if g.windowed[layer]
                  else policy.make_layer(layer, max_length) for layer in range(g.n_layers)]
        super().__init__(layers=layers)
        self.policy = policy

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[Any, Any]:
        if layer_idx >= len(self.layers):
            raise HeadwiseError(f"the model has more layers than the policy ({len(self.layers)}); build the policy "
                                f"for this model")
        sized = getattr(self.policy, "source", {}).get("budget_dtype_bytes")
        if sized is not None and layer_idx == 0 and sized != key_states.element_size():
            raise HeadwiseError(f"policy '{self.policy.name}' fitted its KV budget for a {sized}-byte dtype, but this "
                                f"model's keys are {str(key_states.dtype).removeprefix('torch.')}; build it for this "
                                f"model: parse_policy(..., dtype_bytes={key_states.element_size()})")
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def nbytes_by_head(self) -> np.ndarray:
        """Allocated KV bytes [layers, kv_heads] (sliding layers: their window split over their heads)."""
        g = self.policy.geometry
        out = np.zeros((g.n_layers, g.n_kv_heads))
        for i, layer in enumerate(self.layers):
            if isinstance(layer, HeadwiseLayer):
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


__all__ = ["HeadwiseCache"]
