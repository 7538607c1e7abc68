"""Head-aware KV cache: full cache for the heads that need it, sinks + window for the rest.

    policy = parse_policy("headwise:streamable_mass@0.25", loaded.geometry, atlas=atlas)
    # or HeadPolicy.from_atlas(atlas, "streamable_mass", full_fraction=0.25)
    cache = HeadwiseCache(policy)
    model.generate(ids, cache=cache, max_new_tokens=20)
    cache.nbytes(), policy.kv_bytes(context)

A new cache policy is one CachePolicy subclass plus `register_policy(name, build)`.
Imported lazily so that `headwise --help` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "CachePolicy": ".policy", "HeadPolicy": ".heads", "SnapKVPolicy": ".snapkv", "CompressKVPolicy": ".compresskv",
    "HeadwiseCache": ".cache",
    "PolicyRequest": ".spec", "parse_policy": ".spec", "register_policy": ".spec", "registered_policies": ".spec",
    "GenerationResult": ".generate", "generate": ".generate", "perplexity": ".generate",
    "EvalSettings": ".evaluate", "evaluate": ".evaluate", "load_eval": ".evaluate",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(name)
    importlib.import_module(".spec", __name__)  # registers the built-in policies and policy-file kinds
    return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
