"""Does one KV head decide whether a random-heads control keeps the passkey? Swap it in and out.

    python bench/kv_head_swap.py --atlas bench/results/atlas-smollm2-duo4k.json --head 18.2 \
        --context 4096 --seed 3 --trials 3 --draws 0-8 --part 0/2 --out bench/results/kv_smollm2_head_swap.json
    (run --part 1/2 beside it, then the same command with --combine; the 8K file:
    --context 8176 --draws 0-2 --variants draws,policy --out bench/results/kv_smollm2_head_swap_8k.json)

Every policy has the head policy's number of full heads at this context (so the same KV bytes),
its sink + window and prefill. For each random draw (`random@F:SEED`, drawn as kv_eval.py draws
it): a draw holding HEAD gets it swapped for a head drawn from those it lacks; a draw without it
gets one of its heads, drawn, swapped for HEAD. The head policy gets HEAD swapped for the next
head of its own ranking. "HEAD alone" keeps only HEAD full. The full cache runs beside them in
each part. The unchanged draws are not rerun here: kv_eval.py runs them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _kv_setup import load_model_and_atlas, seed_range


def swap_policies(args: argparse.Namespace, g, atlas) -> tuple:
    """(head policy, {label: policy}) for the swaps described in the module docstring."""
    import numpy as np

    from headwise.kv import HeadPolicy, parse_policy

    layer, kv = (int(x) for x in args.head.split("."))
    name = f"L{layer}.K{kv}"
    head = parse_policy(args.head_policy, g, atlas=atlas, context=args.context, sink=args.sink, window=args.window)
    n = head.n_full
    shape = {"sink": head.sink, "window": head.window, "compensate": head.compensate, "prefill": head.prefill}
    out = {}
    variants = set(args.variants.split(","))
    for seed in seed_range(args.draws) if "draws" in variants else ():
        full = HeadPolicy.random(g, full_fraction=n / head.n_selectable, seed=seed, **shape).full.copy()
        rng = np.random.default_rng(10_000 + seed)  # the swap partner is drawn, not picked
        has = bool(full[layer, kv])
        partner = tuple(int(x) for x in rng.choice(np.argwhere((full != has) & head.selectable)))
        full[layer, kv], full[partner] = not has, has
        label = f"random (seed {seed}) {'without' if has else 'with'} {name}"
        out[label] = HeadPolicy(g, full, name=label, source={"random_seed": seed, "partner": partner}, **shape)
    if head.full[layer, kv] and "policy" in variants:
        # The next head of the policy's own ranking: the one a budget one head larger would add.
        wider = HeadPolicy.from_atlas(atlas, head.source["score"], full_fraction=(n + 1) / head.n_selectable, **shape)
        partner = tuple(int(x) for x in np.argwhere(wider.full & ~head.full)[0])
        full = head.full.copy()
        full[layer, kv], full[partner] = False, True
        label = f"head policy without {name}"
        out[label] = HeadPolicy(g, full, name=label, source={"partner": partner}, **shape)
    if "alone" in variants:
        alone = np.zeros_like(head.full)
        alone[layer, kv] = True
        out[f"{name} alone"] = HeadPolicy(g, alone, name=f"{name} alone", **shape)
    return head, out


def combine(out: Path) -> None:
    parts = sorted(out.parent.glob(f"{out.stem}.part*.json"))
    if not parts:
        sys.exit(f"no {out.stem}.part*.json beside {out}; run the parts first")
    runs = [json.loads(p.read_text(encoding="utf-8")) for p in parts]
    result = {k: v for k, v in runs[0].items() if k not in ("rows", "cells", "policies", "args", "seconds")}
    result["runs"] = [{"args": r["args"], "seconds": r["seconds"]} for r in runs]
    result["policies"] = {k: v for r in runs for k, v in r["policies"].items()}
    result["cells"] = {k: v for r in runs for k, v in r["cells"].items()}
    result["rows"] = [row for r in runs for row in r["rows"]]
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for label, c in result["cells"].items():
        print(f"{label}: {c['correct']}/{c['n']}, key recalled {c['key_recall']:.0%}, logp {c['answer_logprob']:.2f}")
    print(f"written {out}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--atlas", required=True)
    ap.add_argument("--head-policy", default="headwise:duo@kv0.3333+whole")
    ap.add_argument("--head", required=True, help="the KV head to swap, LAYER.KV_HEAD (e.g. 18.2)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--seed", type=int, default=3, help="first prompt seed (trial t uses seed + t)")
    ap.add_argument("--draws", default="0-8", help="random-draw seeds, FIRST-LAST")
    ap.add_argument("--variants", default="draws,policy,alone", help="which of the swaps to run")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--part", default="0/1", help="I/N: run every N-th policy from the I-th (N processes side by side)")
    ap.add_argument("--combine", action="store_true", help="merge the parts' files into --out")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    if args.combine:
        return combine(out)

    import torch

    from headwise.atlas import versions
    from headwise.kv.evaluate import EvalSettings, run_retrieval, summarize

    loaded, atlas = load_model_and_atlas(args.model, args.atlas)
    head, policies = swap_policies(args, loaded.geometry, atlas)
    i, _, n = args.part.partition("/")
    labels = list(policies)[int(i)::int(n)]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        specs = {"full": "full"}
        for k, label in enumerate(labels):
            specs[label] = str(policies[label].save(Path(tmp) / f"policy{k}.json"))
        settings = EvalSettings(tasks=("passkey",), contexts=(args.context,), trials=args.trials, seed=args.seed,
                                depths=tuple(float(d) for d in args.depths.split(",")), sink=args.sink,
                                window=args.window)
        rows = run_retrieval(loaded, list(specs.values()), settings, atlas)
    by_spec = {v: k for k, v in specs.items()}
    for row in rows:
        row["policy"] = by_spec[row["policy"]]
    cells = summarize(rows)["passkey"][str(args.context)]
    result = {"schema": "headwise.kv-bench/1", "model": loaded.info.to_dict(), "geometry": loaded.geometry.to_dict(),
              "versions": versions(), "args": vars(args), "torch_threads": torch.get_num_threads(),
              "head_policy": {"spec": args.head_policy, "description": head.describe(),
                              "full_heads": head.full.astype(int).tolist()},
              "policies": {label: {"description": policies[label].describe(), "source": policies[label].source,
                                   "full_heads": policies[label].full.astype(int).tolist()} for label in labels},
              "cells": {(label if label != "full" else f"full (part {args.part})"): c for label, c in cells.items()},
              "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    part = out.parent / f"{out.stem}.part{i}.json"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"written {part}", file=sys.stderr)


if __name__ == "__main__":
    main()
