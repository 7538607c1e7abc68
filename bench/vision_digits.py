"""What the image battery finds on vit-digits (the bundled ViT trained on scikit-learn's digits),
measured, not assumed:
- importance validation: accuracy on held-out digits with the top-k heads by importance_accuracy
  zeroed against k random heads (10 seeded draws), for k = 1, 2, 4 (fixed before the run);
- the layer trend of attention_distance, local_attention and prefix_attention (is attention more
  local in early layers than in late ones?);
- autoencoder vs PCA pattern summaries: how often a head's 3 nearest neighbours in each method's 2D
  placement share one of its role labels (the seed-0 atlas's labels) or its layer, for the seed-0
  atlas and over pattern summaries re-run with seeds 1-4 (the seed moves the probe images and the
  autoencoder's initialisation), against the rate for two random heads.

    python bench/vision_digits.py [--seed 0]

Writes bench/results/vision_digits.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "vision_digits.json"


def _chance(labels: list[set[str]]) -> float:
    """Share of pairs of distinct heads whose labels intersect."""
    n = len(labels)
    same = sum(bool(labels[i] & labels[j]) for i in range(n) for j in range(i + 1, n))
    return round(same / (n * (n - 1) / 2), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draws", type=int, default=10)
    args = ap.parse_args()
    os.environ["HEADWISE_QUIET"] = "1"
    import torch

    import headwise
    from headwise.profile import ProfileSettings
    from headwise.scores.autoencoder import neighbour_role_agreement
    from headwise.validate import validate

    t = time.perf_counter()
    loaded = headwise.load("vit-digits")
    atlas = headwise.profile(loaded, settings=ProfileSettings(seed=args.seed))
    profile_seconds = round(time.perf_counter() - t, 1)
    g = loaded.geometry
    validation = {}
    for k in (1, 2, 4):
        r = validate(loaded, atlas, "important", k=k, draws=args.draws, seed=args.seed)
        validation[f"k{k}"] = {key: r[key] for key in ("baseline", "targeted", "random", "random_mean", "passes",
                                                       "verdict", "targeted_heads", "task_settings")}
    trend = {name: [round(float(v), 4) for v in atlas.score(name).mean(1)]
             for name in ("attention_distance", "local_attention", "prefix_attention")}
    labels = [set(atlas.roles(layer, head)) or {"none"} for layer in range(g.n_layers) for head in range(g.n_heads)]
    layers = [{f"layer{layer}"} for layer in range(g.n_layers) for _ in range(g.n_heads)]
    runs = {args.seed: atlas}
    for seed in range(args.seed + 1, args.seed + 5):
        runs[seed] = headwise.profile(loaded, ["pattern_ae_error"], ProfileSettings(seed=seed))
    compare: dict = {"chance_role": _chance(labels), "chance_layer": _chance(layers)}
    for method in ("pattern_ae", "pattern_pca"):
        per_seed = {}
        for seed, run in runs.items():
            xy = np.asarray(run.data["profiles"][method]["values"], dtype=float).reshape(-1, 3)[:, :2]
            per_seed[seed] = {"role": round(neighbour_role_agreement(xy, labels, k=3), 4),
                              "layer": round(neighbour_role_agreement(xy, layers, k=3), 4)}
        compare[method] = {"per_seed": per_seed,
                           "mean_role": round(float(np.mean([v["role"] for v in per_seed.values()])), 4),
                           "mean_layer": round(float(np.mean([v["layer"] for v in per_seed.values()])), 4)}
    result = {"benchmark": "vision_digits", "command": f"python bench/vision_digits.py --seed {args.seed} "
              f"--draws {args.draws}", "model": loaded.info.to_dict(), "geometry": g.to_dict(),
              "profile_seconds": profile_seconds, "probes": atlas.data["settings"]["probes"],
              "role_counts": atlas.role_counts(), "validation": validation, "layer_trend": trend,
              "pattern_summary": compare,
              "scores": {n: np.round(atlas.score(n), 5).tolist() for n in atlas.score_names},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for k, r in validation.items():
        print(f"{k}: baseline {r['baseline']:.4f} targeted {r['targeted']:.4f} random mean {r['random_mean']:.4f} "
              f"-> {r['verdict']}")
    print("layer trend:", json.dumps(trend))
    print("pattern summary:", json.dumps(compare))


if __name__ == "__main__":
    main()
