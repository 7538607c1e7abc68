"""retrieval (Wu et al., arXiv 2404.15574) and retrieval_mass (HeadKV, arXiv 2410.19258).

Needle-in-a-haystack trials over a grid of context lengths x needle depths x needles. The
prompt is prefilled (plain SDPA, nothing observed), then the model decodes greedily with its
KV cache; every decode step's single query row is watched through the instrument Session.
As in the paper's code, the first observed step is the last prompt token, whose output is the
first generated token. Replies end by headwise.decode's rule for replies to a question.

retrieval: at each step, a head "copies" when its top-1 attended key lies inside the needle
span AND the prompt token there equals the token generated at that step; each copy adds
1/len(needle). A trial counts only when the reply recalls more than half of the needle's
words (ROUGE-1 recall > 0.5, as the paper's code; we use plain lower-cased words, without its
Porter stemmer). The score is the mean over kept trials.

retrieval_mass: HeadKV's variant. At each step take the head's top-k keys (k = needle
length), sum the attention weight of those inside the needle span (no token match), and
average over the trial's decode steps; mean over the trials whose reply contains the needle's
short answer. HeadKV stops decoding after len(answer) tokens and keeps trials by QA F1 > 50;
we decode as long as for `retrieval` (one shared decode), where a correct reply repeats the
needle and its F1 against the short answer is low, so "contains the answer" replaces F1.
HeadKV also multiplies by the constant 10/(len(needle) x len(answer)) instead of averaging
over steps; the ranking within a trial is the same, and ours stays in [0, 1].

Every trial is kept as a record (grid cell, reply, recall, kept or not, and the heads that
copied in it) so a user can see why a head scored.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._progress import note, progress
from ..decode import greedy
from ..errors import HeadwiseError
from ..geometry import Geometry
from ..instrument import AttentionChunk, Observer
from ..probes.needle import REPLY_EXTRA_TOKENS, NeedleCase, answer_found, bundled_needles, needle_case, normalize
from ..roles import RoleRule
from .base import ComputedScoreFamily, Score, ScoreResult, Setting

# Contexts where smollm2-135m still retrieves (measured: needle accuracy 12/12 at 256, 9/12 at
# 512, 6/12 at 1024, 0/12 at 2048 tokens): trials it fails are dropped anyway, so longer
# contexts would only cost time.
GRIDS: dict[str, dict[str, tuple]] = {
    "default": {"contexts": (256, 512, 1024), "depths": (0.1, 0.5, 0.9)},
    # The paper's sweep: 20 context lengths from 1K to 50K (capped at the model's limit) x 10 depths.
    "full": {"contexts": tuple(int(round(x)) for x in np.linspace(1000, 50000, 20)),
             "depths": tuple(float(x) for x in np.linspace(0.0, 1.0, 10))},
}
EXTRA_DECODE_TOKENS = REPLY_EXTRA_TOKENS  # decode up to len(needle) + this many tokens (NeedleCase.reply_budget)
MIN_RECALL = 0.5


@dataclass
class Trial:
    """One decoded needle-in-a-haystack prompt and what every head did during the decode."""

    case: NeedleCase
    generated: list[int]
    reply: str
    recall: float  # ROUGE-1 recall of the needle's words in the reply
    answer_found: bool  # the reply contains the needle's short answer
    copies: np.ndarray  # [layers, heads] decode steps whose top-1 key copied from the needle
    mass: np.ndarray  # [layers, heads] sum over steps of top-k attention mass inside the needle
    cell: dict[str, Any] = field(default_factory=dict)
    top1: list[np.ndarray] = field(default_factory=list)  # per decode step: [layers, heads] attended position

    @property
    def span(self) -> tuple[int, int]:
        return self.case.needle_spans[self.case.target]

    @property
    def needle_len(self) -> int:
        s, e = self.span
        return e - s

    @property
    def score(self) -> np.ndarray:
        """The trial's retrieval score per head: copies / len(needle)."""
        return self.copies / self.needle_len

    @property
    def mean_mass(self) -> np.ndarray:
        return self.mass / max(1, len(self.generated))

    def record(self, min_recall: float = MIN_RECALL) -> dict[str, Any]:
        hits = {f"L{layer}.H{head}": round(float(self.score[layer, head]), 4)
                for layer, head in zip(*np.nonzero(self.copies))}
        return {**self.cell, "needle_span": list(self.span), "prompt_tokens": self.case.length,
                "reply": self.reply, "needle_recall": round(self.recall, 4), "answer_found": self.answer_found,
                "kept_retrieval": self.recall > min_recall, "kept_mass": self.answer_found,
                "decode_steps": len(self.generated), "copying_heads": hits}


