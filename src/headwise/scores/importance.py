"""Head importance for pruning: three scores of how much the model needs each head, on a text set.

- importance_grad (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"): every
  head's output is multiplied by a mask xi_h = 1; I_h = E_x |dL(x)/dxi_h|, the expectation over
  sequences x of the absolute gradient of x's LM loss (mean token cross-entropy). One backward
  pass per batch serves all heads and all sequences of the batch: each batch row has its own
  mask (head_scale [batch, layers, heads] as a leaf tensor), so the gradient is per sequence.
  (Michel et al. then normalise per layer for pruning; the atlas keeps the raw expectation.)
- importance_norm (AMP, arXiv 2504.21174): I_h = ||o_h W_O^h||_1, the L1 norm of the head's
  contribution to the residual stream (its output through its slice of the output projection,
  bias excluded), averaged over the tokens and sequences of the text set.
- importance_ablation: the exact increase of the mean LM loss when the head alone is zeroed,
  by batched ablation (headwise/ablation.py: many single-head masks per pass, layers below the
  ablated one replayed from the clean pass).

Text set: `importance_sequences` windows of `importance_context` tokens of the bundled natural
text, or of the user's --text file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._progress import progress
from ..ablation import Readout, head_ablation_effects, sequence_losses
from ..geometry import Geometry
from ..instrument import AttentionChunk, Observer, Session
from ..parts import attention_modules, final_hidden, lm_logits, projection_matrix
from ..probes import Probe, natural_text
from .base import ComputedScoreFamily, Score, ScoreResult, Setting

PROBE = "importance_text"


def importance_text(tokenizer: Any, geometry: Geometry, settings: Any) -> Probe:
    geometry.check_context(settings.importance_context)
    return natural_text(tokenizer, context=settings.importance_context, n_sequences=settings.importance_sequences,
                        seed=settings.seed, text=settings.text, name=PROBE)


def gradient_importance(model: torch.nn.Module, geometry: Geometry, input_ids: torch.Tensor,
                        batch_size: int = 4) -> np.ndarray:
    """[layers, heads]: mean over sequences of |d loss(sequence) / d xi_h| (Michel et al.)."""
    device = next(model.parameters()).device
    grads = []
    batches = range(0, input_ids.shape[0], batch_size)
    for start in progress(batches, desc="importance_grad", total=len(batches), unit="batch"):
        ids = input_ids[start:start + batch_size].to(device)
        xi = torch.ones(ids.shape[0], geometry.n_layers, geometry.n_heads, device=device, requires_grad=True)
        with torch.enable_grad(), Session(geometry, head_scale=xi):
            hidden = final_hidden(model, ids)
            losses = _differentiable_losses(model, hidden, ids)
            (grad,) = torch.autograd.grad(losses.sum(), xi)
        grads.append(grad.abs().double().cpu())
    return torch.cat(grads).mean(0).numpy()


def _differentiable_losses(model: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(lm_logits(model, hidden[:, :-1]).float(), dim=-1)
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)


class _ContributionNorm(Observer):
    """Sums ||o_h W_O^h||_1 over each sequence's tokens, per head."""

    def __init__(self, matrices: list[torch.Tensor], geometry: Geometry):
        self.matrices = matrices
        self.geometry = geometry
        self.current: torch.Tensor | None = None

    def start(self, batch: int) -> None:
        self.current = torch.zeros(batch, self.geometry.n_layers, self.geometry.n_heads, dtype=torch.float64)

    def observe(self, chunk: AttentionChunk) -> None:
        w = self.matrices[chunk.layer]  # [heads, head_dim, hidden]
        out = chunk.output.float()
        for h in range(w.shape[0]):
            norms = (out[:, h] @ w[h].to(out.device)).abs().sum(-1)  # [batch, chunk]
            self.current[:, chunk.layer, h] += norms.sum(-1).double().cpu()


def norm_importance(model: torch.nn.Module, geometry: Geometry, input_ids: torch.Tensor, batch_size: int = 4,
                    chunk_bytes: int | None = None) -> np.ndarray:
    """[layers, heads]: mean over tokens and sequences of ||o_h W_O^h||_1 (AMP)."""
    matrices = [projection_matrix(a, geometry) for a in attention_modules(model, geometry)]
    observer = _ContributionNorm(matrices, geometry)
    device = next(model.parameters()).device
    sums = []
    kwargs = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    batches = range(0, input_ids.shape[0], batch_size)
    with torch.inference_mode(), Session(geometry, [observer], **kwargs):
        for start in progress(batches, desc="importance_norm", total=len(batches), unit="batch"):
            ids = input_ids[start:start + batch_size]
            observer.start(ids.shape[0])
            final_hidden(model, ids.to(device))
            sums.append(observer.current)
    return (torch.cat(sums) / input_ids.shape[1]).mean(0).numpy()


def ablation_importance(model: torch.nn.Module, geometry: Geometry, input_ids: torch.Tensor,
                        max_tokens: int = 16384) -> np.ndarray:
    """[layers, heads]: mean over sequences of the LM-loss increase when the head alone is zeroed."""
    effects = head_ablation_effects(model, geometry, input_ids, Readout.language_model(input_ids),
                                    max_tokens=max_tokens, desc="importance_ablation")
    return effects.mean(0).numpy()


def clean_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    with torch.inference_mode():
        hidden = final_hidden(model, input_ids.to(next(model.parameters()).device))
        return float(sequence_losses(model, hidden, Readout.language_model(input_ids)).mean())


class ImportanceScores(ComputedScoreFamily):
    family = "importance"
    # Importance is about pruning, not about which tokens a head reads: no KV-cache direction.
    scores = (
        Score("importance_grad", "mean |dL/dxi_h| of the LM loss w.r.t. a head mask (Michel et al. 2019)"),
        Score("importance_norm", "mean L1 norm of the head's output through its W_O slice (AMP, arXiv 2504.21174)"),
        Score("importance_ablation", "exact LM-loss increase when the head alone is zeroed (batched ablation)"),
    )
    settings = (
        Setting("importance_context", 128, "tokens per text sequence of the importance_* scores", minimum=2),
        Setting("importance_sequences", 4, "text sequences of the importance_* scores", minimum=1),
        Setting("importance_batch", 4, "sequences per forward/backward pass of importance_grad and importance_norm",
                minimum=1),
        Setting("ablation_tokens", 16384, "rows x tokens per batched-ablation pass (bounds its memory)",
                minimum=1),
    )

    def check(self, geometry: Geometry, settings: Any) -> None:
        geometry.check_context(settings.importance_context)

    def compute(self, loaded: Any, settings: Any, names: list[str]) -> ScoreResult:
        probe = importance_text(loaded.tokenizer, loaded.geometry, settings)
        ids = probe.input_ids
        model, g = loaded.model, loaded.geometry
        scores = {}
        if "importance_grad" in names:
            scores["importance_grad"] = gradient_importance(model, g, ids, settings.importance_batch)
        if "importance_norm" in names:
            scores["importance_norm"] = norm_importance(model, g, ids, settings.importance_batch,
                                                        settings.chunk_bytes)
        if "importance_ablation" in names:
            scores["importance_ablation"] = ablation_importance(model, g, ids, settings.ablation_tokens)
        run = {**probe.settings, "probe": PROBE, "clean_loss": round(clean_loss(model, ids), 6),
               "ablation_tokens": settings.ablation_tokens, "importance_batch": settings.importance_batch}
        return ScoreResult(scores=scores, settings=run)


__all__ = ["ImportanceScores", "ablation_importance", "clean_loss", "gradient_importance", "importance_text",
           "norm_importance"]
