"""Exact single-head ablation effects, many heads per forward pass.

`head_ablation_effects` zeroes each head alone and measures, per sequence, how the model's
next-token predictions change (loss increase, or KL divergence from the clean model). It is
exact (the same numbers as one forward pass per head) and saves work two ways:
- rows: B copies of the sequences go through one pass, copy i with head_scale zeroing head i
  (instrument.Session applies a different scale per batch row);
- prefix reuse: zeroing a head of layer L changes nothing below layer L, so the residual
  stream the clean pass produced at that depth is replayed and the layers below are skipped.
Memory is bounded by `max_tokens` (rows x sequence length per pass) and by reading the
vocabulary logits a few rows at a time.

Image classifiers go through `class_ablation_effects`, the same engine read out at the class
logits: per image, the loss increase and whether the prediction stops being right.

Used by the importance scores, the successor and DuoAttention scores' helpers, attribution
and validation: it is the engine, not a score.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._progress import progress
from .devices import execution_device
from .errors import HeadwiseError
from .geometry import Geometry
from .instrument import Session, single_head_ablation_scales
from .parts import decoder_layers, final_hidden, lm_logits

LOGIT_FLOATS = 2**25  # logits read per block (128 MB of float32)


# ---- what is read from the ablated model ---------------------------------------------------
@dataclass
class Readout:
    """Which next-token predictions of each sequence are scored, and how.

    positions [n, P] long: the positions whose next-token distribution is read; mask [n, P]
    marks the real ones (sequences may read different numbers). With `labels` [n, P] the
    metric is the mean cross-entropy of those tokens and a head's effect is the loss increase
    when it is zeroed; without, the effect is the mean KL(clean || ablated).
    """

    positions: Tensor
    mask: Tensor
    labels: Tensor | None = None

    @classmethod
    def language_model(cls, input_ids: Tensor) -> Readout:
        """Every position predicts the next token of the sequence: the LM loss."""
        n, t = input_ids.shape
        positions = torch.arange(t - 1).expand(n, -1)
        return cls(positions, torch.ones(n, t - 1, dtype=torch.bool), input_ids[:, 1:])

    def rows(self, repeat: int) -> Readout:
        return Readout(self.positions.repeat(repeat, 1), self.mask.repeat(repeat, 1),
                       None if self.labels is None else self.labels.repeat(repeat, 1))


def _log_probs(model: torch.nn.Module, hidden: Tensor, readout: Readout) -> Iterator[tuple[slice, Tensor]]:
    """Log-probabilities [rows, P, vocab] at the read positions, a block of rows at a time."""
    n, p = readout.positions.shape
    gathered = hidden.gather(1, readout.positions.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1]))
    vocab = model.get_output_embeddings().weight.shape[0]
    step = max(1, LOGIT_FLOATS // max(1, p * vocab))
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        yield rows, torch.log_softmax(lm_logits(model, gathered[rows]).float(), dim=-1)


def sequence_losses(model: torch.nn.Module, hidden: Tensor, readout: Readout) -> Tensor:
    """[rows] mean cross-entropy of the labelled tokens of each row."""
    out = torch.empty(hidden.shape[0], dtype=torch.float64)
    for rows, logp in _log_probs(model, hidden, readout):
        nll = -logp.gather(-1, readout.labels[rows].to(logp.device)[..., None]).squeeze(-1)
        mask = readout.mask[rows].to(nll.device)
        out[rows] = ((nll * mask).sum(-1) / mask.sum(-1).clamp_min(1)).double().cpu()
    return out


def _kl_from(clean: Tensor, model: torch.nn.Module, hidden: Tensor, readout: Readout, n: int) -> Tensor:
    """[rows] mean over read positions of KL(clean || this row); clean [n, P, vocab], row r is sequence r % n."""
    out = torch.empty(hidden.shape[0], dtype=torch.float64)
    for rows, logp in _log_probs(model, hidden, readout):
        ref = clean[torch.arange(rows.start, rows.stop) % n]
        kl = (ref.exp() * (ref - logp)).sum(-1)
        mask = readout.mask[rows].to(kl.device)
        out[rows] = ((kl * mask).sum(-1) / mask.sum(-1).clamp_min(1)).double().cpu()
    return out


# ---- replaying the clean residual stream ---------------------------------------------------
@contextlib.contextmanager
def _capture_layer_outputs(layers: Sequence[torch.nn.Module]) -> Iterator[list]:
    outputs: list = [None] * len(layers)
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
               for i, layer in enumerate(layers)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replay_below(layers: Sequence[torch.nn.Module], start: int, clean_output, repeat: int) -> Iterator[None]:
    """Skip layers [0, start): each returns the clean output of layer start-1, repeated `repeat` times
    along the batch (the residual stream an ablation at layer >= start cannot have changed)."""
    if start == 0:
        yield
        return
    if isinstance(clean_output, tuple):
        replayed = (clean_output[0].repeat(repeat, *([1] * (clean_output[0].dim() - 1))), *clean_output[1:])
    else:
        replayed = clean_output.repeat(repeat, *([1] * (clean_output.dim() - 1)))

    def skip(*args, **kwargs):
        return replayed

    # A layer loaded with a device_map has accelerate's hook as its own forward: it is put back, not deleted.
    hooked = [layer.__dict__.get("forward") for layer in layers[:start]]
    for layer in layers[:start]:
        layer.forward = skip
    try:
        yield
    finally:
        for layer, forward in zip(layers[:start], hooked):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


# ---- the batched ablation ------------------------------------------------------------------
def head_ablation_effects(model: torch.nn.Module, geometry: Geometry, input_ids: Tensor, readout: Readout,
                          heads: Sequence[tuple[int, int]] | None = None, max_tokens: int = 16384,
                          desc: str = "ablating heads",
                          on_chunk: Callable[[int], None] | None = None) -> Tensor:
    """[n, layers, heads] float64: per sequence, the effect of zeroing each head alone (NaN for
    heads not asked for). Loss increase with labels, KL(clean || ablated) without.

    input_ids [n, T]: equal-length sequences, read as `readout` says.
    """
    heads = sorted(heads if heads is not None else
                   [(layer, head) for layer in range(geometry.n_layers) for head in range(geometry.n_heads)])
    n, t = input_ids.shape
    device = execution_device(model)
    input_ids = input_ids.to(device)
    layers = decoder_layers(model, geometry)
    effects = torch.full((n, geometry.n_layers, geometry.n_heads), float("nan"), dtype=torch.float64)
    per_pass = max(1, max_tokens // max(1, n * t))
    with torch.inference_mode():
        with _capture_layer_outputs(layers) as clean_outputs:
            hidden = final_hidden(model, input_ids)
        if readout.labels is not None:
            clean = sequence_losses(model, hidden, readout)
        else:
            clean = torch.cat([logp for _, logp in _log_probs(model, hidden, readout)])
        chunks = [heads[i:i + per_pass] for i in range(0, len(heads), per_pass)]
        for chunk in progress(chunks, desc=desc, total=len(chunks), unit="pass"):
            k = len(chunk)
            start = chunk[0][0]  # heads are sorted: the lowest layer this pass ablates
            scale = single_head_ablation_scales(geometry, chunk).repeat_interleave(n, 0).to(device)
            ids = input_ids.repeat(k, 1)
            with replay_below(layers, start, clean_outputs[start - 1] if start else None, k), \
                    Session(geometry, head_scale=scale):
                ablated = final_hidden(model, ids)
            rows = readout.rows(k)
            if readout.labels is not None:
                effect = sequence_losses(model, ablated, rows) - clean.repeat(k)
            else:
                effect = _kl_from(clean, model, ablated, rows, n)
            for i, (layer, head) in enumerate(chunk):
                effects[:, layer, head] = effect[i * n:(i + 1) * n]
            if on_chunk is not None:
                on_chunk(k)
    return effects

# ---- image classifiers --------------------------------------------------------------------
def class_logits(model: torch.nn.Module, pixel_values: Tensor, batch: int | None = None) -> Tensor:
    """[n, classes] float32 logits of an image classifier, `batch` images per forward pass (default: all)."""
    step = batch or max(1, pixel_values.shape[0])
    parts = []
    for start in range(0, pixel_values.shape[0], step):
        out = model(pixel_values=pixel_values[start:start + step])
        logits = getattr(out, "logits", None)
        if logits is None or logits.dim() != 2:
            raise HeadwiseError(f"{type(model).__name__} has no image classifier head (no [images, classes] logits); "
                                f"head importance on images needs an image-classification model")
        parts.append(logits.float())
    return torch.cat(parts)


def class_ablation_effects(model: torch.nn.Module, geometry: Geometry, pixel_values: Tensor, labels: Tensor,
                           heads: Sequence[tuple[int, int]] | None = None, max_images: int = 512,
                           desc: str = "ablating heads") -> tuple[Tensor, Tensor, Tensor]:
    """Per image and head, zeroing that head alone: (loss increase [n, L, H], correct before minus correct
    after [n, L, H], clean correct [n]). NaN for heads not asked for.

    Exact, as head_ablation_effects: many heads per pass (one per copy of the images), layers below
    the lowest ablated one replayed from the clean pass. At most `max_images` images go through one
    pass (the images are split when there are more), which bounds memory.
    """
    heads = sorted(heads if heads is not None else
                   [(layer, head) for layer in range(geometry.n_layers) for head in range(geometry.n_heads)])
    n = pixel_values.shape[0]
    step = max(1, min(n, max_images))
    per_pass = max(1, max_images // step)
    passes = [(start, heads[i:i + per_pass]) for start in range(0, n, step) for i in range(0, len(heads), per_pass)]
    loss_up = torch.full((n, geometry.n_layers, geometry.n_heads), float("nan"), dtype=torch.float64)
    right_lost = loss_up.clone()
    clean_right = torch.empty(n, dtype=torch.float64)
    device = execution_device(model)
    layers = decoder_layers(model, geometry)
    clean_start, clean = -1, None
    with torch.inference_mode():
        for start, chunk in progress(passes, desc=desc, total=len(passes), unit="pass"):
            pixels = pixel_values[start:start + step].to(device)
            y = labels[start:start + step].to(device)
            m, k = pixels.shape[0], len(chunk)
            if start != clean_start:  # a new block of images: its clean pass, with every layer's output kept
                with _capture_layer_outputs(layers) as clean_outputs:
                    logits = class_logits(model, pixels)
                if logits.shape[-1] <= int(labels.max()):
                    raise HeadwiseError(f"labels go up to {int(labels.max())} but the model has {logits.shape[-1]} "
                                        f"classes")
                clean = (torch.nn.functional.cross_entropy(logits, y, reduction="none").double(),
                         (logits.argmax(-1) == y).double(), clean_outputs)
                clean_right[start:start + m] = clean[1].cpu()
                clean_start = start
            clean_loss, right0, outputs = clean
            lowest = chunk[0][0]  # heads are sorted: the lowest layer this pass ablates
            scale = single_head_ablation_scales(geometry, chunk).repeat_interleave(m, 0).to(device)
            with replay_below(layers, lowest, outputs[lowest - 1] if lowest else None, k), \
                    Session(geometry, head_scale=scale):
                ablated = class_logits(model, pixels.repeat(k, 1, 1, 1))
            rows = y.repeat(k)
            loss = torch.nn.functional.cross_entropy(ablated, rows, reduction="none").double().reshape(k, m)
            right = (ablated.argmax(-1) == rows).double().reshape(k, m)
            for i, (layer, head) in enumerate(chunk):
                loss_up[start:start + m, layer, head] = (loss[i] - clean_loss).cpu()
                right_lost[start:start + m, layer, head] = (right0 - right[i]).cpu()
    return loss_up, right_lost, clean_right


__all__ = ["Readout", "class_ablation_effects", "class_logits", "head_ablation_effects", "replay_below",
           "sequence_losses"]
