"""Soft injection of task embeddings (Park & Rhee 2025, "Soft Injection of Task Embeddings Outperforms
Prompt-Based In-Context Learning", arXiv 2507.20906, ACL 2026 Findings as "SITE"; authors' code:
github.com/SNU-DRL/Soft_Injection, utils.py).

1. Task embedding e[l, h]: the mean, over `prompts` few-shot prompts of `shots` training examples
   each (paper: 50 prompts x 10 shots), of head (l, h)'s attention output before the output
   projection at the prompt's last token.
2. Soft head-selection: a[l, h] = sigmoid(logit[l, h]), logits initialised at 0 (a = 0.5) and fitted
   with Adam (lr 0.2, as the authors) on zero-shot training prompts to minimise the cross-entropy of the
   target's first token, with the model frozen.
3. Injection: at the last token of the prompt only, out[l, h] <- (1 - a[l, h]) * out[l, h] + a[l, h] * e[l, h]
   for every head (the mixing is soft: every head is mixed by its own a). Generated tokens are not
   injected; they see the injected token through the KV cache (the authors' `last_token_only`).

Departures and choices, all recorded in `settings`:
- CPU budget: the authors take 400 Adam steps of one prompt each; we take 100 steps of 4 prompts (the
  same 400 training examples; prompts of unequal length are padded on the right, so every real token
  keeps its position and attention, as in the authors' batched code). The embedding keeps 50 x 10 shots.
- The authors keep the parameters with the best validation loss, but never update their best loss,
  so their rule returns the last step's parameters; we return the last step's parameters and hold no
  validation split out.
- loss="first" (default) is the paper's first-token loss; loss="all" teacher-forces the whole target
  and averages the cross-entropy over the batch's target tokens (the injection still sits only at the
  prompt's last token, so this matches what greedy decoding computes).
- `heads`: the heads with a > 0.5 after fitting (a summary for reports; the edit mixes every head by
  its a). Given heads (the random-heads control): only their logits train; every other head's a is 0.
- The edit sees a call's queries only: a call with several queries is the prefill and its last query
  is injected; a one-query call is a decode step and left alone. So a one-token prompt is not
  injected (as in the authors' code), nor is a prompt fed in chunks supported (each chunk's last token
  would be injected): `whole_prompt` makes `headwise generate --steer` feed the prompt in one call.
- `strength` s scales a (s * a); 0 drops the edit. Saved tensors: "task_embedding" [layers, heads,
  head_dim] and "selection" [layers, heads], the mixing weights a in [0, 1] (not the logits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._progress import progress
from ..errors import HeadwiseError
from ..geometry import Geometry
from ..instrument import HeadEdits, Session
from ..tasks import Task, encode, few_shot_prompt, query
from .base import Steering, register_method

SHOTS, PROMPTS, STEPS, BATCH, LR, THRESHOLD = 10, 50, 100, 4, 0.2, 0.5
EMBED_BATCH = 10  # few-shot prompts per forward pass while building the task embedding
LOSSES = ("first", "all")


def mix(out: Tensor, mixing: Tensor, embedding: Tensor, position: int | Tensor) -> Tensor:
    """out [batch, queries, heads, head_dim] with query `position` (an int, or one per row) softly
    replaced by the embedding: (1 - a) * out + a * e per head; mixing a [heads], embedding e [heads, head_dim]."""
    rows = torch.arange(out.shape[0], device=out.device)
    position = torch.as_tensor(position, device=out.device).expand(out.shape[0])
    row = out[rows, position].float()
    a = mixing.to(row.device)[:, None]
    mixed = (1 - a) * row + a * embedding.to(row.device)
    edited = out.clone()  # not in place: `out` may be needed for the backward pass
    edited[rows, position] = mixed.to(out.dtype)
    return edited


def right_padded(rows: Sequence[list[int]], pad: int, device: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, each row's last real index) of token lists padded on the right, so
    that every real token keeps the position and the attention it has alone."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids.to(device), mask.to(device), mask.sum(1).to(device) - 1


def head_outputs_at_last(loaded: Any, rows: Sequence[list[int]]) -> Tensor:
    """[prompts, layers, heads, head_dim]: every head's output before the output projection at each prompt's
    last token."""
    g = loaded.geometry
    found = torch.zeros(len(rows), g.n_layers, g.n_heads, g.head_dim)
    ids, mask, last = right_padded(rows, pad_id(loaded.tokenizer), loaded.device)

    def record(layer: int, out: Tensor) -> Tensor:
        found[:, layer] = out[torch.arange(len(rows), device=out.device), last].float().cpu()
        return out

    with torch.inference_mode(), Session(g, edits=HeadEdits(output=record)):
        loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return found


def pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0  # any id: padded positions are masked out and come after every real token


def prompt_and_target(tokenizer: Any, text: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and of its target as they follow it (" target"), tokenised together when
    the prompt's tokens are a prefix of the whole (so merges across the boundary are the model's)."""
    prompt, whole = encode(tokenizer, text), encode(tokenizer, f"{text} {target}")
    if whole[:len(prompt)] == prompt and len(whole) > len(prompt):
        return prompt, whole[len(prompt):]
    return prompt, list(tokenizer(" " + target, add_special_tokens=False).input_ids)


