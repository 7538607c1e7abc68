"""ACT, the Attention Calibration Technique (Yu et al., ICML 2024, arXiv 2406.15765): training-free.

Followed from the authors' code (github.com/GATECH-EIC/ACT, models/*_modelling_aug.py, scripts/*.sh):
- sinks, found on the fly in every attention map: key j is a sink of a head when the mean attention it
  receives from the queries that can see it exceeds `threshold` (their THRES = 0.1), the first token
  excepted (it is the usual sink and is left alone). `alpha` (off by default) switches to a length-scaled
  threshold alpha/N (N = keys seen), the form the project's brief gives; the released code uses 0.1.
- calibration: every query's attention on those sinks is multiplied by `beta` (their BETA = 0.4) and the
  mass removed goes to the other keys in proportion to their attention, so each row still sums to 1.
- head filtering, offline: each candidate head is calibrated alone on a small calibration set and kept if
  that improves the task (their calibration.sh loops over single heads of layers 2..L-2; layers 0, 1 and
  the last are never calibrated).

Departures:
- the selection metric is the mean log-probability of the answer's first token at the prompt's last
  position (their classification metric reads the same next-token logits, as accuracy over the label
  choices); `metric="accuracy"` uses argmax == answer. The calibration set is `calibration` (16) pairs of
  task.train in the task's own prompt format with `shots` examples, not their 900 mixed-dataset prompts.
- CPU budget: the heads of one layer are screened in one batched pass (row block h calibrates head h, one
  more block calibrates none, which is the baseline the gain is measured against), and the layers before
  the screened one replay their cached outputs instead of being recomputed.
- sinks are found per query chunk of headwise's attention function (the whole prompt at prefill, one row
  per decoding step), counting the queries that see key j causally (a causal language model is assumed).
strength s scales the calibration: effective beta = 1 - s * (1 - beta); s = 0 skips the edit entirely.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._progress import progress
from ..errors import HeadwiseError
from ..geometry import Geometry
from ..instrument import HeadEdits, Session
from ..parts import decoder_layers, lm_logits
from ..tasks import encode, few_shot_prompt
from .base import Steering, register_method

METRICS = ("logprob", "accuracy")


def calibrate(probs: Tensor, query_index: Tensor, key_offset: int, beta: float, threshold: float,
              alpha: float | None = None, mask: Tensor | None = None) -> Tensor:
    """ACT on probs [batch, heads, chunk, keys]; mask [batch or 1, heads] bool limits it to some heads."""
    keys = torch.arange(probs.shape[-1], device=probs.device)
    seen_by = (query_index[:, None] >= keys[None, :]).sum(0)  # queries of the chunk that may attend to key j
    received = probs.sum(-2) / seen_by.clamp(min=1)  # [b, h, keys]
    limit = alpha / probs.shape[-1] if alpha is not None else threshold
    sink = (received > limit) & (seen_by > 0) & (keys + key_offset != 0)
    if mask is not None:
        sink = sink & mask[..., None]
    on_sink = probs * sink[..., None, :]
    rest = probs - on_sink
    rest_mass = rest.sum(-1, keepdim=True)
    moved = on_sink.sum(-1, keepdim=True) * (1.0 - beta)
    out = rest + beta * on_sink + moved * rest / rest_mass.clamp(min=torch.finfo(probs.dtype).tiny)
    # A row whose whole mass sits on sinks has nowhere to send it: left as it is.
    return torch.where(rest_mass > 0, out, probs)


def _answer_token(tokenizer: Any, prompt: str, target: str) -> int:
    """The first token of the answer as it follows the prompt ("A:" + " target")."""
    head, full = encode(tokenizer, prompt), encode(tokenizer, f"{prompt} {target}")
    if full[:len(head)] == head and len(full) > len(head):
        return full[len(head)]
    return tokenizer(" " + target, add_special_tokens=False).input_ids[0]


def calibration_set(loaded: Any, task: Any, size: int, shots: int, seed: int) -> list[list[tuple[list[int], int]]]:
    """`size` training prompts (with `shots` examples each) and their answers' first tokens, grouped by
    token length so that each group runs as one unpadded batch."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(task.train), size=min(size, len(task.train)), replace=False)
    groups: dict[int, list[tuple[list[int], int]]] = {}
    for i in chosen:
        pair = task.train[int(i)]
        text = few_shot_prompt(task, pair.prompt, shots, rng)
        ids = encode(loaded.tokenizer, text)
        groups.setdefault(len(ids), []).append((ids, _answer_token(loaded.tokenizer, text, pair.target)))
    return list(groups.values())