class _DecodeStepObserver(Observer):
    """Top-1 key and top-k needle mass of each head, for a decode step's single query row."""

    def __init__(self, geometry: Geometry, span: tuple[int, int]):
        self.span = span
        self.top1 = torch.full((geometry.n_layers, geometry.n_heads), -1, dtype=torch.long)
        self.mass = torch.zeros(geometry.n_layers, geometry.n_heads, dtype=torch.float64)

    def observe(self, chunk: AttentionChunk) -> None:
        w = chunk.weights
        if w.shape[0] != 1 or chunk.n_queries != 1:
            raise HeadwiseError("retrieval scoring observes single-sequence decode steps only")
        row = w[0, :, -1]  # [heads, keys_seen]
        start, end = self.span
        # Keys are absolute position key_offset + j (a sliding-window cache may have dropped the oldest).
        self.top1[chunk.layer] = row.argmax(-1) + chunk.key_offset
        k = min(end - start, row.shape[-1])
        values, index = row.topk(k, dim=-1)
        index = index + chunk.key_offset
        inside = (index >= start) & (index < end)
        self.mass[chunk.layer] = (values * inside).sum(-1).double()


def _words(text: str) -> list[str]:
    return normalize(text).split()


def rouge1_recall(reference: str, reply: str) -> float:
    """Share of the reference's words (with multiplicity) that the reply contains."""
    ref, got = Counter(_words(reference)), Counter(_words(reply))
    total = sum(ref.values())
    return sum(min(n, got[w]) for w, n in ref.items()) / total if total else 0.0


def decode_trial(loaded: Any, case: NeedleCase, max_new_tokens: int | None = None) -> Trial:
    """Greedy-decode one case with the KV cache (headwise.decode's stop rule for replies), scoring
    every head at every decode step."""
    geometry = loaded.geometry
    span = case.needle_spans[case.target]
    prompt = case.input_ids[0].tolist()
    copies = np.zeros((geometry.n_layers, geometry.n_heads))
    mass = np.zeros((geometry.n_layers, geometry.n_heads))
    generated: list[int] = []
    top1_steps: list[np.ndarray] = []

    def on_step(step: int, tokens: torch.Tensor, observers: Any) -> None:
        nonlocal copies, mass
        nxt = int(tokens[0])
        generated.append(nxt)
        top1 = observers[0].top1.numpy().copy()
        top1_steps.append(top1)
        in_needle = (top1 >= span[0]) & (top1 < span[1])
        # The token at the attended position must be the token being generated: a copy.
        same = np.array([[prompt[p] == nxt if 0 <= p < len(prompt) else False for p in row] for row in top1])
        copies += in_needle & same
        mass += observers[0].mass.numpy()

    budget = case.reply_budget if max_new_tokens is None else max_new_tokens
    replies = greedy(loaded, case.input_ids, budget, until="line",
                     observe=lambda: [_DecodeStepObserver(geometry, span)], on_step=on_step)
    reply = replies.texts[0]
    needle = case.needles[case.target]
    return Trial(case=case, generated=generated, reply=reply, recall=rouge1_recall(needle.text, reply),
                 answer_found=answer_found(reply, needle.answer), copies=copies, mass=mass, top1=top1_steps)


def aggregate(trials: list[Trial], min_recall: float = MIN_RECALL) -> tuple[np.ndarray, np.ndarray]:
    """(retrieval, retrieval_mass): means over each score's kept trials; NaN when none was kept."""
    kept = [t.score for t in trials if t.recall > min_recall]
    kept_mass = [t.mean_mass for t in trials if t.answer_found]
    shape = trials[0].copies.shape if trials else (0, 0)
    retrieval = np.mean(kept, axis=0) if kept else np.full(shape, np.nan)
    retrieval_mass = np.mean(kept_mass, axis=0) if kept_mass else np.full(shape, np.nan)
    return retrieval, retrieval_mass


