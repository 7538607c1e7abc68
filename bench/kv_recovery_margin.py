"""After a reply that opens without the key, how close is the model to saying it? Teacher-forced.

    python bench/kv_recovery_margin.py --atlas bench/results/atlas-smollm2-duo4k.json \
        --context 8176 --depth 0.7 --seeds 3-9 --out bench/results/kv_smollm2_recovery_margin.json
    (larger budgets: --policies full,headwise:duo@0.5+whole,headwise:duo@0.75+whole
     --out bench/results/kv_smollm2_recovery_margin_budgets.json)

At 8K and depth 0.7 smollm2-135m's full cache opens its passkey reply with " the pass key." and
then sometimes goes on with the key. For each prompt and policy this scores `--opening` + " " +
the key teacher-forced after the prompt, through the policy's cache: the log-probability of
every token and whether it was the model's top choice. The key's first digit is where the reply
either recovers or does not.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _kv_setup import load_model_and_atlas, seed_range


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--atlas", required=True)
    ap.add_argument("--policies", default="full,headwise:duo@kv0.3333+whole")
    ap.add_argument("--context", type=int, default=8176)
    ap.add_argument("--depth", type=float, default=0.7)
    ap.add_argument("--seeds", default="3-9", help="prompt seeds, FIRST-LAST")
    ap.add_argument("--opening", default=" the pass key.", help="the reply's opening, before the key")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from headwise.atlas import versions
    from headwise.kv import generate, parse_policy
    from headwise.probes.needle import passkey_case

    loaded, atlas = load_model_and_atlas(args.model, args.atlas)
    tok = loaded.tokenizer
    t0 = time.perf_counter()
    rows = []
    for seed in seed_range(args.seeds):
        case = passkey_case(tok, context=args.context, depth=args.depth, seed=seed,
                            max_positions=loaded.geometry.max_positions)
        opening = tok.encode(args.opening, add_special_tokens=False)
        ids = tok.encode(args.opening + " " + case.answer, add_special_tokens=False)
        if ids[:len(opening)] != opening:
            raise SystemExit(f"the opening {args.opening!r} tokenizes differently before the key; choose another")
        for spec in args.policies.split(","):
            policy = parse_policy(spec, loaded.geometry, atlas=atlas, context=case.length)
            res = generate(loaded, case.input_ids, policy, max_new_tokens=12, prefill_chunk=None,  # as headwise eval
                           until="line", answer_ids=ids)
            digits = [i for i in range(len(opening), len(ids)) if tok.decode([ids[i]]).strip()]
            rows.append({"seed": seed, "policy": spec, "answer": case.answer, "reply": res.text,
                         "tokens": [tok.decode([t]) for t in ids],
                         "logprobs": [round(x, 4) for x in res.answer_logprobs], "top_choice": res.answer_argmax,
                         "first_digit": digits[0], "first_digit_logprob": round(res.answer_logprobs[digits[0]], 4),
                         "first_digit_top": res.answer_argmax[digits[0]],
                         "reply_has_key": case.answer in res.text})
            print(f"seed {seed} {spec}: first digit logp {rows[-1]['first_digit_logprob']:.2f} "
                  f"(top choice: {rows[-1]['first_digit_top']}), reply {res.text!r}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"schema": "headwise.kv-bench/1", "model": loaded.info.to_dict(),
                               "versions": versions(), "args": vars(args),
                               "torch_threads": torch.get_num_threads(), "rows": rows,
                               "seconds": round(time.perf_counter() - t0, 1)}, indent=1) + "\n", encoding="utf-8")
    print(f"written {out}")


if __name__ == "__main__":
    main()