class _Replay:
    """Make decoder layers return their cached outputs instead of computing; the last one's output is tiled
    `copies` times (the next layer reads only that; the others' outputs feed replayed layers and are ignored)."""

    def __init__(self, layers: Sequence[torch.nn.Module], outputs: Sequence[Any], copies: int):
        self.layers, self.outputs, self.copies = layers, outputs, copies

    def _tile(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.repeat(self.copies, *([1] * (value.dim() - 1)))
        return type(value)(self._tile(v) for v in value) if isinstance(value, tuple) else value

    def __enter__(self) -> _Replay:
        for i, (layer, out) in enumerate(zip(self.layers, self.outputs)):
            out = self._tile(out) if i == len(self.layers) - 1 else out
            layer.forward = lambda *args, _out=out, **kwargs: _out  # instance attribute, removed on exit
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers:
            del layer.forward


class ACT(Steering):
    method = "act"
    description = "ACT: scale down attention on hidden sink tokens in heads where that helps (training-free)"

    def __init__(self, geometry: Geometry, heads: Sequence[tuple[int, int]], strength: float = 1.0,
                 settings: dict[str, Any] | None = None, gain: Tensor | None = None):
        super().__init__(geometry, heads, strength, settings)
        self.gain = gain if gain is not None else torch.zeros(geometry.n_layers, geometry.n_heads)

    @classmethod
    def fit(cls, loaded: Any, task: Any, *, heads: Sequence[tuple[int, int]] | None = None, seed: int = 0,
            beta: float = 0.4, threshold: float = 0.1, alpha: float | None = None, calibration: int = 16,
            shots: int = 0, metric: str = "logprob", skip_first: int = 2, skip_last: int = 1,
            min_gain: float = 0.0, **options: Any) -> ACT:
        if options:
            raise HeadwiseError(f"act takes no option {', '.join(sorted(options))}; its options are beta, threshold, "
                                f"alpha, calibration, shots, metric, skip_first, skip_last, min_gain")
        if metric not in METRICS:
            raise HeadwiseError(f"unknown ACT selection metric '{metric}'; choose from {', '.join(METRICS)}")
        if not 0.0 <= beta <= 1.0:
            raise HeadwiseError(f"ACT's beta scales the attention on sinks and must be in [0, 1], got {beta}")
        loaded.require("text", "ACT steering")
        geometry = loaded.geometry
        settings: dict[str, Any] = {"beta": beta, "threshold": threshold, "alpha": alpha, "seed": seed,
                                    "sink_rule": "mean attention from the queries that see it > "
                                                 + (f"{alpha}/N" if alpha is not None else f"{threshold}")}
        if heads is not None:
            settings.update(selection="given", n_heads=len(heads))
            return cls(geometry, heads, settings=settings)
        start = time.perf_counter()
        groups = calibration_set(loaded, task, calibration, shots, seed)
        n_prompts = sum(len(g) for g in groups)
        candidates = list(range(skip_first, geometry.n_layers - skip_last))
        gain = torch.zeros(geometry.n_layers, geometry.n_heads)
        layers = decoder_layers(loaded.model, geometry)
        hq = geometry.n_heads
        batches = []
        for group in groups:  # the unsteered pass of each group: its score and every layer's output
            ids = torch.tensor([g[0] for g in group], device=loaded.device)
            answers = torch.tensor([g[1] for g in group], device=loaded.device)
            outputs: list[Any] = [None] * geometry.n_layers
            hooks = [layer.register_forward_hook(lambda m, a, out, _i=i, _to=outputs: _to.__setitem__(_i, out))
                     for i, layer in enumerate(layers)]
            try:
                _score(loaded, ids, answers, metric, HeadEdits(weights=lambda layer, p, q, k: p))
            finally:
                for h in hooks:
                    h.remove()
            # Row block h (h < heads) calibrates head h only; the last block calibrates nothing (the baseline).
            mask = torch.zeros(hq + 1, len(group), hq, dtype=torch.bool, device=loaded.device)
            mask[torch.arange(hq), :, torch.arange(hq)] = True
            batches.append((ids, answers, outputs, mask.reshape(-1, hq)))
        work = [(batch, layer) for batch in batches for layer in candidates]
        for (ids, answers, outputs, mask), layer in progress(work, desc="ACT head filtering", unit="pass"):
            def edit(at: int, probs: Tensor, query_index: Tensor, key_offset: int, _layer: int = layer,
                     _mask: Tensor = mask) -> Tensor:
                if at != _layer:
                    return probs
                return calibrate(probs, query_index, key_offset, beta, threshold, alpha, _mask)

            with _Replay(layers[:layer], outputs[:layer], hq + 1):  # layers before `layer` are not recomputed
                score = _score(loaded, ids.repeat(hq + 1, 1), answers.repeat(hq + 1), metric, HeadEdits(weights=edit))
            score = score.reshape(hq + 1, len(ids))
            gain[layer] += (score[:hq] - score[hq:]).sum(1).cpu() / n_prompts
        selected = [(layer, h) for layer in candidates for h in range(hq) if gain[layer, h] > min_gain]
        settings.update(selection="single-head filtering", metric=metric, calibration=n_prompts, shots=shots,
                        skip_first=skip_first, skip_last=skip_last, min_gain=min_gain,
                        candidates=len(candidates) * hq, batched_passes=len(work), n_heads=len(selected),
                        fit_seconds=round(time.perf_counter() - start, 1))
        return cls(geometry, selected, settings=settings, gain=gain)

    def edits(self) -> HeadEdits:
        if self.strength == 0 or not self.heads:
            return HeadEdits()  # the model's own attention path, untouched
        beta = 1.0 - self.strength * (1.0 - float(self.settings.get("beta", 0.4)))
        threshold, alpha = float(self.settings.get("threshold", 0.1)), self.settings.get("alpha")
        by_layer: dict[int, list[int]] = {}
        for layer, head in self.heads:
            by_layer.setdefault(layer, []).append(head)
        index = {layer: torch.tensor(hs) for layer, hs in by_layer.items()}

        def weights(layer: int, probs: Tensor, query_index: Tensor, key_offset: int) -> Tensor:
            heads = index.get(layer)
            if heads is None:
                return probs
            heads = heads.to(probs.device)
            probs[:, heads] = calibrate(probs[:, heads], query_index, key_offset, beta, threshold, alpha)
            return probs

        return HeadEdits(weights=weights)

    def tensors(self) -> dict[str, Tensor]:
        mask = torch.zeros(self.geometry.n_layers, self.geometry.n_heads)
        for layer, head in self.heads:
            mask[layer, head] = 1.0
        return {"head_mask": mask, "gain": self.gain.float()}

    @classmethod
    def from_saved(cls, geometry: Geometry, heads: Sequence[tuple[int, int]], tensors: dict[str, Tensor],
                   settings: dict[str, Any], strength: float = 1.0) -> ACT:
        shape = [geometry.n_layers, geometry.n_heads]
        for name in ("head_mask", "gain"):
            if name not in tensors or list(tensors[name].shape) != shape:
                got = list(tensors[name].shape) if name in tensors else "nothing"
                raise HeadwiseError(f"ACT steering tensor '{name}' must be {shape} for this model, got {got}; "
                                    f"re-fit it with headwise steer")
        marked = sorted(tuple(int(x) for x in hw) for hw in torch.nonzero(tensors["head_mask"] > 0).tolist())
        if marked != sorted((int(a), int(b)) for a, b in heads):
            raise HeadwiseError("ACT steering's head_mask does not match its list of heads; re-fit it")
        return cls(geometry, heads, strength=strength, settings=settings, gain=tensors["gain"].float().cpu())

    def trained_parameters(self) -> int:
        return 0  # training-free: only which heads to calibrate is chosen, by filtering


@torch.no_grad()
def _score(loaded: Any, ids: Tensor, answers: Tensor, metric: str, edits: HeadEdits) -> Tensor:
    """Per row: log p(answer | prompt) at the last position, or 1.0 where the answer is the argmax."""
    with Session(loaded.geometry, edits=edits):
        hidden = loaded.model.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, -1]
    logits = lm_logits(loaded.model, hidden).float()
    if metric == "accuracy":
        return (logits.argmax(-1) == answers).float()
    return torch.log_softmax(logits, -1).gather(-1, answers[:, None])[:, 0]


register_method(ACT)

__all__ = ["ACT", "calibrate"]
