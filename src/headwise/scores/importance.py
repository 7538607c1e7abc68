"""Head importance for pruning: how much the model needs each head, on a text set or an image set.

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

- importance_accuracy (image classifiers): the drop in classification accuracy when the head
  alone is zeroed, by the same batched ablation.

Text set: `importance_sequences` windows of `importance_context` tokens of the bundled natural
text, or of the user's --text file. Image set: the image probe (the bundled digits' test split, or
--images DIR); the loss is the classification cross-entropy against the images' labels, or
against the model's own clean predictions for unlabelled images (then importance_accuracy is the
share of predictions a head's removal flips).

For image models these are the pruning-based metrics of the ViT visual-analytics paper (Li et al.
2023): each head pruned alone, the accuracy drop and the loss increase, plus the gradient-based
estimate of Michel et al.; docs/vision.md says where headwise departs from it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._progress import progress
from ..ablation import Readout, class_ablation_effects, class_logits, head_ablation_effects, sequence_losses
from ..devices import execution_device
from ..errors import HeadwiseError
from ..geometry import Geometry
from ..instrument import AttentionChunk, Observer, Session
from ..parts import attention_modules, final_hidden, lm_logits, projection_matrix
from ..probes import Probe, natural_text
from ..roles import RoleRule
from .base import ComputedScoreFamily, Score, ScoreResult, Setting
from .shared_probes import IMAGE_SETTINGS, make_image_probe

PROBE = "importance_text"


def importance_text(tokenizer: Any, geometry: Geometry, settings: Any) -> Probe:
    geometry.check_context(settings.importance_context)
    return natural_text(tokenizer, context=settings.importance_context, n_sequences=settings.importance_sequences,
                        seed=settings.seed, text=settings.text, name=PROBE)


def gradient_importance(model: torch.nn.Module, geometry: Geometry, input_ids: torch.Tensor,
                        batch_size: int = 4) -> np.ndarray:
    """[layers, heads]: mean over sequences of |d loss(sequence) / d xi_h| (Michel et al.)."""
    device = execution_device(model)
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
    return probe_norm_importance(model, geometry, Probe(PROBE, input_ids), batch_size, chunk_bytes)


def probe_norm_importance(model: torch.nn.Module, geometry: Geometry, probe: Probe, batch_size: int = 4,
                          chunk_bytes: int | None = None) -> np.ndarray:
    """[layers, heads]: mean over every token of every input of a probe (text or images) of ||o_h W_O^h||_1."""
    matrices = [projection_matrix(a, geometry) for a in attention_modules(model, geometry)]
    observer = _ContributionNorm(matrices, geometry)
    device = execution_device(model)
    sums = []
    kwargs = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    batches = list(probe.batches(batch_size))
    with torch.inference_mode(), Session(geometry, [observer], **kwargs):
        for inputs in progress(batches, desc="importance_norm", total=len(batches), unit="batch"):
            observer.start(inputs.shape[0])
            model(**probe.model_inputs(inputs.to(device)))
            sums.append(observer.current)
    return (torch.cat(sums) / probe.length).mean(0).numpy()


def ablation_importance(model: torch.nn.Module, geometry: Geometry, input_ids: torch.Tensor,
                        max_tokens: int = 16384) -> np.ndarray:
    """[layers, heads]: mean over sequences of the LM-loss increase when the head alone is zeroed."""
    effects = head_ablation_effects(model, geometry, input_ids, Readout.language_model(input_ids),
                                    max_tokens=max_tokens, desc="importance_ablation")
    return effects.mean(0).numpy()


def clean_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    with torch.inference_mode():
        hidden = final_hidden(model, input_ids.to(execution_device(model)))
        return float(sequence_losses(model, hidden, Readout.language_model(input_ids)).mean())


def image_gradient_importance(model: torch.nn.Module, geometry: Geometry, pixel_values: torch.Tensor,
                              labels: torch.Tensor, batch_size: int = 4) -> np.ndarray:
    """[layers, heads]: mean over images of |d cross-entropy(image) / d xi_h| (Michel et al.)."""
    device = execution_device(model)
    grads = []
    batches = range(0, pixel_values.shape[0], batch_size)
    for start in progress(batches, desc="importance_grad", total=len(batches), unit="batch"):
        pixels, y = pixel_values[start:start + batch_size].to(device), labels[start:start + batch_size].to(device)
        xi = torch.ones(pixels.shape[0], geometry.n_layers, geometry.n_heads, device=device, requires_grad=True)
        with torch.enable_grad(), Session(geometry, head_scale=xi):
            losses = torch.nn.functional.cross_entropy(class_logits(model, pixels), y, reduction="none")
            (grad,) = torch.autograd.grad(losses.sum(), xi)
        grads.append(grad.abs().double().cpu())
    return torch.cat(grads).mean(0).numpy()


class ImportanceScores(ComputedScoreFamily):
    family = "importance"
    modalities = ("text", "image")
    # Importance is about pruning, not about which tokens a head reads: no KV-cache direction.
    # Default only for image models: the paper behind the image battery starts from importance;
    # the language-model battery (and its atlases) stays as it was.
    scores = (
        Score("importance_grad", "mean |dL/dxi_h| of the model's loss w.r.t. a head mask (Michel et al. 2019)",
              default=("image",)),
        Score("importance_norm", "mean L1 norm of the head's output through its W_O slice (AMP, arXiv 2504.21174)",
              default=("image",)),
        Score("importance_ablation", "exact loss increase (LM loss, or classification loss on images) when the "
                                     "head alone is zeroed (batched ablation)", default=("image",)),
        Score("importance_accuracy", "drop in classification accuracy when the head alone is zeroed (image "
                                     "classifiers; batched ablation)", default=("image",),
              role=RoleRule("important", "importance_accuracy", ">", 0.01, "headwise's cut: zeroing the head "
                            "alone costs more than 1 point of accuracy on the image probe", precedence=22)),
    )
    settings = (
        Setting("importance_context", 128, "tokens per text sequence of the importance_* scores", minimum=2),
        Setting("importance_sequences", 4, "text sequences of the importance_* scores", minimum=1),
        Setting("importance_batch", 4, "sequences (or images) per forward/backward pass of importance_grad and "
                                       "importance_norm", minimum=1),
        Setting("ablation_tokens", 16384, "rows x tokens per batched-ablation pass (bounds its memory; images "
                                          "count as their tokens)", minimum=1),
        *IMAGE_SETTINGS,
    )

    def check(self, geometry: Geometry, settings: Any) -> None:
        if geometry.modality == "text":
            geometry.check_context(settings.importance_context)

    def check_names(self, loaded: Any, names: list[str]) -> None:
        if loaded.geometry.modality == "text" and "importance_accuracy" in names:
            raise HeadwiseError("importance_accuracy measures image classifiers; for a language model use "
                                "importance_ablation (the LM-loss increase)")
        if loaded.geometry.modality == "image" and "ImageClassification" not in type(loaded.model).__name__:
            raise HeadwiseError(f"{type(loaded.model).__name__} has no image classifier, so the importance scores "
                                f"(loss and accuracy of its predictions) cannot be measured; profile it with "
                                f"--scores attention_distance,local_attention,prefix_attention,pattern_ae_error")

    def compute(self, loaded: Any, settings: Any, names: list[str]) -> ScoreResult:
        if loaded.geometry.modality == "image":
            return self._images(loaded, settings, names)
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

    def _images(self, loaded: Any, settings: Any, names: list[str]) -> ScoreResult:
        model, g = loaded.model, loaded.geometry
        probe = make_image_probe(loaded.preprocessor, g, settings)
        rows = max(1, settings.ablation_tokens // probe.length)  # images per pass: bounds memory
        # One clean pass: the clean accuracy and loss, and the labels of unlabelled images (the model's own
        # predictions). no_grad, not inference_mode: importance_grad differentiates a loss against these labels.
        with torch.no_grad():
            logits = class_logits(model, probe.pixel_values.to(loaded.device), rows).cpu()
        labels = probe.labels if probe.labels is not None else logits.argmax(-1)
        scores = {}
        if "importance_grad" in names:
            scores["importance_grad"] = image_gradient_importance(model, g, probe.pixel_values, labels,
                                                                  settings.importance_batch)
        if "importance_norm" in names:
            scores["importance_norm"] = probe_norm_importance(model, g, probe, settings.importance_batch,
                                                              settings.chunk_bytes)
        if {"importance_ablation", "importance_accuracy"} & set(names):
            loss_up, right_lost, _ = class_ablation_effects(model, g, probe.pixel_values, labels, max_images=rows,
                                                            desc="importance (ablation)")
            if "importance_ablation" in names:
                scores["importance_ablation"] = loss_up.mean(0).numpy()
            if "importance_accuracy" in names:
                scores["importance_accuracy"] = right_lost.mean(0).numpy()
        clean_right = (logits.argmax(-1) == labels).double()
        run = {**probe.settings, "probe": "importance_images", "labels": "true labels" if probe.labels is not None else
               "the model's clean predictions", "clean_accuracy": round(float(clean_right.mean()), 6),
               "clean_loss": round(float(torch.nn.functional.cross_entropy(logits, labels)), 6),
               "ablation_tokens": settings.ablation_tokens, "importance_batch": settings.importance_batch}
        return ScoreResult(scores=scores, settings=run)


__all__ = ["ImportanceScores", "ablation_importance", "clean_loss", "gradient_importance", "image_gradient_importance",
           "importance_text", "norm_importance", "probe_norm_importance"]
