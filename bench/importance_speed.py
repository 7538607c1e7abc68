"""Timings of the three importance scores on smollm2-135m, and batched ablation against one
forward pass per head, side by side in one run on the same text set.

The per-head baseline is what one would write without headwise's batching: for each head, one
forward pass of the text set with that head zeroed (instrument.Session), full logits, loss. It
is timed on `--naive-heads` heads spread evenly over the layers (its cost does not depend on the
layer), one of them run after each batched pass so that both see the same load, and its
results are compared with the batched ones for those heads. The machine's load
average is recorded: on a shared CPU both timings move with it. Writes
bench/results/importance_speed.json.

    python bench/importance_speed.py [--sequences 4] [--context 128] [--naive-heads 12]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "importance_speed.json"
MODEL = "smollm2-135m"


def _top(values, k=5):
    import numpy as np

    order = np.argsort(-values.ravel(), kind="stable")[:k]
    return [{"head": f"L{i // values.shape[1]}.H{i % values.shape[1]}", "value": float(f"{values.ravel()[i]:.6g}")}
            for i in order]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sequences", type=int, default=None, help="default: ProfileSettings.importance_sequences")
    p.add_argument("--context", type=int, default=None, help="default: ProfileSettings.importance_context")
    p.add_argument("--naive-heads", type=int, default=12)
    a = p.parse_args()
    os.environ.setdefault("HEADWISE_QUIET", "1")

    import numpy as np
    import torch

    import headwise
    from headwise import Session, ablation_scale
    from headwise.ablation import Readout, head_ablation_effects
    from headwise.profile import ProfileSettings
    from headwise.scores.importance import gradient_importance, importance_text, norm_importance

    d = ProfileSettings()
    settings = ProfileSettings(importance_sequences=a.sequences or d.importance_sequences,
                               importance_context=a.context or d.importance_context)
    m = headwise.load(MODEL)
    g = m.geometry
    ids = importance_text(m.tokenizer, g, settings).input_ids
    out: dict = {"model": MODEL, "weights_sha256": m.info.weights_sha256, "text": "bundled",
                 "sequences": int(ids.shape[0]), "context": int(ids.shape[1]), "torch_threads": torch.get_num_threads(),
                 "cpu_count": os.cpu_count(), "platform": platform.platform(), "versions": headwise.atlas.versions(),
                 "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}

    t = time.perf_counter()
    grad = gradient_importance(m.model, g, ids, settings.importance_batch)
    out["importance_grad_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    norm = norm_importance(m.model, g, ids, settings.importance_batch)
    out["importance_norm_s"] = round(time.perf_counter() - t, 2)
    # Batched ablation of all heads, with the naive one-pass-per-head baseline interleaved: one
    # naive head after each batched pass, so both see the same mix of load on a shared machine.
    every = [(layer, head) for layer in range(g.n_layers) for head in range(g.n_heads)]
    picks = [every[int(i)] for i in np.linspace(0, len(every) - 1, a.naive_heads).round()]
    naive: dict = {}
    naive_times: list[float] = []

    def seq_loss(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                 reduction="none").view(ids.shape[0], -1).mean(-1)

    def naive_head(layer, head):
        t0 = time.perf_counter()
        with torch.inference_mode(), Session(g, head_scale=ablation_scale(g, [(layer, head)])):
            naive[(layer, head)] = float((seq_loss(m.model(ids, use_cache=False).logits) - clean).mean())
        naive_times.append(time.perf_counter() - t0)

    with torch.inference_mode():
        t0 = time.perf_counter()
        clean = seq_loss(m.model(ids, use_cache=False).logits)
        clean_s = time.perf_counter() - t0
    pending = list(picks)
    t = time.perf_counter()
    effects = head_ablation_effects(m.model, g, ids, Readout.language_model(ids), max_tokens=settings.ablation_tokens,
                                    on_chunk=lambda k: naive_head(*pending.pop(0)) if pending else None)
    total_s = time.perf_counter() - t
    for head in list(pending):
        naive_head(*head)
    abl = effects.mean(0).numpy()
    batched_s = total_s - sum(naive_times[:len(picks) - len(pending)])
    out["importance_ablation_s"] = round(batched_s, 2)
    per_head_naive = float(np.mean(naive_times)) + clean_s / len(every)  # the clean pass, shared by all heads
    per_head_batched = batched_s / len(every)
    out["ablation"] = {
        "heads": len(every), "ablation_tokens_per_pass": settings.ablation_tokens,
        "batched_s_per_head": round(per_head_batched, 3), "naive_heads_timed": len(picks),
        "naive_s_per_head": round(per_head_naive, 3),
        "naive_s_all_heads_estimate": round(per_head_naive * len(every), 1),
        "speedup_batched_vs_naive": round(per_head_naive / per_head_batched, 2),
        "max_abs_diff_vs_naive": float(f"{max(abs(naive[h] - abl[h]) for h in picks):.3g}"),
        "timing": "naive heads interleaved with the batched passes (one after each pass), timed separately",
    }
    rho = np.corrcoef(np.argsort(np.argsort(grad.ravel())), np.argsort(np.argsort(abl.ravel())))[0, 1]
    out["spearman_grad_vs_ablation"] = round(float(rho), 3)
    rho = np.corrcoef(np.argsort(np.argsort(norm.ravel())), np.argsort(np.argsort(abl.ravel())))[0, 1]
    out["spearman_norm_vs_ablation"] = round(float(rho), 3)
    out["top"] = {"importance_grad": _top(grad), "importance_norm": _top(norm), "importance_ablation": _top(abl)}
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
