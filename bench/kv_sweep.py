"""Passkey accuracy of a few KV policies at one context: a quick sweep beside bench/kv_eval.py.

    python bench/kv_sweep.py --atlas bench/results/atlas-smollm2-retrieval-duo.json --context 4096 \
        --depths 0.5,0.7,0.9 --policies headwise:duo@0.5,headwise:duo@0.75 --out sweep.json

Unlike kv_eval.py it does not size baselines against a head policy: every spec is run as given
(see kv/evaluate.py for the spec syntax), with the same prompts, and the rows are written out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _kv_setup import load_model_and_atlas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--atlas", required=True)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--sink", type=int, default=None, help="default: 64 for head policies, 4 for StreamingLLM")
    ap.add_argument("--window", type=int, default=None, help="default 256")
    ap.add_argument("--policies", required=True)
    ap.add_argument("--exactness", action="store_true",
                    help="also: max |logit difference| from the full cache at the prompt's end for mixed and "
                         "all-streaming policies whose window is longer than the prompt (must be ~0)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from headwise.atlas import versions
    from headwise.kv.evaluate import EvalSettings, run_retrieval, summarize

    loaded, atlas = load_model_and_atlas(args.model, args.atlas)
    settings = EvalSettings(tasks=("passkey",), contexts=(args.context,),
                            depths=tuple(float(d) for d in args.depths.split(",")), trials=args.trials,
                            sink=args.sink, window=args.window)
    specs = [s.strip() for s in args.policies.split(",") if s.strip()]
    rows = run_retrieval(loaded, specs, settings, atlas)
    summary = summarize(rows)["passkey"][str(args.context)]
    out = {"model": loaded.info.to_dict(), "versions": versions(), "args": vars(args),
           "torch_threads": torch.get_num_threads(), "summary": summary, "rows": rows}
    if args.exactness:
        out["exactness"] = _exactness(loaded, args.context)
        print("exactness:", out["exactness"])
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    for spec, c in summary.items():
        print(f"{spec}: {c['correct']}/{c['n']}, key recalled {c['key_recall']:.0%}, "
              f"answer log-prob {c['answer_logprob']:.3f}/token, "
              f"KV {c['kv_bytes'] / 2**20:.1f} MiB")


def _exactness(loaded, context: int) -> dict[str, float]:
    import torch

    from headwise.decode import forward
    from headwise.kv import HeadPolicy, HeadwiseCache
    from headwise.probes.needle import passkey_case

    g = loaded.geometry
    case = passkey_case(loaded.tokenizer, context=context, depth=0.5, seed=0)
    long = context + 1000
    policies = {"full": HeadPolicy.full_cache(g), f"random@0.5 (sink 64, window {long})":
                HeadPolicy.random(g, 0.5, seed=0, sink=64, window=long),
                f"streaming (sink 4, window {long})": HeadPolicy.streaming(g, sink=4, window=long)}
    logits = {}
    with torch.no_grad():
        for name, policy in policies.items():
            cache = HeadwiseCache(policy, max_length=case.length)
            for start in range(0, case.length, 1024):  # the prompt in 1024-token calls
                last = forward(loaded.model, case.input_ids[:, start:start + 1024], cache)[0]
            logits[name] = last[:, -1]
    return {name: float((x - logits["full"]).abs().max()) for name, x in logits.items() if name != "full"}


if __name__ == "__main__":
    main()
