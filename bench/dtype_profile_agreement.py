"""How far a bfloat16 profile moves from a float32 one: the default battery on the same model in both dtypes.

    HEADWISE_THREADS=1 python bench/dtype_profile_agreement.py --out bench/results/dtype_profile_smollm2.json

Both profiles run in this one process with the same settings (ProfileSettings defaults, --seed), float32
first. Reported per score: the largest absolute difference over heads, Spearman's rank correlation, and
how many of float32's top 10 heads are in bfloat16's top 10; per role, the heads labelled in each dtype
and in both; and each profile's CPU seconds (their ratio is this machine's, side by side).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _kv_setup import use_threads_from_env  # and offline and quiet, as every KV bench script
from scipy.stats import spearmanr


def _top(values: np.ndarray, k: int) -> set[int]:
    flat = np.nan_to_num(values.ravel(), nan=-np.inf)
    return set(np.argsort(-flat, kind="stable")[:k].tolist())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--against", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    import headwise
    from headwise.atlas import versions
    from headwise.profile import ProfileSettings

    use_threads_from_env()
    atlases, cpu = {}, {}
    for dtype in ("float32", args.against):
        loaded = headwise.load(args.model, dtype=dtype)
        c0 = time.process_time()
        atlases[dtype] = headwise.profile(loaded, settings=ProfileSettings(seed=args.seed))
        cpu[dtype] = round(time.process_time() - c0, 2)
        del loaded
    a, b = atlases["float32"], atlases[args.against]
    scores = {}
    for name in a.score_names:
        x, y = a.score(name), b.score(name)
        ok = np.isfinite(x) & np.isfinite(y)
        rho = spearmanr(x[ok], y[ok]).statistic if ok.sum() > 2 else None
        scores[name] = {"max_abs_diff": round(float(np.abs(x[ok] - y[ok]).max()), 6),
                        "float32_range": [round(float(x[ok].min()), 6), round(float(x[ok].max()), 6)],
                        "spearman": None if rho is None else round(float(rho), 4),
                        "top10_shared": len(_top(x, 10) & _top(y, 10))}
    roles = {}
    for role in sorted({r for row in a.data["roles"]["labels"] for h in row for r in h}
                       | {r for row in b.data["roles"]["labels"] for h in row for r in h}):
        ha, hb = set(a.heads_with_role(role)), set(b.heads_with_role(role))
        roles[role] = {"float32": len(ha), args.against: len(hb), "both": len(ha & hb)}
    out = {"model": a.model, "other_model": b.model, "versions": versions(), "args": vars(args),
           "torch_threads": torch.get_num_threads(), "settings": a.data["settings"], "profile_cpu_s": cpu,
           "speedup": round(cpu["float32"] / cpu[args.against], 3), "scores": scores, "roles": roles}
    for name, r in scores.items():
        print(f"{name:18s} max |diff| {r['max_abs_diff']:.4g}  spearman {r['spearman']}  top-10 shared "
              f"{r['top10_shared']}/10")
    print("roles:", roles)
    print(f"profile CPU s: {cpu} ({out['speedup']:.2f}x)")
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
