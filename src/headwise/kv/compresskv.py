"""CompressKV (Lin et al., arXiv 2508.02401) as a cache policy: SnapKV-style eviction at the
prompt's end where only each layer's semantic retrieval heads (SRHs) vote, and per-layer
budgets that follow each layer's measured eviction error.

The paper's text was not readable offline; this follows the authors' code
(github.com/TUDa-HWAI/CompressKV: methods/compresskv/snapkv_utils.py for the eviction,
longbench/pred_compresskv.py `error_aware_layer_budget_allocation` for the budgets).

- Selection: at the end of the prompt (one call), layer l's SRHs (its top `srh_heads` query
  heads by the atlas's `semantic_retrieval` score; authors: 4) score every prompt token before
  the last `observation` (8) queries by their softmax attention summed over those queries,
  average-pooled with `kernel` (5) and averaged over the SRHs. The top budget_l - observation
  tokens plus the observation window are kept by EVERY KV head of the layer (one index set),
  and decoded tokens are appended. Evicted tokens are freed; kept keys hold their rotary positions.
- Budgets: X of the prompt per layer on average (X < 1) or X tokens (X >= 1), as snapkv@X,
  so the total is avg x layers. The atlas's `srh_eviction_error` (each layer's share of the
  summed relative output error under eviction, measured by headwise.scores.semantic_retrieval
  on its own needle prompts, deterministic given the profile's seed) divides it: every layer
  gets min_tokens (32), the rest is split by share and rounded, clipped to [min_tokens,
  3 x avg], and the rounding difference is given to (taken from) the layers of largest
  (smallest) share one token at a time, as the authors do. The shares are saved in the policy
  file, so a saved policy keeps its budgets without the atlas.

Departures: the clip's ceiling is also the prompt's length, and min_tokens is at most the
average (short prompts and small X), so the budgets always sum to the total; the vote's
average pool leaves the padding out of the mean (as SnapKV here; the authors' avg_pool1d
counts it, which only changes the first and last kernel // 2 tokens); layers the model windows
itself (Gemma3) keep their window and take no part in the allocation; one prompt per call
(no padded batches), as SnapKV. The authors give the budget as tokens per layer only
(max_capacity_prompt); X < 1, a share of the prompt, is ours, to compare at equal bytes.

`compresskv@X` needs both atlas scores; `CompressKVPolicy.from_atlas(..., layer_budgets=False)`
is the uniform-budget ablation (SRH votes only), for Python callers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

from ..errors import HeadwiseError
from ..geometry import Geometry
from ..scores.semantic_retrieval import KERNEL, SRH_HEADS, WINDOW, srh_select, top_heads
from .layers import PromptEvictionLayer
from .policy import CachePolicy

MIN_TOKENS = 32  # the authors' floor per layer
MAX_RATIO = 3  # the authors' ceiling: 3 x the average budget
MAX_TOKENS = 1 << 21  # spec.MAX_TOKENS: beyond any model's positions


def allocate(share: np.ndarray, total: int, low: int, high: int) -> np.ndarray:
    """The authors' error-aware allocation: `low` each, the rest by share, clipped, rounding fixed up."""
    share = np.asarray(share, dtype=float)
    budget = np.clip(low + np.round(share * (total - low * len(share))), low, high)
    diff = int(total - budget.sum())
    while diff != 0:
        grow = diff > 0
        open_ = np.nonzero(budget < high if grow else budget > low)[0]
        if len(open_) == 0:
            break
        order = open_[np.argsort(-share[open_] if grow else share[open_], kind="stable")]
        for i in order:
            budget[i] += 1 if grow else -1
            diff += -1 if grow else 1
            if diff == 0:
                break
    return budget.astype(int)


