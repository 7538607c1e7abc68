"""Head-aware KV cache: full cache for the heads that need it, sinks + window for the rest.

    policy = Policy.from_atlas(atlas, score="streamable_mass", full_fraction=0.25)
    cache = HeadwiseCache(policy)
    model.generate(ids, cache=cache, max_new_tokens=20)   # or past_key_values=cache
    cache.nbytes(), cache.nbytes_by_head()

Imported lazily so that `headwise --help` does not load torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HeadwiseCache", "Policy", "SnapKVPolicy"]


def __getattr__(name: str) -> Any:
    if name == "HeadwiseCache":
        from .cache import HeadwiseCache

        return HeadwiseCache
    if name == "Policy":
        from .policy import Policy

        return Policy
    if name == "SnapKVPolicy":
        from .snapkv import SnapKVPolicy

        return SnapKVPolicy
    raise AttributeError(name)