class SoftInjection(Steering):
    method = "soft_injection"
    description = "few-shot task embeddings mixed into zero-shot prompts by fitted per-head soft weights"
    whole_prompt = True  # injected at the prompt's last token: a chunked prompt would be injected per chunk

    def __init__(self, geometry: Geometry, heads: Sequence[tuple[int, int]], embedding: Tensor, selection: Tensor,
                 strength: float = 1.0, settings: dict[str, Any] | None = None):
        super().__init__(geometry, heads, strength, settings)
        self.embedding = embedding.detach().float().cpu()
        self.selection = selection.detach().float().cpu()

    @classmethod
    def fit(cls, loaded: Any, task: Task, *, heads: Sequence[tuple[int, int]] | None = None, seed: int = 0,
            shots: int = SHOTS, prompts: int = PROMPTS, steps: int = STEPS, batch: int = BATCH, lr: float = LR,
            loss: str = "first", threshold: float = THRESHOLD, **options: Any) -> SoftInjection:
        if options:
            raise HeadwiseError(f"soft_injection takes no option {', '.join(sorted(options))}; its options are "
                                f"shots, prompts, steps, batch, lr, loss, threshold")
        if loss not in LOSSES:
            raise HeadwiseError(f"soft_injection loss must be one of {', '.join(LOSSES)}, got '{loss}'")
        if min(shots, prompts, steps, batch) < 1 or not lr > 0:
            raise HeadwiseError("soft_injection needs shots, prompts, steps and batch of at least 1 and a positive lr")
        g, tok, device = loaded.geometry, loaded.tokenizer, loaded.device
        shots = min(shots, len(task.train) - 1)  # few_shot_prompt never shows the query among its shots
        rng = np.random.default_rng(seed)

        # 1. The task embedding: mean last-token head outputs over few-shot prompts of random training queries.
        few_shot = [encode(tok, few_shot_prompt(task, task.train[int(rng.integers(len(task.train)))].prompt, shots,
                                                rng)) for _ in range(prompts)]
        total = torch.zeros(g.n_layers, g.n_heads, g.head_dim)
        for start in progress(range(0, prompts, EMBED_BATCH), desc=f"{task.name} task embedding", unit="batch"):
            total += head_outputs_at_last(loaded, few_shot[start:start + EMBED_BATCH]).sum(0)
        embedding = total / prompts

        # 2. The soft head-selection a = sigmoid(logits); only the trainable heads' logits move.
        trainable = torch.ones(g.n_layers, g.n_heads, dtype=torch.bool)
        if heads is not None:
            trainable = torch.zeros_like(trainable)
            for layer, head in Steering(g, heads).heads:  # validates the pairs
                trainable[layer, head] = True
        gate_logits = torch.zeros(g.n_layers, g.n_heads, requires_grad=True)
        optimizer = torch.optim.Adam([gate_logits], lr=lr)
        encoded = [prompt_and_target(tok, query(p.prompt), p.target) for p in task.train]
        for _ in progress(range(steps), desc=f"{task.name} soft head-selection", unit="step"):
            drawn = [encoded[int(i)] for i in rng.choice(len(encoded), size=min(batch, len(encoded)), replace=False)]
            drawn = [(prompt, target[:1] if loss == "first" else target) for prompt, target in drawn]
            # Teacher forcing: prompt + target[:-1]; the injection sits at the prompt's last token, where the
            # first target token is read (later target tokens see it through attention, as in decoding).
            ids, mask, _ = right_padded([prompt + target[:-1] for prompt, target in drawn], pad_id(tok), device)
            at = torch.tensor([len(prompt) - 1 for prompt, _ in drawn], device=device)
            labels = torch.full(ids.shape, -100, dtype=torch.long, device=device)
            for i, (prompt, target) in enumerate(drawn):
                labels[i, len(prompt) - 1:len(prompt) - 1 + len(target)] = torch.tensor(target)
            with torch.enable_grad():
                mixing = torch.sigmoid(gate_logits) * trainable
                edit = HeadEdits(output=lambda layer, out, a=mixing, at=at: mix(out, a[layer], embedding[layer], at))
                with Session(g, edits=edit):
                    scores = loaded.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                cost = torch.nn.functional.cross_entropy(scores.flatten(0, 1), labels.flatten(), ignore_index=-100)
                # autograd.grad, not backward: the model's own .grad stays untouched (the model is frozen)
                (gate_logits.grad,) = torch.autograd.grad(cost, [gate_logits])
            optimizer.step()
        selection = (torch.sigmoid(gate_logits) * trainable).detach()

        chosen = heads if heads is not None else [tuple(map(int, i)) for i in torch.nonzero(selection > threshold)]
        settings = {"shots": shots, "prompts": prompts, "steps": steps, "batch": batch, "lr": lr, "optimizer": "adam",
                    "init_logit": 0.0, "loss": loss, "threshold": threshold, "seed": seed,
                    "heads_given": heads is not None, "trainable_heads": int(trainable.sum()),
                    "train_pairs": len(task.train), "inject": "last prompt token, prefill only",
                    "selection": "sigmoid(logit) mixing weights; untrained heads 0"}
        return cls(g, chosen, embedding, selection, settings=settings)

    def edits(self) -> HeadEdits:
        if self.strength == 0:
            return HeadEdits()
        mixing = (self.selection * self.strength).to(torch.float32)
        embedding = self.embedding
        active = [bool((mixing[layer] != 0).any()) for layer in range(self.geometry.n_layers)]

        def inject(layer: int, out: Tensor) -> Tensor:
            # One query: a decode step (see the module docstring); layers with every a = 0 are untouched.
            if out.shape[1] < 2 or not active[layer]:
                return out
            return mix(out, mixing[layer], embedding[layer], -1)

        return HeadEdits(output=inject)

    def tensors(self) -> dict[str, Tensor]:
        return {"task_embedding": self.embedding, "selection": self.selection}

    @classmethod
    def from_saved(cls, geometry: Geometry, heads: Sequence[tuple[int, int]], tensors: dict[str, Tensor],
                   settings: dict[str, Any], strength: float = 1.0) -> SoftInjection:
        g = geometry
        want = {"task_embedding": (g.n_layers, g.n_heads, g.head_dim), "selection": (g.n_layers, g.n_heads)}
        for name, shape in want.items():
            got = tensors.get(name)
            if got is None or tuple(got.shape) != shape or not torch.isfinite(got).all():
                raise HeadwiseError(f"soft_injection tensor '{name}' must be finite of shape {list(shape)}, got "
                                    f"{'none' if got is None else list(got.shape)}; re-fit it for this model")
        if not ((tensors["selection"] >= 0) & (tensors["selection"] <= 1)).all() or not math.isfinite(strength):
            raise HeadwiseError("soft_injection selection weights must lie in [0, 1] and strength be finite; re-fit it")
        return cls(g, heads, tensors["task_embedding"], tensors["selection"], strength=strength, settings=settings)

    def trained_parameters(self) -> int:
        return int(self.settings.get("trainable_heads", self.selection.numel()))


register_method(SoftInjection)

__all__ = ["SoftInjection", "head_outputs_at_last", "mix", "prompt_and_target"]
