"""Decode speed of KV policies against the full cache in ONE process, alternating short bursts
(controls for load drift).

    python bench/kv_decode_interleaved.py --model smollm2-135m --atlas bench/results/atlas-smollm2-retrieval.json \
        --policy headwise:retrieval@0.25 --context 8176 --rounds 7 --burst 8 \
        --out bench/results/kv_decode_smollm2_8k.json

Every cache is prefilled once with the same prompt; then rounds of `--burst` greedy steps
alternate between the full cache and each policy (--policy takes a comma-separated list).
Reported: tokens/s per round and, per policy, the median of its per-round ratio to the full cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _kv_setup import load_model_and_atlas


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--atlas", required=True)
    ap.add_argument("--policy", default="headwise:retrieval@0.25")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--burst", type=int, default=6)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from headwise.atlas import versions
    from headwise.decode import forward
    from headwise.kv import HeadwiseCache, parse_policy
    from headwise.probes.needle import passkey_case

    loaded, atlas = load_model_and_atlas(args.model, args.atlas, args.dtype)
    case = passkey_case(loaded.tokenizer, context=args.context, depth=0.5, seed=0)
    n_new = args.rounds * args.burst + 1
    specs = [x.strip() for x in args.policy.split(",") if x.strip()]
    policies = {"full": parse_policy("full", loaded.geometry)}
    policies.update({spec: parse_policy(spec, loaded.geometry, atlas=atlas, context=args.context,
                                        dtype_bytes=loaded.dtype_bytes) for spec in specs})
    state = {}
    with torch.no_grad():
        for name, policy in policies.items():
            cache = HeadwiseCache(policy, max_length=case.length + n_new)
            t0 = time.perf_counter()
            logits = forward(loaded.model, case.input_ids, cache)[0]
            state[name] = {"cache": cache, "next": logits[:, -1:].argmax(-1), "prefill_s": time.perf_counter() - t0,
                           "rounds": []}
        names = list(state)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # each policy takes each turn in order
                s = state[name]
                t0 = time.perf_counter()
                for _ in range(args.burst):
                    s["next"] = forward(loaded.model, s["next"], s["cache"])[0][:, -1:].argmax(-1)
                s["rounds"].append(args.burst / (time.perf_counter() - t0))
    out = {"model": loaded.info.to_dict(), "versions": versions(), "args": vars(args),
           "torch_threads": torch.get_num_threads(), "context": case.length, "policies": {}}
    for name, s in state.items():
        out["policies"][name] = {"prefill_s": s["prefill_s"], "decode_tok_s_rounds": s["rounds"],
                                 "decode_tok_s_median": statistics.median(s["rounds"]),
                                 "kv_bytes": s["cache"].nbytes()}
    for spec in specs:
        ratios = [b / a for a, b in zip(state["full"]["rounds"], state[spec]["rounds"])]
        out["policies"][spec].update({"description": policies[spec].describe(), "speedup_per_round": ratios,
                                      "speedup_median": statistics.median(ratios)})
        print(spec, f"speed-up median {statistics.median(ratios):.3f}, per round",
              " ".join(f"{r:.2f}" for r in ratios))
    if len(specs) == 1:  # the layout of the single-policy runs in bench/results
        out["speedup_per_round"] = out["policies"][specs[0]]["speedup_per_round"]
        out["speedup_median"] = out["policies"][specs[0]]["speedup_median"]
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    for name, p in out["policies"].items():
        print(name, f"median {p['decode_tok_s_median']:.2f} tok/s, KV {p['kv_bytes'] / 2**20:.1f} MiB, "
                    f"prefill {p['prefill_s']:.1f} s")


if __name__ == "__main__":
    main()