@dataclass
class CompressKVPolicy(CachePolicy):
    policy_type: ClassVar[str] = "compresskv"
    geometry: Geometry
    budget: float
    heads: list[list[int]]  # per layer: the query heads that vote (the SRHs)
    layer_share: list[float] | None = None  # per layer: share of the eviction error (None: uniform budgets)
    observation: int = WINDOW
    kernel: int = KERNEL
    min_tokens: int = MIN_TOKENS
    name: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    prefill: ClassVar[str] = "whole"
    accepts_chunks: ClassVar[bool] = False

    def __post_init__(self) -> None:
        g = self.geometry
        if not math.isfinite(self.budget) or self.budget <= 0:
            raise HeadwiseError(f"CompressKV budget must be positive (a share of the prompt or a token count), got "
                                f"{self.budget}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise HeadwiseError(f"CompressKV pooling kernel must be odd and positive, got {self.kernel}")
        if self.observation < 1 or self.min_tokens < 1:
            raise HeadwiseError("CompressKV needs at least one observation query and one token per layer")
        self.heads = [sorted(int(h) for h in row) for row in self.heads]
        if len(self.heads) != g.n_layers or any(not row or len(set(row)) != len(row) or not
                                                all(0 <= h < g.n_heads for h in row) for row in self.heads):
            raise HeadwiseError(f"CompressKV needs, for each of the {g.n_layers} layers, a non-empty list of distinct "
                                f"query heads in [0, {g.n_heads})")
        if self.layer_share is not None:
            share = np.asarray(self.layer_share, dtype=float)
            if share.shape != (g.n_layers,) or not np.all(np.isfinite(share)) or np.any(share < 0) or \
                    share.sum() <= 0:
                raise HeadwiseError(f"CompressKV layer shares must be {g.n_layers} finite values >= 0, not all 0")
            self.layer_share = [float(x) for x in share]
        self.name = self.name or f"compresskv@{self.budget:g}"
        self.source = {"method": "compresskv", **self.source}

    # ---- budgets ----------------------------------------------------------------------------
    def average_tokens(self, prompt: int) -> int:
        k = round(self.budget * prompt) if self.budget < 1 else int(self.budget)
        return min(prompt, max(k, self.observation))

    def layer_budgets(self, prompt: int) -> np.ndarray:
        """[layers] tokens each layer keeps of a `prompt`-token prompt (windowed layers: 0, not the policy's)."""
        g = self.geometry
        avg = self.average_tokens(prompt)
        out = np.zeros(g.n_layers, dtype=int)
        evicting = [i for i in range(g.n_layers) if not g.windowed[i]]
        if not evicting:
            return out
        if self.layer_share is None:
            out[evicting] = avg
            return out
        share = np.asarray(self.layer_share, dtype=float)[evicting]
        share = share / share.sum() if share.sum() > 0 else np.full(len(evicting), 1 / len(evicting))
        low = max(min(self.min_tokens, avg), min(self.observation, prompt))
        out[evicting] = allocate(share, avg * len(evicting), low, min(MAX_RATIO * avg, prompt))
        return out

    def tokens_held(self, context: int) -> np.ndarray:
        return np.repeat(self.layer_budgets(context)[:, None], self.geometry.n_kv_heads, axis=1)

    def make_layer(self, layer: int, max_length: int | None) -> CacheLayerMixin:
        return CompressKVLayer(layer, self.geometry.n_kv_heads, self.geometry.head_dim, self, max_length)

    def describe(self) -> str:
        how = "budgets by eviction error" if self.layer_share is not None else "uniform budgets"
        return (f"{self.name}: every KV head of a layer keeps the prompt tokens its {len(self.heads[0])} semantic "
                f"retrieval heads vote for ({how}; observation {self.observation}, pool {self.kernel})")

    def fields(self) -> dict[str, Any]:
        return {"budget": self.budget, "heads": self.heads, "layer_share": self.layer_share,
                "observation": self.observation, "kernel": self.kernel, "min_tokens": self.min_tokens}

    @classmethod
    def from_fields(cls, geometry: Geometry, fields: dict[str, Any], name: str,
                    source: dict[str, Any]) -> CompressKVPolicy:
        share = fields.get("layer_share")
        return cls(geometry, float(fields["budget"]), heads=[[int(h) for h in row] for row in fields["heads"]],
                   layer_share=None if share is None else [float(x) for x in share],
                   observation=int(fields["observation"]), kernel=int(fields["kernel"]),
                   min_tokens=int(fields["min_tokens"]), name=name, source=source)

    @classmethod
    def from_atlas(cls, atlas: Any, geometry: Geometry, budget: float, *, srh_heads: int | None = None,
                   layer_budgets: bool = True) -> CompressKVPolicy:
        """SRHs from the atlas's semantic_retrieval, layer shares from its srh_eviction_error."""
        if atlas.geometry != geometry:
            raise HeadwiseError(f"CompressKV: the atlas was made for {atlas.geometry.n_layers} layers x "
                                f"{atlas.geometry.n_heads} heads ({atlas.geometry.model_type}), not this model's "
                                f"{geometry.n_layers} x {geometry.n_heads} ({geometry.model_type}); profile this model")
        wanted = ["semantic_retrieval"] + (["srh_eviction_error"] if layer_budgets else [])
        missing = [s for s in wanted if s not in atlas.score_names]
        if missing:
            raise HeadwiseError(f"CompressKV needs the atlas score(s) {', '.join(missing)}; run headwise profile "
                                f"--scores semantic_retrieval,srh_eviction_error")
        srh = atlas.score("semantic_retrieval")
        if np.all(np.isnan(srh)):
            raise HeadwiseError("CompressKV: the atlas's semantic_retrieval is undefined (the model recalled no "
                                "needle); profile with shorter contexts")
        recorded = atlas.data["scores"]["semantic_retrieval"].get("settings", {})
        k = min(srh_heads or int(recorded.get("srh_heads", SRH_HEADS)), geometry.n_heads)
        share = None
        if layer_budgets:
            error = atlas.score("srh_eviction_error")[:, 0]
            if not np.all(np.isfinite(error)):
                raise HeadwiseError("CompressKV: the atlas's srh_eviction_error is undefined; profile it again")
            share = error.tolist()
        source = {"srh_heads": k, "atlas_model": atlas.model.get("spec"),
                  "atlas_weights_sha256": atlas.model.get("weights_sha256"),
                  "layer_error": None if share is None else atlas.data["scores"]["srh_eviction_error"].get(
                      "settings", {})}
        return cls(geometry, budget, heads=top_heads(srh, k), layer_share=share, source=source)


def build_compresskv(r: Any) -> CompressKVPolicy:
    """The spec `compresskv@X` (a headwise.kv.PolicyRequest)."""
    if r.atlas is None:
        raise r.fail("needs an atlas with semantic_retrieval and srh_eviction_error (--atlas DIR from headwise "
                     "profile --scores semantic_retrieval,srh_eviction_error)")
    x = r.number(r.amount)
    limit = min(MAX_TOKENS, r.geometry.max_positions or MAX_TOKENS)  # spec.token_limit (spec imports this module)
    if x <= 0 or (x >= 1 and (x != int(x) or x > limit)):
        raise r.fail(f"X must be a share of the prompt in (0, 1) or a whole number of tokens per layer up to "
                     f"{limit} (the model's positions)")
    try:
        return CompressKVPolicy.from_atlas(r.atlas, r.geometry, x)
    except HeadwiseError as e:
        raise r.fail(str(e)) from None


class CompressKVLayer(PromptEvictionLayer):
    """Full cache through the prompt, then the layer's SRH selection for every KV head; decoded tokens appended."""

    method = "CompressKV"

    def choose(self, query: Tensor, scaling: float) -> Tensor | None:
        p, t = self.policy, self.store.length
        keep, w = int(p.layer_budgets(t)[self.layer]), min(p.observation, t)
        if keep >= t or t <= w:
            return None
        index = srh_select(query[:, :, -w:], self.store.keys, scaling, keep, p.kernel, p.heads[self.layer])
        return index[:, None].expand(-1, self.n_kv_heads, -1)


__all__ = ["CompressKVPolicy", "allocate", "build_compresskv"]
