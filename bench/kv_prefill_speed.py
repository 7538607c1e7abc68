"""Prefill time of KV policies against the full cache in ONE process, alternating (controls for load drift).

    python bench/kv_prefill_speed.py --atlas bench/results/atlas-smollm2-duo4k.json --context 8176 --rounds 3 \
        --policy headwise:duo@kv0.3333+bounded,headwise:duo@kv0.3333+tail1024+mid64,headwise:duo@kv0.3333+mid64 \
        --out bench/results/kv_prefill_smollm2_8k.json

Each round prefills the same passkey prompt (one call, the last position's logits only, as
greedy decoding does) into a fresh cache under the full cache and under each policy, in a
rotated order. Reported: wall and CPU seconds (this process's, `time.process_time`) per round
and, per policy, the median of its per-round ratio full / policy (above 1: faster than the full
cache), from CPU time: on a shared machine wall time moves with the other processes, while one
thread's CPU time measures the work. The prompt's accuracy is not
measured here: `headwise eval` runs the policies on held-out prompts.
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
    ap.add_argument("--policy", required=True, help="comma-separated specs, timed against the full cache")
    ap.add_argument("--context", type=int, default=8176)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed full-cache prefills first (the process's first one pays for fresh memory pages)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the model's weights and activations (bfloat16: what a CPU with AMX runs fastest)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from tqdm import tqdm
    from transformers import AttentionInterface

    from headwise.atlas import versions
    from headwise.decode import forward
    from headwise.instrument import IMPLEMENTATION
    from headwise.kv import HeadwiseCache, parse_policy
    from headwise.probes.needle import passkey_case

    loaded, atlas = load_model_and_atlas(args.model, args.atlas, args.dtype)
    case = passkey_case(loaded.tokenizer, context=args.context, depth=0.5, seed=0)
    specs = [x.strip() for x in args.policy.split(",") if x.strip()]
    policies = {"full": parse_policy("full", loaded.geometry)}
    policies.update({spec: parse_policy(spec, loaded.geometry, atlas=atlas, context=case.length,
                                        dtype_bytes=loaded.dtype_bytes) for spec in specs})
    names = list(policies)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    kv_bytes: dict[str, int] = {}
    attention_cpu: dict[str, list[float]] = {name: [] for name in names}
    spent = [0.0]
    attend = AttentionInterface()[IMPLEMENTATION]

    def timed_attention(*a, **k):  # calls are synchronous on CPU: their CPU time is the attention's
        c = time.process_time()
        try:
            return attend(*a, **k)
        finally:
            spent[0] += time.process_time() - c

    AttentionInterface.register(IMPLEMENTATION, timed_attention)
    with torch.no_grad():
        for _ in range(args.warmup):
            forward(loaded.model, case.input_ids, HeadwiseCache(policies["full"], max_length=case.length + 1))
        for r in tqdm(range(args.rounds), desc="prefill rounds", unit="round"):
            for name in names[r % len(names):] + names[:r % len(names)]:  # each policy takes each turn in order
                cache = HeadwiseCache(policies[name], max_length=case.length + 1)
                spent[0] = 0.0
                t0, c0 = time.perf_counter(), time.process_time()
                forward(loaded.model, case.input_ids, cache)
                seconds[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                attention_cpu[name].append(spent[0])
                kv_bytes[name] = cache.nbytes()
    out = {"model": loaded.info.to_dict(), "versions": versions(), "args": vars(args),
           "torch_threads": torch.get_num_threads(), "context": case.length, "policies": {}}
    for name in names:
        row = {"prefill_s_rounds": [round(s, 3) for s in seconds[name]],
               "prefill_s_median": round(statistics.median(seconds[name]), 3),
               "prefill_cpu_s_rounds": [round(s, 3) for s in cpu[name]],
               "prefill_cpu_s_median": round(statistics.median(cpu[name]), 3), "kv_bytes": kv_bytes[name],
               "kv_share": round(kv_bytes[name] / kv_bytes["full"], 4), "description": policies[name].describe(),
               "attention_cpu_s_median": round(statistics.median(attention_cpu[name]), 3),
               "rest_cpu_s_median": round(statistics.median(c - a for c, a in zip(cpu[name], attention_cpu[name])), 3)}
        if name != "full":
            ratios = [f / p for f, p in zip(cpu["full"], cpu[name])]
            share = getattr(policies[name], "full_fraction", None)
            row.update({"speedup_per_round": [round(x, 3) for x in ratios],
                        "speedup_median": round(statistics.median(ratios), 3)})
            if share is not None:
                full_row = out["policies"]["full"]
                ceiling = full_row["prefill_cpu_s_median"] / (
                    full_row["rest_cpu_s_median"] + full_row["attention_cpu_s_median"] * share)
                row.update({"full_kv_share": round(share, 4), "ceiling_free_streaming": round(ceiling, 3)})
        out["policies"][name] = row
        print(name, f"prefill median {row['prefill_cpu_s_median']:.1f} CPU s ({row['prefill_s_median']:.1f} s wall), "
                    f"KV {row['kv_share']:.1%}, attention {row['attention_cpu_s_median']:.1f} CPU s",
              f"speed-up median {row['speedup_median']:.2f}x" if name != "full" else "")
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
