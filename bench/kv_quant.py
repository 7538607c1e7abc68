"""Quantized full heads (+q8 / +q4, KIVI's way) against the full cache and transformers' QuantizedCache.

    HEADWISE_THREADS=1 OMP_NUM_THREADS=1 python bench/kv_quant.py --out bench/results/kv_quant_dev.json

Development prompts only (passkey, seeds 50-52, one depth each): greedy passkey accuracy, the
teacher-forced answer's log-probability, measured KV bytes and their share of the full cache's;
then decode speed on the first prompt, every cache prefilled once and rounds of `--burst` greedy
steps alternating between them (ratio to the full cache, per round, median).

transformers' QuantizedCache needs a backend (HQQ here: `pip install hqq`, a bench-only extra, not a
headwise dependency; quanto offers 2 and 4 bits only). It runs with its own defaults (group 64,
residual 128, axis 0): what a user gets from `QuantizedCache(backend="hqq", nbits=B)`. Its bytes are
the storages its layers hold (codes, scales, zeros, residual), walked tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from _kv_setup import load_model_and_atlas, seed_range

DEPTHS = (0.1, 0.5, 0.9)
SPECS = ("full", "full+q8", "full+q4", "headwise:duo@kv0.1667+mid64", "headwise:duo@kv0.1667+q8+mid64",
         "headwise:duo@kv0.1667+q4+mid64")
TF_BITS = (8, 4)


def storage_bytes(obj: Any, seen: set[int]) -> int:
    """Bytes of the distinct tensor storages reachable from obj (tensor subclasses: their inner tensors)."""
    import torch

    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(storage_bytes(getattr(obj, n), seen) for n in names)
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(storage_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(storage_bytes(v, seen) for v in obj)
    return 0


def tf_cache_bytes(cache: Any) -> int:
    seen: set[int] = set()
    return sum(storage_bytes([getattr(layer, a, None) for a in ("_quantized_keys", "_quantized_values", "keys",
                                                                  "values")], seen) for layer in cache.layers)


def tf_cache(loaded: Any, bits: int) -> Any:
    from transformers.cache_utils import QuantizedCache

    return QuantizedCache(backend="hqq", config=loaded.model.config, nbits=bits)


def run_tf(loaded: Any, case: Any, bits: int, max_new: int) -> dict[str, Any]:
    """transformers' QuantizedCache through headwise's greedy loop (the same stop rule and answer scoring)."""
    from headwise.decode import greedy
    from headwise.kv.generate import score_answer
    from headwise.probes.needle import answer_found

    cache = tf_cache(loaded, bits)
    scored: dict[str, Any] = {}

    def score(logits: Any, prefilled: Any) -> None:
        scored["lp"], _ = score_answer(loaded.model, logits, prefilled, case.answer_ids)

    out = greedy(loaded, case.input_ids, max_new, until="line", cache=cache, after_prefill=score)
    return {"reply": out.texts[0], "correct": answer_found(out.texts[0], case.answer),
            "answer_logprob": round(sum(scored["lp"]) / len(scored["lp"]), 4), "kv_bytes": tf_cache_bytes(cache),
            "prefill_s": round(out.prefill_seconds, 2)}


def run_headwise(loaded: Any, case: Any, policy: Any, max_new: int) -> dict[str, Any]:
    from headwise.kv.generate import generate
    from headwise.probes.needle import answer_found

    res = generate(loaded, case.input_ids, policy, max_new_tokens=max_new, prefill_chunk=None, until="line",
                   answer_ids=case.answer_ids)
    return {"reply": res.text, "correct": answer_found(res.text, case.answer),
            "answer_logprob": round(res.answer_logprob, 4), "kv_bytes": res.kv_bytes,
            "prefill_s": round(res.prefill_seconds, 2)}


def speed(loaded: Any, case: Any, policies: dict[str, Any], rounds: int, burst: int) -> dict[str, Any]:
    """Decode tok/s side by side: each cache prefilled once, then alternating bursts (controls for load drift)."""
    import torch

    from headwise.decode import forward
    from headwise.kv import HeadwiseCache

    n_new = rounds * burst + 1
    caches = {name: HeadwiseCache(p, max_length=case.length + n_new) for name, p in policies.items()}
    caches.update({f"transformers-hqq-int{b}": tf_cache(loaded, b) for b in TF_BITS})
    state = {}
    with torch.inference_mode():
        for name, cache in caches.items():
            logits, cache = forward(loaded.model, case.input_ids, cache)
            state[name] = {"cache": cache, "next": logits[:, -1:].argmax(-1), "rounds": []}
        names = list(state)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                s = state[name]
                t0 = time.perf_counter()
                for _ in range(burst):
                    s["next"] = forward(loaded.model, s["next"], s["cache"])[0][:, -1:].argmax(-1)
                s["rounds"].append(burst / (time.perf_counter() - t0))
    out = {}
    for name, s in state.items():
        ratios = [b / a for a, b in zip(state["full"]["rounds"], s["rounds"])]
        out[name] = {"decode_tok_s_rounds": [round(x, 2) for x in s["rounds"]],
                     "decode_tok_s_median": round(statistics.median(s["rounds"]), 2),
                     "ratio_to_full_per_round": [round(x, 3) for x in ratios],
                     "ratio_to_full_median": round(statistics.median(ratios), 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--atlas", default="bench/results/atlas-smollm2-duo4k.json")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--seeds", default="50-52", help="development seeds (one depth each, from 0.1 / 0.5 / 0.9)")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--burst", type=int, default=6)
    ap.add_argument("--specs", default=",".join(SPECS), help="comma-separated policy specs ('full' first)")
    ap.add_argument("--out", default="bench/results/kv_quant_dev.json")
    args = ap.parse_args()

    import torch

    from headwise.atlas import versions
    from headwise.kv import parse_policy
    from headwise.probes.needle import passkey_case

    t_start = time.perf_counter()
    loaded, atlas = load_model_and_atlas(args.model, args.atlas)
    policies = {s: parse_policy(s, loaded.geometry, atlas=atlas, context=args.context) for s in args.specs.split(",")}
    cases = [(seed, depth, passkey_case(loaded.tokenizer, context=args.context, depth=depth, seed=seed,
                                        filler="repeat"))
             for seed, depth in zip(seed_range(args.seeds), DEPTHS)]
    rows = []
    for seed, depth, case in cases:
        for name, policy in policies.items():
            rows.append({"seed": seed, "depth": depth, "tokens": case.length, "answer": case.answer, "method": name,
                         **run_headwise(loaded, case, policy, args.max_new_tokens)})
            print(rows[-1], flush=True)
        for bits in TF_BITS:
            rows.append({"seed": seed, "depth": depth, "tokens": case.length, "answer": case.answer,
                         "method": f"transformers-hqq-int{bits}", **run_tf(loaded, case, bits, args.max_new_tokens)})
            print(rows[-1], flush=True)
    summary: dict[str, Any] = {}
    for row in rows:
        full = next(r["kv_bytes"] for r in rows if r["seed"] == row["seed"] and r["method"] == "full")
        row["kv_share"] = round(row["kv_bytes"] / full, 4)
        cell = summary.setdefault(row["method"], {"correct": 0, "n": 0, "shares": [], "logprobs": []})
        cell["correct"] += int(row["correct"])
        cell["n"] += 1
        cell["shares"].append(row["kv_share"])
        cell["logprobs"].append(row["answer_logprob"])
    for name, cell in summary.items():
        cell["accuracy"] = cell["correct"] / cell["n"]
        cell["kv_share_mean"] = round(sum(cell["shares"]) / len(cell["shares"]), 4)
        cell["answer_logprob_mean"] = round(sum(cell["logprobs"]) / len(cell["logprobs"]), 4)
        cell["at_most_one_sixth"] = max(cell.pop("shares")) <= 1 / 6
        cell.pop("logprobs")
        if name in policies:
            cell["description"] = policies[name].describe()
            cell["n_full_heads"] = policies[name].n_full
    print(json.dumps(summary, indent=1), flush=True)
    timing = speed(loaded, cases[0][2], policies, args.rounds, args.burst)
    for name, s in timing.items():
        summary[name]["decode_ratio_to_full_median"] = s["ratio_to_full_median"]
    out = {"model": loaded.info.to_dict(), "versions": versions(), "args": vars(args),
           "torch_threads": torch.get_num_threads(), "dtype": str(loaded.model.dtype),
           "transformers_cache": {"backend": "hqq", "q_group_size": 64, "residual_length": 128, "axis": 0,
                                  "note": "QuantizedCache defaults; hqq is a bench-only extra"},
           "summary": summary, "speed": {"seed": cases[0][0], "depth": cases[0][1], **timing}, "rows": rows,
           "seconds": round(time.perf_counter() - t_start, 1)}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: {x: v[x] for x in ("accuracy", "kv_share_mean", "answer_logprob_mean",
                                            "decode_ratio_to_full_median")} for k, v in summary.items()}, indent=1))


if __name__ == "__main__":
    main()
