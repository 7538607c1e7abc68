"""Head-aware KV cache vs full cache, StreamingLLM, random heads and SnapKV, measured side by side.

    python bench/kv_eval.py --atlas bench/results/atlas-smollm2-duo4k.json \
        --head-policy headwise:duo@0.25+whole --extra headwise:duo@0.25 \
        --contexts 4096 --trials 2 --skip perplexity,speed --out kv.json
    (8176 tokens: --contexts 8176 --trials 1; needle: --task needle)
    held-out prompts at a one-third byte budget (bench/results/kv_smollm2_passkey_heldout.json):
    --head-policy headwise:duo@kv0.3333+whole --extra headwise:duo@0.25+whole --seed 3 --trials 3
    the controls of held-out set 3 (bench/results/kv_smollm2_passkey_heldout3_mid.json), whose full and
    head-aware caches ran in `headwise eval`: --head-policy headwise:duo@kv0.3333+whole+mid64 --seed 10
    --trials 3 --labels "streaming (same bytes),random heads (seed 0),snapkv (same bytes)" (and so on)

At every context the baselines are sized against the head-aware policy measured there (a
"@kvB" head policy is rebuilt for each context, so its head count follows the budget):
StreamingLLM and SnapKV get the same KV bytes, the random control the same number of full
heads with the same streaming shape, drawn with several seeds (one label per seed).
StreamingLLM and the random control read the prompt as the head-aware policy does (the same
prefill option: whole-prompt by default, +bounded or +tailN).
Every accuracy is reported with its number of trials, beside two teacher-forced measures of
the passkey after the prompt: the share of keys whose every token is the model's top choice
("key recalled"; the space before the key is left out) and the mean log-probability per token.
Speed and peak RSS: one subprocess per policy (kv/evaluate.py), in one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _kv_setup import load_model_and_atlas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--atlas", required=True)
    ap.add_argument("--head-policy", default="headwise:duo@0.25", help="the head-aware policy under test")
    ap.add_argument("--contexts", default="1024,2048,4096,8192")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--task", default="passkey", choices=("passkey", "needle"),
                    help="passkey (repeated filler, as in the paper) or needle (bundled needles in bundled prose)")
    ap.add_argument("--trials", type=int, default=2, help="seeds per context x depth")
    ap.add_argument("--long-depths", default=None, help="depths for contexts >= 4096 (default: --depths)")
    ap.add_argument("--longest-depths", default=None, help="depths for contexts >= 8192 (default: --long-depths)")
    ap.add_argument("--seed", type=int, default=0, help="first prompt seed (trial t uses seed + t)")
    ap.add_argument("--random-seeds", default="0,1,2", help="one random-heads control per seed")
    ap.add_argument("--extra", default="", help="more policy specs to run beside the others, labelled by their spec "
                                                "(e.g. another score's selection)")
    ap.add_argument("--snapkv-max-context", type=int, default=1 << 30, help="SnapKV only up to this context (its "
                                                                            "prefill costs as much as the full "
                                                                            "cache's)")
    ap.add_argument("--sink", type=int, default=None, help="streaming heads' sinks (default: 64 for head policies, "
                                                          "4 for StreamingLLM)")
    ap.add_argument("--window", type=int, default=None, help="streaming heads' window (default 256)")
    ap.add_argument("--speed-context", type=int, default=8192)
    ap.add_argument("--speed-new-tokens", type=int, default=32)
    ap.add_argument("--speed-repeats", type=int, default=1)
    ap.add_argument("--speed-labels", default="full,headwise,random heads (seed 0)",
                    help="policies timed (StreamingLLM at the same bytes has a window of thousands of tokens, whose "
                         "chunked prefill is slow on CPU)")
    ap.add_argument("--perplexity-context", type=int, default=2048)
    ap.add_argument("--text", default=None, help="text for perplexity (default: the bundled text)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: retrieval, perplexity, speed")
    ap.add_argument("--out", required=True)
    ap.add_argument("--labels", default="", help="run only these comma-separated labels (e.g. the controls, when the "
                                                 "full and head-aware caches ran elsewhere on the same prompts)")
    ap.add_argument("--merge", action="store_true", help="add to an existing --out of the same model and policy "
                                                          "(run the parts separately) instead of replacing it")
    args = ap.parse_args()

    import numpy as np
    import torch

    from headwise.atlas import versions
    from headwise.kv import HeadPolicy, parse_policy
    from headwise.kv.evaluate import EvalSettings, run_perplexity, run_retrieval, run_speed, summarize

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    loaded, atlas = load_model_and_atlas(args.model, args.atlas)
    g = loaded.geometry
    contexts = [int(c) for c in args.contexts.split(",")]

    # A "@kvB" head policy fits its byte budget at each prompt length: one policy per context.
    head_at = {ctx: parse_policy(args.head_policy, g, atlas=atlas, context=ctx, sink=args.sink, window=args.window)
               for ctx in set(contexts) | {args.perplexity_context, args.speed_context}}
    head = head_at[max(contexts + [args.speed_context])]
    # The controls read the prompt as the head-aware policy does (whole-prompt, bounded or tail prefill).
    prefill = {"whole": "", "bounded": "+bounded"}.get(head.prefill, f"+tail{head.tail}")
    suffix = head.option_suffix()
    random_seeds = [int(x) for x in args.random_seeds.split(",") if x.strip()]
    long_depths = args.long_depths or args.depths
    longest_depths = args.longest_depths or long_depths

    def specs_at(ctx: int) -> dict[str, str]:
        # Same bytes on the heads a policy can touch: the model's own sliding layers cost the same under every policy.
        here = head_at[ctx]
        mine = ~np.array(g.windowed)
        ratio = here.kv_bytes_by_head(ctx)[mine].sum() / HeadPolicy.full_cache(g).kv_bytes_by_head(ctx)[mine].sum()
        specs = {"full": "full", "headwise": args.head_policy,
                 "streaming (same bytes)": f"streaming@{ratio:.4f}{prefill}"}
        for seed in random_seeds:
            specs[f"random heads (seed {seed})"] = f"random@{here.full_fraction:.4f}:{seed}{suffix}"
        specs["snapkv (same bytes)"] = f"snapkv@{ratio:.4f}"
        specs.update({x.strip(): x.strip() for x in args.extra.split(",") if x.strip()})
        wanted = {x.strip() for x in args.labels.split(",") if x.strip()}
        return {k: v for k, v in specs.items() if k in wanted} if wanted else specs

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part, so a long run that is stopped keeps what it measured
        result["seconds"] = round(time.perf_counter() - t0, 1)
        out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")

    t0 = time.perf_counter()
    result = {"schema": "headwise.kv-bench/1", "model": loaded.info.to_dict(), "geometry": g.to_dict(),
              "versions": versions(), "args": vars(args), "torch_threads": torch.get_num_threads(),
              "head_policy": {"spec": args.head_policy, "description": head.describe(),
                              "full_heads": head.full.astype(int).tolist(), "source": head.source},
              "head_policy_at": {str(c): {"description": head_at[c].describe(),
                                          "full_heads": head_at[c].full.astype(int).tolist()}
                                 for c in sorted(set(contexts))},
              "retrieval": {}, "rows": []}
    if args.merge and out.is_file():
        old = json.loads(out.read_text(encoding="utf-8"))
        if old["model"]["weights_sha256"] == result["model"]["weights_sha256"] and \
                old["head_policy"]["spec"] == args.head_policy:
            kept = {k: old[k] for k in ("retrieval", "rows", "perplexity", "speed") if k in old}
            result.update(kept)
            result["runs"] = old.get("runs", [old["args"]]) + [vars(args)]
    if "retrieval" not in skip:
        for ctx in contexts:
            depths = args.depths if ctx < 4096 else long_depths if ctx < 8192 else longest_depths
            settings = EvalSettings(tasks=(args.task,), contexts=(ctx,), depths=tuple(float(d) for d in
                                                                                depths.split(",")),
                                    trials=args.trials, fillers=("repeat" if args.task == "passkey" else "essay",),
                                    sink=args.sink, window=args.window, seed=args.seed)
            labels = specs_at(ctx)
            if ctx > args.snapkv_max_context:
                labels.pop("snapkv (same bytes)")
            rows = run_retrieval(loaded, list(labels.values()), settings, atlas)
            by_spec = {v: k for k, v in labels.items()}
            for row in rows:
                row["label"] = by_spec[row["policy"]]
            result["rows"] = [r for r in result["rows"] if r["context"] != ctx] + rows
            summary = summarize(rows)[args.task][str(ctx)]
            result["retrieval"][str(ctx)] = {label: {**summary[spec], "spec": spec} for label, spec in labels.items()}
            cells = result["retrieval"][str(ctx)]
            randoms = [c for label, c in cells.items() if label.startswith("random heads (seed")]
            if randoms:  # the control's spread over seeds, beside each seed's own cell
                accs = [c["accuracy"] for c in randoms]
                mean = sum(accs) / len(accs)
                cells["random heads (mean over seeds)"] = {
                    "accuracy": mean, "seeds": len(accs), "correct": sum(c["correct"] for c in randoms),
                    "n": sum(c["n"] for c in randoms),
                    "kv_ratio": None if randoms[0]["kv_ratio"] is None else  # None: full ran elsewhere (--labels)
                    sum(c["kv_ratio"] for c in randoms) / len(accs),
                    "accuracy_sd": (sum((a - mean) ** 2 for a in accs) / max(1, len(accs) - 1)) ** 0.5,
                    **({} if randoms[0]["key_recall"] is None else {
                        "answer_logprob": round(sum(c["answer_logprob"] for c in randoms) / len(accs), 4),
                        "key_recall": sum(c["key_recall"] for c in randoms) / len(accs)})}
            line = "  ".join(f"{label}: {c['correct']}/{c['n']} (" + (
                "-" if c["kv_ratio"] is None else f"{c['kv_ratio']:.0%}") + (
                "" if c.get("key_recall") is None else
                f", key recalled {c['key_recall']:.0%}, logp {c['answer_logprob']:.2f}") + ")"
                for label, c in cells.items())
            print(f"{args.task} @ {ctx}: {line}", flush=True)
            save()
    if "perplexity" not in skip:
        labels = specs_at(args.perplexity_context)
        labels.pop("snapkv (same bytes)")
        settings = EvalSettings(perplexity_context=args.perplexity_context, text=args.text, sink=args.sink,
                                window=args.window)
        ppl = run_perplexity(loaded, list(labels.values()), settings, atlas)
        result["perplexity"] = {"context": ppl["context"], "probe": ppl["probe"],
                                "policies": {label: {**ppl["policies"][spec], "spec": spec}
                                             for label, spec in labels.items()}}
        print("perplexity:", {k: round(v["perplexity"], 3) for k, v in result["perplexity"]["policies"].items()},
              flush=True)
        save()
    if "speed" not in skip:
        wanted = [x.strip() for x in args.speed_labels.split(",")]
        labels = {k: v for k, v in specs_at(args.speed_context).items() if k in wanted}
        settings = EvalSettings(speed_context=args.speed_context, speed_new_tokens=args.speed_new_tokens,
                                speed_repeats=args.speed_repeats, sink=args.sink, window=args.window)
        speed = run_speed(args.model, list(labels.values()), settings, atlas_path=args.atlas)
        result["speed"] = {"context": speed["context"], "new_tokens": speed["new_tokens"],
                           "policies": {label: {**speed["policies"][spec], "spec": spec}
                                        for label, spec in labels.items()}}
        for label, r in result["speed"]["policies"].items():
            print(f"speed @ {args.speed_context}: {label}: decode {r['decode_tok_s']:.2f} tok/s "
                  f"(x{r.get('decode_speedup_vs_full', float('nan'))}), prefill {r['prefill_s']:.1f} s, KV "
                  f"{r['kv_bytes'] / 2**20:.1f} MiB, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    save()
    print(f"written {out} in {result['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
