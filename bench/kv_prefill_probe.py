"""Development probe for prefill modes: the first reply token of passkey prompts after the prefill.

    python bench/kv_prefill_probe.py --atlas bench/results/atlas-smollm2-duo4k.json --prompts 99:0.5,98:0.3 \
        --specs full,headwise:duo@kv0.3333+bounded,headwise:duo@kv0.3333+tail1024+mid64 --out probe.json
    python bench/kv_prefill_probe.py ... --base headwise:duo@kv0.3333+mid64 --whole-layers "0-4;0-2;10-19" --out ...

On smollm2 a greedy passkey reply is won or lost on its first token (the space before the key
against " a"), so the probability the prefill leaves on it is a quick signal for choosing a
prefill mode. `--specs`: one row per policy. `--whole-layers`: the `--base` policy (a
whole-prompt one) with every other layer's streaming heads reading the prompt bounded: which
layers need the whole prompt. Prompts SEED:DEPTH at --context tokens; use development seeds
only (90-99 were used so), never a held-out set's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _kv_setup import load_model_and_atlas


def _layers(group: str) -> set[int]:
    out: set[int] = set()
    for part in group.split(","):
        a, _, b = part.partition("-")
        out |= set(range(int(a), int(b or a) + 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--atlas", required=True)
    ap.add_argument("--prompts", required=True, help="SEED:DEPTH,...")
    ap.add_argument("--context", type=int, default=8176)
    ap.add_argument("--specs", default="")
    ap.add_argument("--base", default="headwise:duo@kv0.3333+mid64")
    ap.add_argument("--whole-layers", default="", help="';'-separated layer sets, e.g. 0-4;0-2")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from headwise.atlas import versions
    from headwise.decode import forward
    from headwise.kv import HeadwiseCache, parse_policy
    from headwise.kv.mixed import MixedLayer
    from headwise.probes.needle import passkey_case

    loaded, atlas = load_model_and_atlas(args.model, args.atlas)
    tok, g = loaded.tokenizer, loaded.geometry
    runs = [(spec, None) for spec in args.specs.split(",") if spec] + \
        [(args.base, group) for group in args.whole_layers.split(";") if group]
    rows = []
    for item in args.prompts.split(","):
        seed, depth = item.split(":")
        case = passkey_case(tok, context=args.context, depth=float(depth), seed=int(seed), filler="repeat",
                            max_positions=g.max_positions)
        for spec, group in runs:
            policy = parse_policy(spec, g, atlas=atlas, context=case.length, sink=64, window=256)
            cache = HeadwiseCache(policy, max_length=case.length + 1)
            if group is not None:  # the other layers read the prompt bounded (chunked in queries, one call)
                whole = _layers(group)
                for i, layer in enumerate(cache.layers):
                    if isinstance(layer, MixedLayer) and i not in whole:
                        layer.whole_prefill, layer.middle = False, 0
            cpu = time.process_time()
            with torch.no_grad():
                logits = forward(loaded.model, case.input_ids, cache)[0][0, -1].float()
            cpu = time.process_time() - cpu
            p = torch.softmax(logits, -1)
            top = int(p.argmax())
            row = {"seed": int(seed), "depth": float(depth), "spec": spec, "whole_layers": group,
                   "top": tok.decode([top]), "p_top": round(float(p[top]), 3),
                   "p_answer_first_token": round(float(p[case.answer_ids[0]]), 3),
                   "first_token_right": top == case.answer_ids[0], "kv_bytes": cache.nbytes(), "cpu_s": round(cpu, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = {"note": "development prompts; first reply token only", "model": loaded.info.to_dict(),
           "versions": versions(), "args": vars(args), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
