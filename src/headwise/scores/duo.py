"""DuoAttention's retrieval-head gates (Xiao et al. 2024, arXiv 2410.10819), trained on CPU.

Each KV head j of every layer the model does not window itself gets a gate alpha_j, and its
query heads' attention output becomes

    alpha_j * full causal attention + (1 - alpha_j) * streaming attention (S sinks + W recent)

With the model frozen, only the gates are trained, on DuoAttention's synthetic multi-passkey
recall samples (probes/passkeys.py), to keep the model's last hidden states on the recall
part: L = mean over those positions of mean_d (H_full - H_mixed)^2 + lambda * mean_j |alpha_j|.
(The L1 term is a mean over the gates: as a sum, lambda * sum_j |alpha_j| drove 84 of
smollm2-135m's 90 gates below 0.001 within 120 steps, so they could no longer be ranked.)
As in the paper's code: gates start at 1 and are clamped to [0, 1] before every step; AdamW
(lr 0.02, no weight decay) with linear warm-up over the first fifth of the steps and decay
over the last fifth (floor 0.1); lambda = 0.05; S = 128, W = 256; 10 passkeys of 32 words at
depths 5-95%. What differs, for CPU: the paper trains 2000 steps on 1K-32K-token contexts;
headwise trains `duo_steps` steps (default 100) on `duo_haystack` tokens of prose (default
1024, ~2.3K tokens with the passkeys and questions). A high gate means the head needs the
full cache; kv.Policy.from_atlas(atlas, "duo", ...) keeps the top fraction, as DuoAttention
keeps the heads above a threshold.

The score is per KV head; the atlas repeats it on the head's query heads. Layers the model
windows (Gemma3's sliding layers) keep their own attention and get NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._progress import progress
from ..errors import HeadwiseError
from ..instrument import Session, sink_window_mask
from ..parts import final_hidden
from ..probes.passkeys import MultiPasskeySamples
from .base import ComputedScoreFamily, Score, ScoreResult, Setting


def gated_mix(geometry: Any, gates: Tensor, sink: int, window: int) -> Callable[..., Tensor]:
    """instrument.Session(mix=...) blending each KV group's full and sink+window attention by its gate."""
    masks: dict[tuple[int, Any], Tensor] = {}  # per length and device: layers may sit on different devices

    def mix(module: Any, layer: int, query: Tensor, key: Tensor, value: Tensor, scaling: float, out: Tensor) -> Tensor:
        if geometry.windowed[layer]:
            return out
        t = query.shape[2]
        if key.shape[2] != t:
            raise HeadwiseError("DuoAttention gates are trained on whole sequences; call the model without a cache")
        if (t, query.device) not in masks:
            positions = torch.arange(t, device=query.device)
            masks[t, query.device] = sink_window_mask(positions, positions, sink, window)
        stream = F.scaled_dot_product_attention(query, key, value, attn_mask=masks[t, query.device], scale=scaling,
                                                enable_gqa=key.shape[1] != query.shape[1]).transpose(1, 2)
        a = gates[layer].to(device=out.device, dtype=out.dtype)
        a = a.repeat_interleave(geometry.group_size)[None, None, :, None]
        return a * out + (1 - a) * stream

    return mix


def train_gates(loaded: Any, settings: Any) -> tuple[np.ndarray, list[dict[str, float]]]:
    """[layers, kv_heads] gates (NaN on the model's own sliding layers) and the loss per step."""
    g, model = loaded.geometry, loaded.model
    gated = ~torch.tensor(g.windowed)
    gates = torch.ones(g.n_layers, g.n_kv_heads, requires_grad=True)
    steps = int(settings.duo_steps)
    opt = torch.optim.AdamW([gates], lr=settings.duo_lr, weight_decay=0.0)
    ramp = max(1, steps // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, max((s + 1) / ramp, 0.1), max((steps - s) / ramp, 0.1)))
    samples = MultiPasskeySamples(loaded.tokenizer, settings.duo_haystack, n_passkeys=settings.duo_passkeys,
                                  passkey_words=settings.duo_passkey_words, text=settings.text, seed=settings.seed)
    mix = gated_mix(g, gates, settings.duo_sink, settings.duo_window)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    history = []
    try:
        for _ in progress(range(steps), desc="duo gates", unit="step"):
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            s = samples.sample()
            ids = s.input_ids.to(loaded.device)
            g.check_context(ids.shape[1])
            with torch.no_grad():
                target = final_hidden(model, ids)[0, s.label_mask]
            with torch.enable_grad(), Session(g, mix=mix):
                mixed = final_hidden(model, ids)[0, s.label_mask]
                distill = (target.float() - mixed.float()).pow(2).mean(-1).mean()
                reg = gates[gated].abs().mean()
                loss = distill + settings.duo_reg * reg
                opt.zero_grad()
                loss.backward()
            opt.step()
            sched.step()
            history.append({"distill": float(distill.detach()), "reg": float(reg.detach()),
                            "tokens": int(ids.shape[1])})
    finally:
        for p in frozen:
            p.requires_grad_(True)
    out = gates.detach().clamp(0.0, 1.0).double().numpy()
    out[~gated.numpy()] = np.nan
    return out, history


class DuoScores(ComputedScoreFamily):
    family = "duo"
    scores = (Score("duo", "DuoAttention gate of the head's KV group (Xiao et al. 2024), trained so that mixing full "
                           "and sink+window attention keeps the last hidden states on multi-passkey recall; "
                           "1 = needs the full KV cache, 0 = sinks + recent window suffice", needs_full="high"),)
    settings = (
        Setting("duo_steps", 100, "training steps of the duo score (DuoAttention gates; the paper: 2000 on GPUs)",
                minimum=1),
        Setting("duo_haystack", 1024, "prose tokens per duo training sample (plus the passkeys and questions; the "
                                      "paper: 1K-32K)", minimum=1),
        Setting("duo_passkeys", 10, "passkeys per duo training sample (the paper: 10)", minimum=1, maximum=20),
        Setting("duo_passkey_words", 32, "words per duo passkey (the paper: 32)", minimum=1),
        Setting("duo_sink", 128, "sink tokens of the streaming side of the duo gates", minimum=0),
        Setting("duo_window", 256, "recent tokens of the streaming side of the duo gates", minimum=1),
        Setting("duo_lr", 0.02, "learning rate of the duo gates (AdamW)", minimum=0.0),
        Setting("duo_reg", 0.05, "weight of the L1 penalty on the duo gates", minimum=0.0),
    )

    def compute(self, loaded: Any, settings: Any, names: list[str]) -> ScoreResult:
        gates, history = train_gates(loaded, settings)
        g = loaded.geometry
        per_query_head = np.repeat(gates, g.group_size, axis=1)
        first, last = history[:10], history[-10:]
        return ScoreResult(
            scores={"duo": per_query_head},
            settings={"duo": {"method": "DuoAttention gates (arXiv 2410.10819)", "steps": settings.duo_steps,
                              "haystack_tokens": settings.duo_haystack, "passkeys": settings.duo_passkeys,
                              "passkey_words": settings.duo_passkey_words, "sink": settings.duo_sink,
                              "window": settings.duo_window, "lr": settings.duo_lr, "reg": settings.duo_reg,
                              "sample_tokens": history[0]["tokens"] if history else None,
                              "distill_first10": float(np.mean([h["distill"] for h in first])) if first else None,
                              "distill_last10": float(np.mean([h["distill"] for h in last])) if last else None,
                              "gates_kv": [[None if np.isnan(x) else round(float(x), 4) for x in row]
                                           for row in gates]}})


__all__ = ["DuoScores", "gated_mix", "train_gates"]
