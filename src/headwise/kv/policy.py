"""Which KV heads keep the full cache and which keep only attention sinks + a recent window.

A `Policy` is a [layers, kv_heads] boolean matrix (True = full cache) plus the streaming
shape (S sink tokens, W recent tokens, optional RazorAttention compensation token) and how
streaming heads read a prompt (`prefill`):
- "window" (DuoAttention): every prompt query of a streaming head sees sinks + its window
  only, so prefill work and memory stay bounded by the window;
- "whole" (RazorAttention, SnapKV): streaming heads attend to the whole prompt, and each
  layer's cache is cut to sinks + window as soon as that layer has been computed. The first
  reply token comes from full attention; KV memory during the prefill is the compressed
  cache plus one layer's keys, but attention work is the full cache's. With `middle` = M,
  streaming heads also keep the M prompt tokens between sinks and window that their last
  prompt queries attend to most (SnapKV's vote), as Task-KV keeps "middle activations" for
  its non-heterogeneous heads.
The
decision is per KV head: every query head of a GQA group reads the same stored keys. Layers
the model itself windows (Gemma3's sliding layers) keep the model's own cache whatever the
matrix says; they are never counted as selectable heads.

Builders: `Policy.full`, `Policy.streaming` (StreamingLLM: every head streaming),
`Policy.random` (the control), `Policy.from_atlas` (any per-head score),
`Policy.from_duo_file` (a DuoAttention gate matrix). `SnapKVPolicy` is the token-eviction
baseline (kv/snapkv.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import HeadwiseError
from ..geometry import Geometry

# DuoAttention's deployment shape (arXiv 2410.10819): 64 sink tokens + 256 recent tokens.
DEFAULT_SINK = 64
DEFAULT_WINDOW = 256
# StreamingLLM's 4 attention sinks.
STREAMINGLLM_SINK = 4
PREFILL_MODES = ("window", "whole")
# Scores for which a LOW value marks a head that needs the full cache; all others: high = full.
LOW_MEANS_FULL = {"streamable_mass", "sink"}


def _bytes_per_token(geometry: Geometry, dtype_bytes: int) -> int:
    """Bytes one token costs in one KV head (key + value)."""
    return 2 * geometry.head_dim * dtype_bytes


@dataclass
class Policy:
    """full[l, h] = True: KV head h of layer l keeps every token; False: sinks + window only."""

    geometry: Geometry
    full: np.ndarray
    sink: int = DEFAULT_SINK
    window: int = DEFAULT_WINDOW
    compensate: bool = False
    name: str = "custom"
    source: dict[str, Any] = field(default_factory=dict)
    prefill: str = "window"
    # Streaming heads also keep this many prompt tokens from between sinks and window, picked by
    # SnapKV's vote of the prompt's last queries (whole-prompt prefill only; cache.keep_middle).
    middle: int = 0

    def __post_init__(self) -> None:
        g = self.geometry
        self.full = np.asarray(self.full, dtype=bool)
        if self.full.shape != (g.n_layers, g.n_kv_heads):
            raise HeadwiseError(f"policy '{self.name}' is a {self.full.shape[0]} x {self.full.shape[1]} matrix but the "
                                f"model has {g.n_layers} layers x {g.n_kv_heads} KV heads; build the policy for "
                                f"this model")
        if self.sink < 0 or self.window < 1:
            raise HeadwiseError(f"streaming heads need sink >= 0 and window >= 1 (got sink={self.sink}, "
                                f"window={self.window})")
        if self.prefill not in PREFILL_MODES:
            raise HeadwiseError(f"prefill must be one of {', '.join(PREFILL_MODES)}, not '{self.prefill}'")
        if self.middle < 0:
            raise HeadwiseError(f"middle tokens must be >= 0, got {self.middle}")
        if self.middle and (self.prefill != "whole" or self.compensate):
            raise HeadwiseError("middle tokens are chosen from a whole-prompt prefill and do not combine with the "
                                "compensation token: use +whole and drop +comp")
        # The model's own sliding layers are not ours to change: mark them full (their cache is the model's window).
        self.full[list(self.model_windowed_layers)] = True

    # ---- what the policy says ---------------------------------------------------------------
    @property
    def model_windowed_layers(self) -> tuple[int, ...]:
        return tuple(i for i, w in enumerate(self.geometry.windowed) if w)

    @property
    def selectable(self) -> np.ndarray:
        """[layers, kv_heads] True where the policy decides (not a model-windowed layer)."""
        sel = np.ones_like(self.full)
        sel[list(self.model_windowed_layers)] = False
        return sel

    @property
    def n_selectable(self) -> int:
        return int(self.selectable.sum())

    @property
    def n_full(self) -> int:
        return int((self.full & self.selectable).sum())

    @property
    def full_fraction(self) -> float:
        return self.n_full / max(1, self.n_selectable)

    @property
    def all_full(self) -> bool:
        return bool(self.full.all())

    def kind(self, layer: int, kv_head: int) -> str:
        if layer in self.model_windowed_layers:
            return "model-window"
        return "full" if self.full[layer, kv_head] else "streaming"

    def kv_bytes(self, context: int, batch: int = 1, dtype_bytes: int = 4) -> int:
        """Predicted KV bytes after `context` tokens (what HeadwiseCache.nbytes() should report)."""
        g = self.geometry
        per_tok = _bytes_per_token(g, dtype_bytes) * batch
        total = 0
        for layer in range(g.n_layers):
            if g.windowed[layer]:
                total += g.n_kv_heads * per_tok * min(context, g.sliding_window[layer] - 1)
                continue
            for h in range(g.n_kv_heads):
                if self.full[layer, h]:
                    total += per_tok * context
                else:
                    total += per_tok * min(context, self.sink + self.window + self.middle)
                    if self.compensate:  # float32 running sums of keys and values
                        total += 2 * g.head_dim * 4 * batch
        return total

    def check(self, geometry: Geometry) -> None:
        """Refuse a policy made for another model's geometry."""
        mine = (self.geometry.n_layers, self.geometry.n_kv_heads, self.geometry.head_dim,
                self.geometry.layer_types)
        theirs = (geometry.n_layers, geometry.n_kv_heads, geometry.head_dim, geometry.layer_types)
        if mine != theirs:
            raise HeadwiseError(f"policy '{self.name}' was built for {mine[0]} layers x {mine[1]} KV heads of dim "
                                f"{mine[2]}, but the model has {theirs[0]} x {theirs[1]} of dim {theirs[2]} (or other "
                                f"layer types); build the policy from this model's atlas")

    def describe(self) -> str:
        return (f"{self.name}: {self.n_full}/{self.n_selectable} KV heads full ({self.full_fraction:.0%}), others "
                f"sink {self.sink} + window {self.window}" + (" + compensation token" if self.compensate else "")
                + (f" + {self.middle} middle tokens" if self.middle else "")
                + (", whole-prompt prefill" if self.prefill == "whole" else ""))

    # ---- builders ---------------------------------------------------------------------------
    @classmethod
    def full_cache(cls, geometry: Geometry) -> Policy:
        return cls(geometry, np.ones((geometry.n_layers, geometry.n_kv_heads), bool), name="full")

    @classmethod
    def streaming(cls, geometry: Geometry, sink: int = STREAMINGLLM_SINK, window: int = DEFAULT_WINDOW,
                  compensate: bool = False, prefill: str = "window", middle: int = 0) -> Policy:
        """StreamingLLM: every (selectable) head keeps `sink` first tokens + `window` recent ones."""
        return cls(geometry, np.zeros((geometry.n_layers, geometry.n_kv_heads), bool), sink=sink, window=window,
                   compensate=compensate, name="streaming", source={"method": "streamingllm"}, prefill=prefill,
                   middle=middle)

    @classmethod
    def random(cls, geometry: Geometry, full_fraction: float | None = None, seed: int = 0, *,
               budget_bytes: int | None = None, context: int | None = None, **shape: Any) -> Policy:
        """The control: as many full heads as a scored policy (a fraction or a budget, as
        from_ranking), chosen uniformly at random."""
        proto = cls(geometry, np.zeros((geometry.n_layers, geometry.n_kv_heads), bool), **shape)
        n_full = _how_many(proto, full_fraction, budget_bytes, context)
        if full_fraction is None:
            full_fraction = n_full / max(1, proto.n_selectable)
        idx = np.flatnonzero(proto.selectable.ravel())
        chosen = np.random.default_rng(seed).choice(idx, size=n_full, replace=False)
        full = np.zeros(proto.full.size, bool)
        full[chosen] = True
        return cls(geometry, full.reshape(proto.full.shape), name=f"random@{full_fraction:g}",
                   source={"method": "random", "seed": seed, "full_fraction": full_fraction}, **shape)

    @classmethod
    def from_ranking(cls, geometry: Geometry, need: np.ndarray, *, full_fraction: float | None = None,
                     budget_bytes: int | None = None, context: int | None = None, name: str = "ranked",
                     source: dict[str, Any] | None = None, **shape: Any) -> Policy:
        """Give the full cache to the KV heads with the highest `need` [layers, kv_heads].

        Exactly one of full_fraction (of the selectable heads) or budget_bytes (the most full
        heads whose cache at `context` tokens fits the budget) sets how many.
        """
        proto = cls(geometry, np.zeros((geometry.n_layers, geometry.n_kv_heads), bool), **shape)
        n_full = _how_many(proto, full_fraction, budget_bytes, context)
        need = np.where(proto.selectable & np.isfinite(need), need, -np.inf).ravel()
        order = np.argsort(-need, kind="stable")[:n_full]
        full = np.zeros(need.size, bool)
        full[order] = True
        return cls(geometry, full.reshape(proto.full.shape), name=name, source=source or {}, **shape)

    @classmethod
    def from_atlas(cls, atlas: Any, score: str, *, full_fraction: float | None = None,
                   budget_bytes: int | None = None, context: int | None = None, higher_is_full: bool | None = None,
                   **shape: Any) -> Policy:
        """Full cache for the KV heads an atlas score marks as needing it.

        `score` is any atlas score name, or "razor" (RazorAttention: top echo heads, 1 in 15 of
        the full heads, then top razor_induction heads). Direction: `higher_is_full` (default:
        low = full for streamable_mass and sink, high = full otherwise). Query-head scores are
        aggregated per KV group by the max of the need (for low-is-full scores: the min score),
        as RazorAttention does for GQA: a group needs the full cache if any of its heads does.
        """
        g = atlas.geometry
        if score == "razor":
            return _razor(atlas, full_fraction=full_fraction, budget_bytes=budget_bytes, context=context, **shape)
        if higher_is_full is None:
            higher_is_full = score not in LOW_MEANS_FULL
        values = atlas.score(score)  # [layers, heads]
        need = values if higher_is_full else -values
        need = np.nan_to_num(need, nan=-np.inf).reshape(g.n_layers, g.n_kv_heads, g.group_size).max(-1)
        amount = f"@{full_fraction:g}" if full_fraction is not None else f"@{budget_bytes}B"
        direction = "high" if higher_is_full else "low"
        return cls.from_ranking(g, need, full_fraction=full_fraction, budget_bytes=budget_bytes, context=context,
                                name=f"headwise:{score}{amount}",
                                source={"method": "atlas", "score": score, "full_when": direction,
                                        "aggregate": "max need over the KV group",
                                        "atlas_model": atlas.model.get("spec"),
                                        "atlas_weights_sha256": atlas.model.get("weights_sha256")}, **shape)

    @classmethod
    def from_duo_file(cls, path: str | Path, geometry: Geometry, full_fraction: float = 0.5, **shape: Any) -> Policy:
        """A DuoAttention pattern: tab-separated gate values, one row per layer, one column per KV head."""
        path = Path(path)
        try:
            rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            gates = np.array([[float(x) for x in row] for row in rows], dtype=float)
        except (OSError, UnicodeDecodeError) as e:
            raise HeadwiseError(f"cannot read DuoAttention pattern {path}: {e}") from None
        except ValueError:
            raise HeadwiseError(f"{path} is not a DuoAttention pattern (tab-separated numbers, one row per layer, "
                                f"one column per KV head)") from None
        if gates.ndim != 2 or gates.shape != (geometry.n_layers, geometry.n_kv_heads):
            raise HeadwiseError(f"{path} holds a {' x '.join(map(str, gates.shape))} gate matrix but the model has "
                                f"{geometry.n_layers} layers x {geometry.n_kv_heads} KV heads")
        return cls.from_ranking(geometry, gates, full_fraction=full_fraction, name=f"duo:{path.name}@{full_fraction:g}",
                                source={"method": "duoattention", "file": str(path)}, **shape)

    # ---- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"schema": "headwise.kv-policy/1", "name": self.name, "geometry": self.geometry.to_dict(),
                "full": self.full.astype(int).tolist(), "sink": self.sink, "window": self.window,
                "compensate": self.compensate, "prefill": self.prefill, "middle": self.middle, "source": self.source}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        if not isinstance(d, dict) or d.get("schema") != "headwise.kv-policy/1":
            raise HeadwiseError("not a headwise KV policy file (schema headwise.kv-policy/1)")
        try:
            return cls(Geometry.from_dict(d["geometry"]), np.array(d["full"], dtype=bool), sink=int(d["sink"]),
                       window=int(d["window"]), compensate=bool(d["compensate"]), name=str(d["name"]),
                       source=dict(d.get("source", {})), prefill=str(d.get("prefill", "window")),
                       middle=int(d.get("middle", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise HeadwiseError(f"KV policy file is incomplete or malformed ({e!r})") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HeadwiseError(f"cannot read KV policy {path}: {e}") from None


def _count(fraction: float, n: int) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise HeadwiseError(f"full fraction must be in [0, 1], got {fraction}")
    return int(min(n, max(0, math.floor(fraction * n + 0.5))))


def _how_many(proto: Policy, full_fraction: float | None, budget_bytes: int | None, context: int | None) -> int:
    """Number of full heads: a fraction of the selectable heads, or the most that fit a byte budget."""
    if (full_fraction is None) == (budget_bytes is None):
        raise HeadwiseError("give exactly one of full_fraction or budget_bytes")
    if budget_bytes is None:
        return _count(full_fraction, proto.n_selectable)
    if not context:
        raise HeadwiseError("budget_bytes needs the context length the budget is for")
    return _fit_budget(proto, budget_bytes, context)


def _fit_budget(proto: Policy, budget_bytes: int, context: int) -> int:
    """The most full heads whose predicted cache at `context` tokens stays within budget."""
    best = -1
    for n_full in range(proto.n_selectable + 1):
        full = proto.full.copy()
        idx = np.flatnonzero(proto.selectable.ravel())[:n_full]
        full.ravel()[idx] = True
        trial = Policy(proto.geometry, full, sink=proto.sink, window=proto.window, compensate=proto.compensate,
                       prefill=proto.prefill, middle=proto.middle)
        if trial.kv_bytes(context) <= budget_bytes:
            best = n_full
        else:
            break
    if best < 0:
        floor = Policy(proto.geometry, proto.full, sink=proto.sink, window=proto.window, prefill=proto.prefill,
                       middle=proto.middle).kv_bytes(context)
        raise HeadwiseError(f"a KV budget of {budget_bytes} bytes is below even the all-streaming cache at {context} "
                            f"tokens ({floor} bytes)")
    return best


def _razor(atlas: Any, *, full_fraction: float | None, budget_bytes: int | None, context: int | None,
           **shape: Any) -> Policy:
    """RazorAttention's selection: ~1 echo head per 14 induction heads (arXiv 2407.15891), max over KV groups."""
    g = atlas.geometry
    proto = Policy(g, np.zeros((g.n_layers, g.n_kv_heads), bool), **shape)
    n_full = _how_many(proto, full_fraction, budget_bytes, context)
    sel = proto.selectable.ravel()
    echo = np.where(sel, np.nan_to_num(atlas.score("echo", "kv_max").ravel(), nan=-np.inf), -np.inf)
    induction = np.where(sel, np.nan_to_num(atlas.score("razor_induction", "kv_max").ravel(), nan=-np.inf), -np.inf)
    n_echo = min(n_full, round(n_full / 15)) if n_full >= 8 else 0
    full = np.zeros(sel.size, bool)
    full[np.argsort(-echo, kind="stable")[:n_echo]] = True
    for i in np.argsort(-induction, kind="stable"):
        if full.sum() >= n_full:
            break
        full[i] = True
    amount = f"@{full_fraction:g}" if full_fraction is not None else f"@{budget_bytes}B"
    return Policy(g, full.reshape(proto.full.shape), name=f"headwise:razor{amount}",
                  source={"method": "razorattention", "scores": ["echo", "razor_induction"], "n_echo": int(n_echo),
                          "aggregate": "kv_max", "atlas_model": atlas.model.get("spec")}, **shape)
