"""What every KV cache policy is: one small base class (as kvpress has one per press).

A policy says, for a model's geometry, which cache layer each layer gets (`make_layer`) and
how many tokens each KV head holds after `context` tokens (`tokens_held`). From that one
formula (`kv_bytes_by_head`) come the predicted bytes every budget, benchmark and the
report's preview use; `HeadwiseCache.nbytes()` then measures what was really allocated.

Layers the model itself windows (Gemma3's sliding layers) are never a policy's to change:
HeadwiseCache gives them transformers' own sliding-window layer, and they hold
min(context, window - 1) tokens on every KV head whatever the policy.

A new policy is one file: subclass CachePolicy with a `policy_type`, then make it reachable from
the spec grammar with `headwise.kv.register_policy`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from transformers.cache_utils import CacheLayerMixin

from .._schema import POLICY as SCHEMA
from ..errors import HeadwiseError
from ..geometry import Geometry

# How a policy's layers read a prompt: "bounded" (each prompt query of a streaming head sees only
# what that head keeps, so work and memory stay bounded, DuoAttention's way), "whole" (the whole
# prompt in one call, attended in full, then cut: RazorAttention's and SnapKV's way; the default,
# because it keeps the full cache's replies) or "tail" (one call; the streaming heads' queries are
# bounded except the prompt's last N, which attend to the whole prompt: most of bounded's speed,
# and the queries that write the reply see everything).
PREFILL_MODES = ("bounded", "whole", "tail")
_KINDS: dict[str, type[CachePolicy]] = {}


class CachePolicy(ABC):
    """What a HeadwiseCache keeps, per layer and KV head. Subclasses set `policy_type` and hold
    `geometry`, `name` (the spec they were built from) and `source` (how they were chosen)."""

    policy_type: ClassVar[str]  # written as "kind" into policy files
    geometry: Geometry
    name: str
    source: dict[str, Any]
    prefill: str = "whole"
    # Whether the cache takes more multi-token calls after the first (SnapKV evicts once, at the prompt's end).
    accepts_chunks: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("policy_type")
        if kind is None:
            return
        known = _KINDS.get(kind)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise HeadwiseError(f"policy type {kind!r} is already {known.__module__}.{known.__qualname__}; give "
                                f"{cls.__qualname__} another policy_type")
        _KINDS[kind] = cls

    @property
    def one_call_prefill(self) -> bool:
        """Whether the prompt must reach the cache in one call (anything but the bounded prefill reads it whole)."""
        return self.prefill != "bounded"

    # ---- what a policy must say -----------------------------------------------------------
    @abstractmethod
    def make_layer(self, layer: int, max_length: int | None) -> CacheLayerMixin:
        """The cache layer of `layer` (never a layer the model windows itself)."""

    @abstractmethod
    def tokens_held(self, context: int) -> np.ndarray:
        """[layers, kv_heads] tokens each KV head holds after `context` tokens (model-windowed layers:
        any value, the base class sizes them)."""

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    def fields(self) -> dict[str, Any]:
        """What to_dict saves besides schema, kind, name, geometry and source."""

    @classmethod
    @abstractmethod
    def from_fields(cls, geometry: Geometry, fields: dict[str, Any], name: str, source: dict[str, Any]) -> CachePolicy:
        """Rebuild a policy from what `fields` saved."""

    def extra_bytes(self, batch: int = 1) -> np.ndarray:
        """[layers, kv_heads] bytes held beside the tokens (RazorAttention's compensation sums)."""
        g = self.geometry
        return np.zeros((g.n_layers, g.n_kv_heads))

    # ---- the one byte formula ---------------------------------------------------------------
    def kv_bytes_by_head(self, context: int, batch: int = 1, dtype_bytes: int = 4) -> np.ndarray:
        """[layers, kv_heads] predicted KV bytes after `context` tokens (keys + values)."""
        g = self.geometry
        tokens = np.array(self.tokens_held(context), dtype=np.int64).reshape(g.n_layers, g.n_kv_heads)
        for layer, (windowed, w) in enumerate(zip(g.windowed, g.sliding_window)):
            if windowed:
                tokens[layer] = min(context, w - 1)
        per_token = 2 * g.head_dim * dtype_bytes * batch
        return tokens * per_token + self.extra_bytes(batch)

    def kv_bytes(self, context: int, batch: int = 1, dtype_bytes: int = 4) -> int:
        """Predicted KV bytes after `context` tokens (what HeadwiseCache.nbytes() reports)."""
        return int(round(self.kv_bytes_by_head(context, batch, dtype_bytes).sum()))

    # ---- checks and files -------------------------------------------------------------------
    def check(self, geometry: Geometry) -> None:
        """Refuse to run on a model of another geometry than the policy was built for."""
        mine, theirs = self.geometry, geometry
        same = (mine.n_layers, mine.n_kv_heads, mine.head_dim, mine.layer_types, mine.sliding_window) == \
            (theirs.n_layers, theirs.n_kv_heads, theirs.head_dim, theirs.layer_types, theirs.sliding_window)
        if not same:
            raise HeadwiseError(f"policy '{self.name}' was built for {mine.n_layers} layers x {mine.n_kv_heads} KV "
                                f"heads of dim {mine.head_dim}, but the model has {theirs.n_layers} x "
                                f"{theirs.n_kv_heads} of dim {theirs.head_dim} (or other layer types or windows); "
                                f"build the policy from this model's atlas")

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "kind": self.policy_type, "name": self.name, "geometry": self.geometry.to_dict(),
                **self.fields(), "source": self.source}

    @staticmethod
    def from_dict(d: dict[str, Any], *, source: str = "KV policy") -> CachePolicy:
        """Rebuild a saved policy, checked first (_schema.validate_policy): any fault is one line naming the field."""
        from .._schema import validate_policy

        fix = "rebuild it (e.g. save the policy again from its spec)"
        validate_policy(d, source=source, fix=fix)
        kind = d.get("kind", "heads")  # files from before policies had kinds hold a head policy
        if kind not in _KINDS:
            # Kinds register when their modules load; headwise.kv.CachePolicy loads the built-in ones first.
            raise HeadwiseError(f"{source}: field kind {kind!r} is not a known policy kind (known here: "
                                f"{', '.join(sorted(_KINDS)) or 'none'}); load it with headwise.kv.CachePolicy.load, "
                                f"import the module that defines its kind, or {fix}")
        try:
            geometry = Geometry.from_dict(d["geometry"])
            fields = {k: v for k, v in d.items() if k not in ("schema", "kind", "name", "geometry", "source")}
            return _KINDS[kind].from_fields(geometry, fields, str(d["name"]), dict(d.get("source") or {}))
        except HeadwiseError as e:  # the policy class's own checks (e.g. a SnapKV budget)
            raise HeadwiseError(f"{source}: {e}; {fix}") from None
        except (KeyError, TypeError, ValueError) as e:  # fields of other kinds, which the schema leaves to them
            raise HeadwiseError(f"{source}: a {kind} policy field is missing or malformed ({e!r}); {fix}") from None

    def save(self, path: str | Path) -> Path:
        from .._io import write_text_atomic

        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @staticmethod
    def load(path: str | Path) -> CachePolicy:
        from .._schema import load_json_file

        doc = load_json_file(path, what="a KV policy file", fix="pass a policy .json saved by headwise",
                             max_bytes=64 * 2**20)
        return CachePolicy.from_dict(doc, source=str(path))


__all__ = ["PREFILL_MODES", "SCHEMA", "CachePolicy"]
