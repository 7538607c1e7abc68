"""The head-aware policy: which KV heads keep every token and which only sinks + a recent window.

A `HeadPolicy` is a [layers, kv_heads] boolean matrix (True = full cache) plus the streaming
shape (S sink tokens, W recent tokens, optional RazorAttention compensation token) and how
streaming heads read a prompt (`prefill`):
- "bounded" (DuoAttention, `+bounded`): every prompt query of a streaming head sees sinks + its
  window only, so prefill work and memory stay bounded by the window;
- "tail" (`+tailN`): one call; the streaming heads' prompt queries are bounded as above except
  the last N, which attend to the whole prompt (DuoAttention's saving on all but the queries
  that write the reply); with `+earlyL` the first L layers read the prompt whole, and with
  `+strideK` the bounded queries also see every K-th earlier token (sinks + window + a stride), with
  `+blocksK` the K 64-token key blocks their query block picks (MInference's block-sparse pattern);
- "whole" (the default; RazorAttention, SnapKV): streaming heads attend to the whole prompt, and each
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

Builders: `HeadPolicy.full_cache`, `HeadPolicy.streaming` (StreamingLLM: every head
streaming), `HeadPolicy.random` (the control), `HeadPolicy.from_atlas` (any per-head score; which
end of it needs the full cache comes from the atlas, or the score's family), `from_duo_file` (a
DuoAttention gate matrix). Its cache layers live in mixed.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from transformers.cache_utils import CacheLayerMixin

from ..errors import HeadwiseError
from ..geometry import Geometry
from ..scores import needs_full
from .layers import FullLayer
from .mixed import MixedLayer
from .policy import PREFILL_MODES, CachePolicy
from .quantized import KIVI_GROUP, KIVI_RESIDUAL, check_quantizable, quantized_head_bytes, value_group

# DuoAttention's deployment shape (arXiv 2410.10819): 64 sink tokens + 256 recent tokens.
DEFAULT_SINK = 64
DEFAULT_WINDOW = 256
# StreamingLLM's 4 attention sinks.
STREAMINGLLM_SINK = 4


@dataclass
class HeadPolicy(CachePolicy):
    """full[l, h] = True: KV head h of layer l keeps every token; False: sinks + window only."""

    policy_type: ClassVar[str] = "heads"
    geometry: Geometry
    full: np.ndarray
    sink: int = DEFAULT_SINK
    window: int = DEFAULT_WINDOW
    compensate: bool = False
    name: str = "custom"
    source: dict[str, Any] = field(default_factory=dict)
    prefill: str = "whole"
    # Streaming heads also keep this many prompt tokens from between sinks and window, picked by
    # the token vote of the prompt's last queries (whole-prompt prefill only; MixedLayer.keep_middle).
    middle: int = 0
    tail: int = 0  # prefill "tail": the last `tail` prompt queries of streaming heads attend to the whole prompt
    early: int = 0  # prefill "tail": the streaming heads of the first `early` layers attend to the whole prompt
    stride: int = 0  # prefill "tail": the other prompt queries also see every `stride`-th earlier token
    blocks: int = 0  # prefill "tail": ... or the `blocks` 64-token key blocks their query block picks (block_sparse.py)
    quant: int = 0  # full heads' keys and values stored in this many bits (8, 4 or 2; 0: the model's dtype)

    def __post_init__(self) -> None:
        g = self.geometry
        self.full = np.asarray(self.full, dtype=bool)
        if self.full.shape != (g.n_layers, g.n_kv_heads):
            raise HeadwiseError(f"policy '{self.name}' is a {' x '.join(map(str, self.full.shape))} matrix but the "
                                f"model has {g.n_layers} layers x {g.n_kv_heads} KV heads; build the policy for "
                                f"this model")
        if self.sink < 0 or self.window < 1:
            raise HeadwiseError(f"streaming heads need sink >= 0 and window >= 1 (got sink={self.sink}, "
                                f"window={self.window})")
        if self.prefill == "window":  # policy files from before the mode was called "bounded"
            self.prefill = "bounded"
        if self.prefill not in PREFILL_MODES:
            raise HeadwiseError(f"prefill must be one of {', '.join(PREFILL_MODES)}, not '{self.prefill}'")
        if self.middle < 0:
            raise HeadwiseError(f"middle tokens must be >= 0, got {self.middle}")
        if min(self.tail, self.stride, self.blocks) < 0 or not 0 <= self.early <= self.geometry.n_layers:
            raise HeadwiseError(f"tail queries, the stride and the key blocks must be >= 0 and early layers in [0, "
                                f"{self.geometry.n_layers}] (got tail {self.tail}, stride {self.stride}, blocks "
                                f"{self.blocks}, early {self.early})")
        if (self.prefill == "tail") != (self.tail > 0 or self.early > 0 or self.stride > 0 or self.blocks > 0):
            raise HeadwiseError(f"the tail prefill needs tail queries (+tailN), early layers (+earlyL), a stride "
                                f"(+strideK) or key blocks (+blocksK), and only it takes them (prefill "
                                f"'{self.prefill}', tail {self.tail}, early {self.early}, stride {self.stride}, "
                                f"blocks {self.blocks})")
        if self.stride and self.blocks:
            raise HeadwiseError("+strideK and +blocksK are two patterns for the same prompt queries; keep one")
        if (self.stride or self.blocks) and self.compensate:
            raise HeadwiseError(f"{'+strideK' if self.stride else '+blocksK'} does not combine with the compensation "
                                f"token (+comp): the tokens it adds would be counted among the evicted ones; drop one")
        if self.middle and (self.prefill == "bounded" or self.compensate):
            raise HeadwiseError("middle tokens are chosen from a prefill that reads the whole prompt in one call and "
                                "do not combine with the compensation token: drop +bounded or +comp")
        if self.quant:  # check_quantizable refuses a width that is not one of quantized.BITS
            check_quantizable(self.geometry.head_dim, self.quant)
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

    def tokens_held(self, context: int) -> np.ndarray:
        streaming = min(context, self.sink + self.window + self.middle)
        return np.where(self.full, context, streaming)

    def extra_bytes(self, batch: int = 1) -> np.ndarray:
        if not self.compensate:
            return super().extra_bytes(batch)
        # The compensation token: float32 running sums of the evicted keys and values, per streaming head.
        sums = 2 * self.geometry.head_dim * 4 * batch
        return np.where(self.full | ~self.selectable, 0, sums)

    def kv_bytes_by_head(self, context: int, batch: int = 1, dtype_bytes: int = 4) -> np.ndarray:
        out = super().kv_bytes_by_head(context, batch, dtype_bytes)
        if self.quant:  # full heads (not the model's own windowed layers): KIVI's codes, scales and residuals
            g = self.geometry
            out[self.full & self.selectable] = batch * quantized_head_bytes(context, g.head_dim, self.quant,
                                                                            dtype_bytes)
        return out

    def make_layer(self, layer: int, max_length: int | None) -> CacheLayerMixin:
        g = self.geometry
        if self.full[layer].all():
            return FullLayer(layer, g.n_kv_heads, g.head_dim, max_length, quant=self.quant)
        return MixedLayer(layer, self.full[layer], g.head_dim, self.sink, self.window, self.compensate, max_length,
                          whole_prefill=self.prefill != "bounded", middle=self.middle, tail=self.layer_tail(layer),
                          stride=self.stride, blocks=self.blocks, quant=self.quant)

    def _prefill_text(self) -> str:
        if self.prefill != "tail":
            return {"whole": ", whole-prompt prefill", "bounded": ", bounded prefill"}[self.prefill]
        text = f", whole-prompt prefill in the first {self.early} layers" if self.early else ""
        text += ", bounded prefill" + (f" + every {self.stride}th earlier token" if self.stride else "") + \
            (f" + {self.blocks} key blocks per query block" if self.blocks else "") + \
            (" in the others" if self.early else "")
        return text + (f" but the last {self.tail} queries" if self.tail else "")

    def layer_tail(self, layer: int) -> int | None:
        """How many of the prompt's last queries of this layer's streaming heads attend to the whole prompt in its
        one call (None: all of them; the bounded prefill has no one call)."""
        if self.prefill == "tail" and layer >= self.early:
            return self.tail
        return None

    def option_suffix(self) -> str:
        """The spec options that give another policy this one's streaming shape and storage ("+comp", "+bounded",
        "+tailN", "+earlyL", "+strideK", "+blocksK", "+midM", "+qB"; the whole-prompt prefill is the default and
        needs none)."""
        prefill = {"whole": "", "bounded": "+bounded",
                   "tail": (f"+tail{self.tail}" if self.tail else "") + (f"+early{self.early}" if self.early else "")
                   + (f"+stride{self.stride}" if self.stride else "") + (f"+blocks{self.blocks}" if self.blocks else "")
                   }[self.prefill]
        return ("+comp" if self.compensate else "") + prefill + (f"+mid{self.middle}" if self.middle else "") + \
            (f"+q{self.quant}" if self.quant else "")

    def describe(self) -> str:
        return (f"{self.name}: {self.n_full}/{self.n_selectable} KV heads full ({self.full_fraction:.0%}), others "
                f"sink {self.sink} + window {self.window}" + (" + compensation token" if self.compensate else "")
                + (f" + {self.middle} middle tokens" if self.middle else "")
                + self._prefill_text()
                + (f", full heads stored in {self.quant} bits (KIVI: keys per channel in groups of {KIVI_GROUP} "
                   f"tokens, values per token in groups of {value_group(self.geometry.head_dim)} channels, the last "
                   f"{KIVI_RESIDUAL} tokens unquantized)" if self.quant else ""))

    # ---- builders ---------------------------------------------------------------------------
    @classmethod
    def full_cache(cls, geometry: Geometry, quant: int = 0) -> HeadPolicy:
        return cls(geometry, np.ones((geometry.n_layers, geometry.n_kv_heads), bool), name="full", quant=quant)

    @classmethod
    def streaming(cls, geometry: Geometry, sink: int = STREAMINGLLM_SINK, window: int = DEFAULT_WINDOW,
                  compensate: bool = False, prefill: str = "whole", middle: int = 0, tail: int = 0,
                  early: int = 0, stride: int = 0, blocks: int = 0, quant: int = 0) -> HeadPolicy:
        """StreamingLLM: every (selectable) head keeps `sink` first tokens + `window` recent ones."""
        return cls(geometry, np.zeros((geometry.n_layers, geometry.n_kv_heads), bool), sink=sink, window=window,
                   compensate=compensate, name="streaming", source={"method": "streamingllm"}, prefill=prefill,
                   middle=middle, tail=tail, early=early, stride=stride, blocks=blocks, quant=quant)

    @classmethod
    def random(cls, geometry: Geometry, full_fraction: float | None = None, seed: int = 0, *,
               budget_bytes: int | None = None, context: int | None = None, dtype_bytes: int = 4,
               **shape: Any) -> HeadPolicy:
        """The control: as many full heads as a scored policy (a fraction or a budget, as
        from_ranking), chosen uniformly at random."""
        proto = cls(geometry, np.zeros((geometry.n_layers, geometry.n_kv_heads), bool), **shape)
        n_full = _how_many(proto, full_fraction, budget_bytes, context, dtype_bytes)
        if full_fraction is None:
            full_fraction = n_full / max(1, proto.n_selectable)
        idx = np.flatnonzero(proto.selectable.ravel())
        chosen = np.random.default_rng(seed).choice(idx, size=n_full, replace=False)
        full = np.zeros(proto.full.size, bool)
        full[chosen] = True
        return cls(geometry, full.reshape(proto.full.shape), name=f"random@{full_fraction:g}",
                   source={"method": "random", "seed": seed, "full_fraction": full_fraction,
                           **_sized_for(budget_bytes, dtype_bytes, shape)}, **shape)

    @classmethod
    def from_ranking(cls, geometry: Geometry, need: np.ndarray, *, full_fraction: float | None = None,
                     budget_bytes: int | None = None, context: int | None = None, name: str = "ranked",
                     source: dict[str, Any] | None = None, dtype_bytes: int = 4, **shape: Any) -> HeadPolicy:
        """Give the full cache to the KV heads with the highest `need` [layers, kv_heads].

        Exactly one of full_fraction (of the selectable heads) or budget_bytes (the most full
        heads whose cache at `context` tokens fits the budget) sets how many. `dtype_bytes`: the
        bytes of the model's dtype (4: float32; 2: bfloat16), which a budget's bytes are counted in:
        quantized heads' codes do not shrink with it, so it changes how many fit.
        """
        proto = cls(geometry, np.zeros((geometry.n_layers, geometry.n_kv_heads), bool), **shape)
        n_full = _how_many(proto, full_fraction, budget_bytes, context, dtype_bytes)
        full = np.zeros(proto.full.size, bool)
        full[_ranked(np.asarray(need, dtype=float), proto.selectable)[:n_full]] = True
        return cls(geometry, full.reshape(proto.full.shape), name=name,
                   source={**(source or {}), **_sized_for(budget_bytes, dtype_bytes, shape)}, **shape)

    @classmethod
    def from_atlas(cls, atlas: Any, score: str, *, full_fraction: float | None = None,
                   budget_bytes: int | None = None, context: int | None = None, higher_is_full: bool | None = None,
                   dtype_bytes: int = 4, **shape: Any) -> HeadPolicy:
        """Full cache for the KV heads an atlas score marks as needing it.

        `score` is any atlas score name, or "razor" (RazorAttention: top echo heads, 1 in 15 of
        the full heads, then top razor_induction heads). Direction: `higher_is_full`, by default
        what the atlas records for the score (its `needs_full`), else what its family declares;
        a score that says neither is refused. Query-head scores are
        aggregated per KV group by the max of the need (for low-is-full scores: the min score),
        as RazorAttention does for GQA: a group needs the full cache if any of its heads does.
        """
        g = atlas.geometry
        if score == "razor":
            return _razor(atlas, full_fraction=full_fraction, budget_bytes=budget_bytes, context=context,
                          dtype_bytes=dtype_bytes, **shape)
        values = atlas.score(score)  # [layers, heads]
        if higher_is_full is None:
            higher_is_full = _needs_full(atlas, score) == "high"
        need = values if higher_is_full else -values
        need = np.nan_to_num(need, nan=-np.inf).reshape(g.n_layers, g.n_kv_heads, g.group_size).max(-1)
        amount = f"@{full_fraction:g}" if full_fraction is not None else f"@{budget_bytes}B"
        direction = "high" if higher_is_full else "low"
        return cls.from_ranking(g, need, full_fraction=full_fraction, budget_bytes=budget_bytes, context=context,
                                dtype_bytes=dtype_bytes, name=f"headwise:{score}{amount}",
                                source={"method": "atlas", "score": score, "full_when": direction,
                                        "aggregate": "max need over the KV group",
                                        "atlas_model": atlas.model.get("spec"),
                                        "atlas_weights_sha256": atlas.model.get("weights_sha256")}, **shape)

    @classmethod
    def from_duo_file(cls, path: str | Path, geometry: Geometry, full_fraction: float | None = None, *,
                      budget_bytes: int | None = None, context: int | None = None, dtype_bytes: int = 4,
                      **shape: Any) -> HeadPolicy:
        """A DuoAttention pattern: tab-separated gate values, one row per layer, one column per KV head;
        the top gates keep the full cache (a fraction, or as many as fit `budget_bytes` at `context`)."""
        if full_fraction is None and budget_bytes is None:
            full_fraction = 0.5
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
        if not np.isfinite(gates).all():
            raise HeadwiseError(f"{path} holds a gate that is not a finite number; a DuoAttention gate is in [0, 1]")
        amount = f"@{full_fraction:g}" if full_fraction is not None else f"@{budget_bytes}B"
        return cls.from_ranking(geometry, gates, full_fraction=full_fraction, budget_bytes=budget_bytes,
                                context=context, dtype_bytes=dtype_bytes, name=f"duo:{path.name}{amount}",
                                source={"method": "duoattention", "file": str(path)}, **shape)

    # ---- files ------------------------------------------------------------------------------
    def fields(self) -> dict[str, Any]:
        return {"full": self.full.astype(int).tolist(), "sink": self.sink, "window": self.window,
                "compensate": self.compensate, "prefill": self.prefill, "middle": self.middle, "tail": self.tail,
                "early": self.early, "stride": self.stride, "blocks": self.blocks, "quant": self.quant}

    @classmethod
    def from_fields(cls, geometry: Geometry, fields: dict[str, Any], name: str, source: dict[str, Any]) -> HeadPolicy:
        return cls(geometry, np.array(fields["full"], dtype=bool), sink=int(fields["sink"]),
                   window=int(fields["window"]), compensate=bool(fields["compensate"]), name=name, source=source,
                   # a file without the field predates prefill modes: it meant the bounded prefill
                   prefill=str(fields.get("prefill", "bounded")), middle=int(fields.get("middle", 0)),
                   tail=int(fields.get("tail", 0)), early=int(fields.get("early", 0)),
                   stride=int(fields.get("stride", 0)), blocks=int(fields.get("blocks", 0)),
                   quant=int(fields.get("quant", 0)))


def _needs_full(atlas: Any, score: str) -> str:
    """Which end of an atlas score marks a head that needs the full cache."""
    direction = needs_full(score, atlas.needs_full(score))
    if direction is None:
        raise HeadwiseError(f"score '{score}' does not say which end needs the full KV cache; choose one: "
                            f"headwise:{score}:high@F or headwise:{score}:low@F")
    return direction


def _ranked(need: np.ndarray, selectable: np.ndarray) -> np.ndarray:
    """Flat KV-head indices, selectable heads first (one without a value still before a layer the model
    windows), then by need, highest first; ties in index order."""
    need = np.where(np.isfinite(need), need, -np.inf).ravel()
    return np.lexsort((-need, ~selectable.ravel()))


def _count(fraction: float, n: int) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise HeadwiseError(f"full fraction must be in [0, 1], got {fraction}")
    return int(min(n, max(0, math.floor(fraction * n + 0.5))))


def _how_many(proto: HeadPolicy, full_fraction: float | None, budget_bytes: int | None, context: int | None,
              dtype_bytes: int = 4) -> int:
    """Number of full heads: a fraction of the selectable heads, or the most that fit a byte budget."""
    if (full_fraction is None) == (budget_bytes is None):
        raise HeadwiseError("give exactly one of full_fraction or budget_bytes")
    if budget_bytes is None:
        return _count(full_fraction, proto.n_selectable)
    if not context:
        raise HeadwiseError("budget_bytes needs the context length the budget is for")
    return _fit_budget(proto, budget_bytes, context, dtype_bytes)


def _sized_for(budget_bytes: int | None, dtype_bytes: int, shape: dict[str, Any]) -> dict[str, int]:
    """What a quantized policy's byte budget assumed of the model's dtype: its codes do not shrink with the dtype, so
    the same budget fits other heads in another dtype (HeadwiseCache refuses a model of another dtype)."""
    return {"budget_dtype_bytes": dtype_bytes} if budget_bytes is not None and shape.get("quant") else {}


def _fit_budget(proto: HeadPolicy, budget_bytes: int, context: int, dtype_bytes: int) -> int:
    """The most full heads whose predicted cache at `context` tokens stays within budget."""
    best = -1
    for n_full in range(proto.n_selectable + 1):
        full = proto.full.copy()
        idx = np.flatnonzero(proto.selectable.ravel())[:n_full]
        full.ravel()[idx] = True
        trial = replace(proto, full=full)
        if trial.kv_bytes(context, dtype_bytes=dtype_bytes) <= budget_bytes:
            best = n_full
        else:
            break
    if best < 0:
        floor = proto.kv_bytes(context, dtype_bytes=dtype_bytes)
        raise HeadwiseError(f"a KV budget of {budget_bytes} bytes is below even the all-streaming cache at {context} "
                            f"tokens ({floor} bytes)")
    return best


def _razor(atlas: Any, *, full_fraction: float | None, budget_bytes: int | None, context: int | None,
           dtype_bytes: int, **shape: Any) -> HeadPolicy:
    """RazorAttention's selection: ~1 echo head per 14 induction heads (arXiv 2407.15891), max over KV groups."""
    g = atlas.geometry
    proto = HeadPolicy(g, np.zeros((g.n_layers, g.n_kv_heads), bool), **shape)
    n_full = _how_many(proto, full_fraction, budget_bytes, context, dtype_bytes)
    echo = atlas.score("echo", "kv_max")
    induction = atlas.score("razor_induction", "kv_max")
    n_echo = min(n_full, round(n_full / 15)) if n_full >= 8 else 0
    full = np.zeros(proto.full.size, bool)
    full[_ranked(echo, proto.selectable)[:n_echo]] = True
    for i in _ranked(induction, proto.selectable):
        if full.sum() >= n_full:
            break
        full[i] = True
    amount = f"@{full_fraction:g}" if full_fraction is not None else f"@{budget_bytes}B"
    return HeadPolicy(g, full.reshape(proto.full.shape), name=f"headwise:razor{amount}",
                  source={"method": "razorattention", "scores": ["echo", "razor_induction"], "n_echo": int(n_echo),
                          "aggregate": "kv_max", "atlas_model": atlas.model.get("spec"),
                          **_sized_for(budget_bytes, dtype_bytes, shape)}, **shape)


__all__ = ["DEFAULT_SINK", "DEFAULT_WINDOW", "STREAMINGLLM_SINK", "HeadPolicy"]
