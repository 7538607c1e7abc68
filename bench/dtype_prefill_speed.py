"""The full cache's 8K prefill in float32 against bfloat16 (or float16), in ONE process, alternating.

    HEADWISE_THREADS=1 python bench/dtype_prefill_speed.py --context 8176 --rounds 2 \
        --out bench/results/dtype_prefill_smollm2_8k.json

The model is loaded once per dtype; each round prefills the same passkey prompt (one call, the last
position's logits only) under each dtype in a rotated order. Reported: CPU seconds per round and the
median ratio float32 / other (above 1: faster than float32), and the greedy first reply token of each
dtype, to show the prompt is read the same way. On a CPU with AMX (bfloat16 matrix units) the
bfloat16 products run several times faster; elsewhere bfloat16 may be slower than float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _kv_setup import use_threads_from_env  # and offline and quiet, as every KV bench script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=8176)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--against", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()


    import torch
    from tqdm import tqdm

    import headwise
    from headwise.atlas import versions
    from headwise.decode import forward
    from headwise.kv import HeadwiseCache, parse_policy
    from headwise.probes.needle import passkey_case

    use_threads_from_env()
    dtypes = ["float32", args.against]
    models = {d: headwise.load(args.model, dtype=d) for d in dtypes}
    case = passkey_case(models["float32"].tokenizer, context=args.context, depth=0.5, seed=0)
    cpu: dict[str, list[float]] = {d: [] for d in dtypes}
    first_token: dict[str, str] = {}
    with torch.no_grad():
        for d in dtypes:  # untimed: each model's first prefill pays for fresh memory pages
            forward(models[d].model, case.input_ids, HeadwiseCache(parse_policy("full", models[d].geometry),
                                                                   max_length=case.length + 1))
        for r in tqdm(range(args.rounds), desc="prefill rounds", unit="round"):
            for d in dtypes[r % 2:] + dtypes[:r % 2]:
                loaded = models[d]
                cache = HeadwiseCache(parse_policy("full", loaded.geometry), max_length=case.length + 1)
                c0 = time.process_time()
                logits, _ = forward(loaded.model, case.input_ids, cache)
                cpu[d].append(time.process_time() - c0)
                first_token[d] = loaded.tokenizer.decode([int(logits[0, -1].argmax())])
    ratios = [f / o for f, o in zip(cpu["float32"], cpu[args.against])]
    out = {"model": models["float32"].info.to_dict(), "versions": versions(), "args": vars(args),
           "torch_threads": torch.get_num_threads(), "context": case.length,
           "prefill_cpu_s_rounds": {d: [round(x, 3) for x in cpu[d]] for d in dtypes},
           "prefill_cpu_s_median": {d: round(statistics.median(cpu[d]), 3) for d in dtypes},
           "speedup_per_round": [round(x, 3) for x in ratios], "speedup_median": round(statistics.median(ratios), 3),
           "first_reply_token": first_token}
    print(f"full-cache prefill of {case.length} tokens: float32 {out['prefill_cpu_s_median']['float32']:.1f} CPU s, "
          f"{args.against} {out['prefill_cpu_s_median'][args.against]:.1f} CPU s: {out['speedup_median']:.2f}x; "
          f"first reply token {first_token}")
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
