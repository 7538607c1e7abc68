"""semantic_retrieval and srh_eviction_error (CompressKV, Lin et al., arXiv 2508.02401).

CompressKV picks, per layer, the "semantic retrieval heads" (SRHs) whose attention decides which
prompt tokens every head of the layer keeps, and sizes each layer's cache by how much its output
changes when tokens are evicted. Both are measured offline; this family measures them. The
paper's text was not readable offline: this follows the authors' code (github.com/TUDa-HWAI/
CompressKV, Retrieval_Head_Identification/semantic_retrieval_head_detection.py and
longbench/pred_get_importance_score.py + model/modeling_llama_new.py).

semantic_retrieval: needle-in-a-haystack trials (the `retrieval` family's grid, needles and
greedy decode). At each decode step whose generated token occurs inside the needle span, every
query head adds the attention mass its single query row puts on the whole needle span (no top-1
and no copy condition, unlike Wu et al.'s retrieval score: a head that reads the needle and its
context counts). A trial counts when the reply recalls more than half of the needle's words
(ROUGE-1 recall > 0.5, as the authors' code); the score is the mean over the kept trials.

srh_eviction_error: with each layer's top `srh_heads` heads by semantic_retrieval (authors:
first_k = 4), every calibration prompt (the same needle prompts, all of them) is prefilled and
decoded greedily with the full cache. At the prompt's end each layer picks the tokens its SRHs
vote for (CompressKV's selection, `srh_select`) at a budget of `eviction_budget` tokens (the
authors measure at 32). At every decode step each layer's attention output after the output
projection is computed twice, from the full cache and from the kept tokens + decoded ones, and
the relative Frobenius error ||O_kept - O_full|| / (||O_full|| + 1e-5) is summed over steps and
prompts; the per-layer sums are divided by their total (L1), as the authors' get_avg.py does.
The atlas stores per-head tables, so every head of a layer carries its layer's share.

Departures: the authors detect SRHs on their own three needles over 1K-50K-token contexts x 10
depths; we use the `retrieval` family's bundled needles and grid (256-1024 tokens by default,
where smollm2-135m still retrieves). The authors measure the eviction error on the LongBench
prompts they then evaluate on; we calibrate on the needle prompts, never on evaluation prompts.
They decode each LongBench prompt for the dataset's max_gen tokens and average the
normalized errors over 16 datasets; we decode each needle prompt for its reply budget
(len(needle) + extra tokens, no early stop) and normalize once. Their pooling counts the
zero padding at the prompt's edges (torch's avg_pool1d default); ours does not, as SnapKV's vote
in headwise.kv does, so that with every head selected the vote is SnapKV's. Layers the model
windows itself (Gemma3's sliding layers) are never evicted and get error 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._progress import note, progress
from ..decode import forward, greedy
from ..errors import HeadwiseError
from ..geometry import Geometry
from ..instrument import AttentionChunk, Observer, Session
from ..probes.needle import NeedleCase, bundled_needles, needle_case
from .base import ComputedScoreFamily, Score, ScoreResult, Setting
from .retrieval import MIN_RECALL, RetrievalScores, grid, rouge1_recall

# CompressKV's selection (the authors' defaults): observation window, pooling kernel, SRHs per layer,
# and the budget the eviction error is measured at.
WINDOW = 8
KERNEL = 5
SRH_HEADS = 4
EVICTION_BUDGET = 32


def srh_votes(query_obs: Tensor, keys: Tensor, scaling: float, kernel: int, heads: list[int]) -> Tensor:
    """The pooled vote [b, T - w] of query heads `heads` for each prompt token before the last w.

    query_obs: [b, hq, w, d] the prompt's last w queries; keys: [b, kv, T, d]. Each selected head
    sums its softmax attention over the w queries, is smoothed by an average pool of `kernel`,
    and the heads are averaged (the authors' attn_cache[:, heads].mean(1)).
    """
    b, hq, w, _ = query_obs.shape
    n_kv, t = keys.shape[1], keys.shape[2]
    group = hq // n_kv
    index = torch.as_tensor(heads, dtype=torch.long, device=keys.device)
    q = query_obs[:, index].float()  # [b, k, w, d]
    k = keys[:, index // group].float()  # [b, k, T, d]: each selected head's own KV head
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    qpos = torch.arange(t - w, t, device=keys.device)
    scores = scores.masked_fill(torch.arange(t, device=keys.device)[None, :] > qpos[:, None], float("-inf"))
    votes = torch.softmax(scores, -1)[..., :t - w].sum(-2)  # [b, k, T - w]
    pooled = F.avg_pool1d(votes, kernel_size=kernel, padding=kernel // 2, stride=1, count_include_pad=False)
    return pooled.mean(1)


def srh_select(query_obs: Tensor, keys: Tensor, scaling: float, keep: int, kernel: int, heads: list[int]) -> Tensor:
    """Sorted token indices [b, keep] every KV head of the layer keeps: the top voted + the w observation tokens."""
    b, t, w = keys.shape[0], keys.shape[2], query_obs.shape[2]
    top = srh_votes(query_obs, keys, scaling, kernel, heads).topk(keep - w, dim=-1).indices
    recent = torch.arange(t - w, t, device=keys.device).expand(b, w)
    return torch.cat([top, recent], -1).sort(-1).values


def top_heads(scores: np.ndarray, k: int) -> list[list[int]]:
    """Each layer's k query heads with the highest score (ties: the lower index first; NaN last)."""
    filled = np.nan_to_num(np.asarray(scores, dtype=float), nan=-np.inf)
    return [sorted(np.argsort(-row, kind="stable")[:k].tolist()) for row in filled]


class _NeedleMassObserver(Observer):
    """Attention mass of each head's single decode-step query row on the whole needle span."""

    def __init__(self, geometry: Geometry, span: tuple[int, int]):
        self.span = span
        self.mass = torch.zeros(geometry.n_layers, geometry.n_heads, dtype=torch.float64)

    def observe(self, chunk: AttentionChunk) -> None:
        w = chunk.weights
        if w.shape[0] != 1 or chunk.n_queries != 1:
            raise HeadwiseError("semantic retrieval scoring observes single-sequence decode steps only")
        start = max(0, self.span[0] - chunk.key_offset)
        end = max(0, self.span[1] - chunk.key_offset)
        self.mass[chunk.layer] = w[0, :, -1, start:end].sum(-1).double()


def semantic_trial(loaded: Any, case: NeedleCase) -> tuple[np.ndarray, float, str]:
    """(per-head score [layers, heads], ROUGE-1 recall of the needle, reply) of one greedy needle trial."""
    g = loaded.geometry
    span = case.needle_spans[case.target]
    needle_tokens = set(case.input_ids[0, span[0]:span[1]].tolist())
    score = np.zeros((g.n_layers, g.n_heads))

    def on_step(step: int, tokens: Tensor, observers: Any) -> None:
        if int(tokens[0]) in needle_tokens:
            score[:] += observers[0].mass.numpy()

    replies = greedy(loaded, case.input_ids, case.reply_budget, until="line",
                     observe=lambda: [_NeedleMassObserver(g, span)], on_step=on_step)
    reply = replies.texts[0]
    return score, rouge1_recall(case.needles[case.target].text, reply), reply


def _output_projection(module: torch.nn.Module) -> torch.nn.Module:
    proj = getattr(module, "o_proj", None) or getattr(module, "c_proj", None)
    if proj is None:
        raise HeadwiseError(f"{type(module).__name__} has no o_proj/c_proj output projection; srh_eviction_error "
                            f"measures layer outputs after it")
    return proj


class _EvictionError:
    """A Session `mix` that leaves the full cache's outputs alone and sums each layer's eviction error."""

    def __init__(self, geometry: Geometry, heads: list[list[int]], budget: int):
        self.geometry, self.heads, self.budget = geometry, heads, budget
        self.error = np.zeros(geometry.n_layers)
        self.kept: dict[int, Tensor] = {}
        self.prompt: dict[int, int] = {}

    def __call__(self, module: torch.nn.Module, layer: int, query: Tensor, key: Tensor, value: Tensor,
                 scaling: float, out: Tensor) -> Tensor:
        if self.geometry.windowed[layer]:
            return out
        t, m = key.shape[2], query.shape[2]
        if m > 1:  # the prompt, in one call: choose what the layer would keep
            w = min(WINDOW, t)
            if t <= self.budget:
                kept = torch.arange(t, device=key.device).expand(key.shape[0], t)
            else:
                kept = srh_select(query[:, :, -w:], key, scaling, self.budget, KERNEL, self.heads[layer])
            self.kept[layer], self.prompt[layer] = kept, t
            return out
        index = torch.cat([self.kept[layer][0], torch.arange(self.prompt[layer], t, device=key.device)])
        kept_out = F.scaled_dot_product_attention(query, key[:, :, index], value[:, :, index], scale=scaling,
                                                  enable_gqa=key.shape[1] != query.shape[1]).transpose(1, 2)
        proj = _output_projection(module)
        b = out.shape[0]
        full = proj(out.reshape(b, m, -1)).float()
        evicted = proj(kept_out.reshape(b, m, -1).to(out.dtype)).float()
        self.error[layer] += float(torch.linalg.norm(evicted - full) / (torch.linalg.norm(full) + 1e-5))
        return out


def eviction_error(loaded: Any, cases: list[NeedleCase], heads: list[list[int]],
                   budget: int = EVICTION_BUDGET) -> np.ndarray:
    """Per-layer eviction error summed over the cases' decode steps (not normalized)."""
    g = loaded.geometry
    mix = _EvictionError(g, heads, budget)
    with torch.inference_mode(), Session(g, mix=mix):
        for case in progress(cases, desc="eviction error", unit="prompt"):
            ids = case.input_ids.to(loaded.device)
            logits, cache = forward(loaded.model, ids)
            for _ in range(case.reply_budget):
                logits, cache = forward(loaded.model, logits[:, -1].argmax(-1, keepdim=True), cache)
    return mix.error


def layer_share(error: np.ndarray) -> np.ndarray:
    total = float(np.sum(error))
    return np.asarray(error, dtype=float) / (total + 1e-12)


class SemanticRetrievalScores(ComputedScoreFamily):
    family = "semantic_retrieval"
    scores = (
        Score("semantic_retrieval", "CompressKV (Lin et al. 2025): attention mass a head puts on the whole needle "
                                    "at decode steps that generate a needle token; mean over trials recalling > 50% "
                                    "of the needle", needs_full="high"),
        Score("srh_eviction_error", "CompressKV: the share of the summed relative output error of the head's layer "
                                    "when it keeps only the tokens its top semantic-retrieval heads vote for "
                                    "(same value on every head of a layer; layers sum to 1)"),
    )
    settings = (
        RetrievalScores.settings[0],  # the needle grid, shared with the retrieval scores
        Setting("srh_heads", SRH_HEADS, "CompressKV: semantic retrieval heads per layer that vote for the tokens "
                                        "when the eviction error is measured", minimum=1),
        Setting("eviction_budget", EVICTION_BUDGET, "CompressKV: tokens per layer kept when the eviction error is "
                                                    "measured", minimum=WINDOW + 1),
    )

    def check(self, geometry: Geometry, settings: Any) -> None:
        grid(settings.retrieval_grid, geometry.max_positions)
        if settings.srh_heads > geometry.n_heads:
            raise HeadwiseError(f"--srh-heads {settings.srh_heads} is more than the model's {geometry.n_heads} "
                                f"query heads per layer")

    def compute(self, loaded: Any, settings: Any, names: list[str]) -> ScoreResult:
        g = loaded.geometry
        contexts, depths = grid(settings.retrieval_grid, g.max_positions)
        needles = bundled_needles()
        cells = [(c, d, i) for c in contexts for d in depths for i in range(len(needles))]
        cases, kept, records = [], [], []
        for index, (context, depth, i) in enumerate(progress(cells, desc="semantic retrieval trials", unit="trial")):
            case = needle_case(loaded.tokenizer, context=context, depth=depth, needle=needles[i],
                               seed=settings.seed + index, text=settings.text, max_positions=g.max_positions)
            score, recall, reply = semantic_trial(loaded, case)
            cases.append(case)
            if recall > MIN_RECALL:
                kept.append(score)
            records.append({"context": context, "depth": depth, "needle": i, "seed": settings.seed + index,
                            "reply": reply, "needle_recall": round(recall, 4), "kept": recall > MIN_RECALL})
        if not kept:
            note(f"semantic_retrieval: the model recalled none of the {len(cases)} needles; the scores are "
                 f"undefined (NaN). Try shorter contexts.")
            srh = np.full((g.n_layers, g.n_heads), np.nan)
        else:
            srh = np.mean(kept, axis=0)
        scores = {"semantic_retrieval": srh}
        result_settings = {"probe": "needle_semantic_retrieval", "grid": settings.retrieval_grid, "contexts": contexts,
                           "depths": depths, "needles": "bundled", "seed": settings.seed,
                           "trial_seed": "seed + trial index", "min_recall": MIN_RECALL, "trials": len(cases),
                           "kept": len(kept), "srh_heads": settings.srh_heads}
        if "srh_eviction_error" in names:
            heads = top_heads(srh, settings.srh_heads)
            share = layer_share(eviction_error(loaded, cases, heads, settings.eviction_budget)) if kept else \
                np.full(g.n_layers, np.nan)
            scores["srh_eviction_error"] = np.repeat(share[:, None], g.n_heads, axis=1)
            result_settings.update({"eviction_budget": settings.eviction_budget, "window": WINDOW, "kernel": KERNEL,
                                    "srh_per_layer": heads, "calibration": "every trial's prompt, full-cache "
                                    "greedy decode of its reply budget"})
        return ScoreResult(scores=scores, profiles={"semantic_retrieval_trials": {"records": records}},
                           settings=result_settings)


__all__ = ["EVICTION_BUDGET", "KERNEL", "SRH_HEADS", "WINDOW", "SemanticRetrievalScores", "eviction_error",
           "layer_share", "semantic_trial", "srh_select", "srh_votes", "top_heads"]