def grid(name: str, max_positions: int | None) -> tuple[list[int], list[float]]:
    if name not in GRIDS:
        raise HeadwiseError(f"unknown retrieval grid '{name}'; choose from {', '.join(GRIDS)}")
    contexts = list(GRIDS[name]["contexts"])
    if max_positions is not None:
        limit = max_positions - 64  # room for the decoded reply
        if name == "full":
            contexts = sorted({min(c, limit) for c in contexts})
        contexts = [c for c in contexts if c <= limit]
        if not contexts:
            raise HeadwiseError(f"this model's {max_positions} positions fit none of the '{name}' grid's contexts")
    return contexts, list(GRIDS[name]["depths"])


class RetrievalScores(ComputedScoreFamily):
    family = "retrieval"
    # Retrieval heads copy from anywhere in the context: they need the whole cache (Wu et al.; DuoAttention).
    scores = (
        Score("retrieval", "Wu et al. 2024: share of the needle a head copies while the model repeats it (top-1 "
                           "attended key inside the needle and equal to the generated token; mean over trials "
                           "recalling > 50% of the needle)",
              needs_full="high",
              role=RoleRule("retrieval", "retrieval", ">", 0.1,
                            "Wu et al. 2024 (arXiv 2404.15574): retrieval score > 0.1", precedence=5)),
        Score("retrieval_mass", "HeadKV (Fu et al. 2024): per decode step, attention mass inside the needle among "
                                "the head's top-k keys (k = needle length), no token match; mean over answered "
                                "trials", needs_full="high"),
    )
    settings = (Setting("retrieval_grid", "default", "needle trials of the retrieval scores: default (minutes on "
                                                     "CPU) or full (the paper's sweep, hours)",
                        choices=tuple(GRIDS), flag="--grid"),)

    def check(self, geometry: Geometry, settings: Any) -> None:
        grid(settings.retrieval_grid, geometry.max_positions)

    def compute(self, loaded: Any, settings: Any, names: list[str]) -> ScoreResult:
        grid_name = settings.retrieval_grid
        contexts, depths = grid(grid_name, loaded.geometry.max_positions)
        needles = bundled_needles()
        cells = [(c, d, i) for c in contexts for d in depths for i in range(len(needles))]
        trials = []
        for index, (context, depth, i) in enumerate(progress(cells, desc="retrieval trials", unit="trial")):
            seed = settings.seed + index
            case = needle_case(loaded.tokenizer, context=context, depth=depth, needle=needles[i], seed=seed,
                               text=settings.text, max_positions=loaded.geometry.max_positions)
            trial = decode_trial(loaded, case)
            trial.cell = {"context": context, "depth": depth, "needle": i, "seed": seed}
            trials.append(trial)
        retrieval, retrieval_mass = aggregate(trials)
        kept = sum(t.recall > MIN_RECALL for t in trials)
        kept_mass = sum(t.answer_found for t in trials)
        if not kept:
            note(f"retrieval: the model recalled none of the {len(trials)} needles; retrieval scores are undefined "
                 f"(NaN). Try shorter contexts or an instruct model.")
        result_settings = {
            "probe": "needle_retrieval", "grid": grid_name, "contexts": contexts, "depths": depths,
            "needles": "bundled", "n_needles": len(needles), "filler": "essay",
            "text": "bundled" if settings.text is None else str(settings.text), "seed": settings.seed,
            "trial_seed": "seed + trial index", "min_recall": MIN_RECALL,
            "max_new_tokens": f"len(needle) + {EXTRA_DECODE_TOKENS}", "trials": len(trials),
            "kept_retrieval": int(kept), "kept_mass": int(kept_mass),
            "chat_template": bool(getattr(loaded.tokenizer, "chat_template", None)),
        }
        profiles = {"retrieval_trials": {"records": [t.record() for t in trials]}}
        return ScoreResult(scores={"retrieval": retrieval, "retrieval_mass": retrieval_mass}, profiles=profiles,
                           settings=result_settings)


__all__ = ["GRIDS", "RetrievalScores", "Trial", "aggregate", "decode_trial", "grid", "rouge1_recall"]
