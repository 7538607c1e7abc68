"""Head pruning on smollm2-135m, measured: which KV groups each criterion removes, held-out perplexity,
parameters, and prefill / decode speed side by side with the unpruned model in one process.

    python bench/prune_sweep.py [--rounds 3] [--atlas-cache /tmp/prune_sweep_atlas.json]

Criteria: the atlas's importance_ablation, importance_grad and importance_norm (AMP's criterion), and
`random` with seeds 0, 1, 2, each at 1/3 of the KV groups per layer (smollm2: 3 KV groups of 3 query
heads, so 1/3 and 2/3 are the only fractions); then 2/3 for importance_ablation and random seed 0
(--no-two-thirds skips it). Importance is profiled once on the bundled prose (4 x 128 tokens, seed 0);
perplexity is measured on 16 x 256-token windows of the same bundled prose drawn with another seed
and checked not to overlap the importance windows (nor each other). Nothing is tuned on them.

Speed: the unpruned model is a copy of the loaded one switched to SDPA attention, as the pruned
models are (prune_heads), so both run transformers' own attention; each round times, for the
unpruned and then the pruned model (the order alternating between rounds), a 1 x 1024 prefill with
the KV cache and 64 greedy decode steps on that cache. Ratios are pruned / unpruned tokens per
second from the medians. torch runs with --threads threads (1 by default; the importance profile
runs with --profile-threads, 2 by default, to fit the time budget).

Writes bench/results/prune_sweep.json (rewritten after every criterion, so a cut-short run keeps
what it measured).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "prune_sweep.json"
SCORES = ("importance_ablation", "importance_grad", "importance_norm")


def _window_spans(encoded: list[list[int]], body: int, n: int, seed: int) -> list[tuple[int, int]]:
    """(document, start) of each window natural_text draws (its sampling, replayed; checked against it)."""
    import torch

    docs = [i for i, e in enumerate(encoded) if len(e) >= body]
    gen = torch.Generator().manual_seed(seed)
    weights = torch.tensor([len(encoded[i]) - body + 1 for i in docs], dtype=torch.float64)
    spans = []
    for _ in range(n):
        d = docs[int(torch.multinomial(weights, 1, generator=gen))]
        start = int(torch.randint(0, len(encoded[d]) - body + 1, (1,), generator=gen))
        spans.append((d, start))
    return spans


def _overlaps(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    (da, sa, la), (db, sb, lb) = a, b
    return da == db and sa < sb + lb and sb < sa + la


def held_out_text(tokenizer, settings, *, context: int, n: int, seed: int) -> tuple:
    """`n` windows of `context` tokens of the bundled prose that overlap neither the importance probe's
    windows nor each other; the importance windows' spans and the held-out spans for the record."""
    import torch

    from headwise.probes.base import adds_bos
    from headwise.probes.text import bundled_text_files, load_text, natural_text

    docs = load_text(settings.text)
    bos = adds_bos(tokenizer)
    encoded = [tokenizer(d, add_special_tokens=False).input_ids for d in docs]
    imp_body = settings.importance_context - int(bos)
    imp = _window_spans(encoded, imp_body, settings.importance_sequences, settings.seed)
    probe = natural_text(tokenizer, context=settings.importance_context, n_sequences=settings.importance_sequences,
                         seed=settings.seed, text=settings.text)
    replay = [([tokenizer.bos_token_id] if bos else []) + encoded[d][s:s + imp_body] for d, s in imp]
    if probe.input_ids.tolist() != replay:
        raise SystemExit("replaying natural_text's sampling did not reproduce the importance windows")
    taken = [(d, s, imp_body) for d, s in imp]
    body = context - int(bos)
    chosen: list[tuple[int, int, int]] = []
    drawn = 0
    for d, s in _window_spans(encoded, body, 50 * n, seed):  # candidates in seeded order; first n that fit
        drawn += 1
        span = (d, s, body)
        if not any(_overlaps(span, t) for t in taken + chosen):
            chosen.append(span)
            if len(chosen) == n:
                break
    if len(chosen) < n:
        raise SystemExit(f"found only {len(chosen)} non-overlapping held-out windows")
    ids = torch.tensor([([tokenizer.bos_token_id] if bos else []) + encoded[d][s:s + body] for d, s, _ in chosen])
    names = [p.name for p in bundled_text_files()] if settings.text is None else [str(settings.text)]
    record = {
        "source": "bundled prose (headwise/data/text), the same documents the importance probe samples",
        "how": f"natural_text's sampling replayed with seed {seed} for {context}-token windows; candidates "
               f"overlapping an importance window or an earlier held-out window skipped ({drawn} drawn for {n} kept)",
        "documents": names, "context": context, "n_windows": n, "seed": seed, "prepend_bos": bos,
        "windows": [{"document": names[d] if len(names) == len(docs) else d, "start_token": s, "tokens": body}
                    for d, s, _ in chosen],
        "importance_windows": [{"document": names[d] if len(names) == len(docs) else d, "start_token": s,
                                "tokens": imp_body} for d, s in imp],
        "overlap_with_importance_windows": False,
    }
    return ids, record


def perplexity(model, ids, batch: int = 4) -> dict:
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, ids.shape[0], batch):
            x = ids[i:i + batch]
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                    reduction="sum")
            total += float(nll)
            count += x[:, 1:].numel()
    return {"perplexity": round(math.exp(total / count), 4), "mean_nll": round(total / count, 5), "tokens": count}


def timed_run(model, prompt, new_tokens: int) -> tuple[float, float]:
    """Seconds of a prefill of `prompt` with the KV cache, and of `new_tokens` greedy steps on that cache."""
    import torch

    with torch.inference_mode():
        t = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - t
    return prefill, decode


def speed(base, pruned, prompt, new_tokens: int, rounds: int) -> dict:
    times = {"unpruned": {"prefill": [], "decode": []}, "pruned": {"prefill": [], "decode": []}}
    for r in range(rounds):
        order = (("unpruned", base), ("pruned", pruned)) if r % 2 == 0 else (("pruned", pruned), ("unpruned", base))
        for name, model in order:
            p, d = timed_run(model, prompt, new_tokens)
            times[name]["prefill"].append(p)
            times[name]["decode"].append(d)
    n_prompt = prompt.numel()
    med = {k: {w: statistics.median(v) for w, v in by.items()} for k, by in times.items()}
    return {
        "seconds": {k: {w: [round(x, 3) for x in v] for w, v in by.items()} for k, by in times.items()},
        "prefill_tok_s": {k: round(n_prompt / med[k]["prefill"], 1) for k in med},
        "decode_tok_s": {k: round(new_tokens / med[k]["decode"], 2) for k in med},
        "prefill_speedup": round(med["unpruned"]["prefill"] / med["pruned"]["prefill"], 3),
        "decode_speedup": round(med["unpruned"]["decode"] / med["pruned"]["decode"], 3),
        "per_round_prefill_speedup": [round(u / p, 3) for u, p in zip(times["unpruned"]["prefill"],
                                                                        times["pruned"]["prefill"])],
        "per_round_decode_speedup": [round(u / p, 3) for u, p in zip(times["unpruned"]["decode"],
                                                                       times["pruned"]["decode"])],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds per criterion")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for perplexity and speed")
    ap.add_argument("--profile-threads", type=int, default=2, help="torch threads for the importance profile")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-context", type=int, default=256)
    ap.add_argument("--eval-seed", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=1024, help="prefill length (one sequence)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-two-thirds", action="store_true", help="skip fraction 2/3")
    ap.add_argument("--atlas-cache", help="reuse this atlas file if it exists (else profile and save it there)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    os.environ["HEADWISE_QUIET"] = "1"
    import torch

    import headwise
    from headwise import ProfileSettings
    from headwise.atlas import Atlas, versions
    from headwise.prune import RANDOM, prune_heads, pruning_units, select_heads

    wall = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    m = headwise.load(args.model)
    g = m.geometry
    settings = ProfileSettings(importance_sequences=4, importance_context=128)

    # 1. importance, once
    t = time.perf_counter()
    torch.set_num_threads(args.profile_threads)
    if args.atlas_cache and Path(args.atlas_cache).is_file():
        atlas = Atlas.load(args.atlas_cache)
        profiled = f"reused {args.atlas_cache}"
    else:
        atlas = headwise.profile(m, list(SCORES), settings)
        profiled = "profiled in this run"
        if args.atlas_cache:
            atlas.save(args.atlas_cache)
    profile_s = time.perf_counter() - t
    torch.set_num_threads(args.threads)

    # 2. held-out text
    eval_ids, eval_record = held_out_text(m.tokenizer, settings, context=args.eval_context, n=args.eval_windows,
                                          seed=args.eval_seed)

    # the unpruned reference: the loaded weights with transformers' SDPA attention, as prune_heads builds
    base = copy.deepcopy(m.model)
    base.set_attn_implementation("sdpa")
    base.eval()
    prompt = torch.randint(100, 20000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    units = pruning_units(g)

    def n_params(model) -> int:
        return sum(p.numel() for p in model.parameters())

    base_params = n_params(base)
    result = {
        "benchmark": "prune_sweep",
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "model": m.info.to_dict(),
        "geometry": {"layers": g.n_layers, "query_heads": g.n_heads, "kv_heads": g.n_kv_heads,
                     "group_size": g.group_size, "head_dim": g.head_dim},
        "pruning_unit": f"a KV group ({len(units[0])} query heads + its KV head); {len(units)} per layer",
        "settings": {"importance": {"scores": list(SCORES), "importance_sequences": settings.importance_sequences,
                                    "importance_context": settings.importance_context, "seed": settings.seed,
                                    "text": "bundled", "atlas": profiled, "seconds": round(profile_s, 1),
                                    "torch_threads": args.profile_threads},
                     "selection": "select_heads: per layer the units of lowest summed score (largest is important)",
                     "speed": {"prompt_tokens": args.prompt, "prompt": "uniform random token ids 100..19999, seed 0",
                               "new_tokens": args.new_tokens, "decode": "greedy, manual loop on the model's "
                               "DynamicCache, 64 steps timed after the prefill", "rounds": args.rounds,
                               "order": "unpruned then pruned in even rounds, pruned then unpruned in odd ones",
                               "attention": "sdpa for both (the unpruned model is a copy switched to sdpa)",
                               "speedup": "median unpruned seconds / median pruned seconds (>1: pruned faster)"},
                     "torch_threads": args.threads},
        "held_out_text": eval_record,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "versions": versions()},
        "loadavg": {"start": load_start},
        "unpruned": {"parameters": base_params, **perplexity(base, eval_ids)},
        "criteria": [],
    }
    # sanity: the headwise-routed loaded model gives the same perplexity as its SDPA copy
    result["unpruned"]["perplexity_headwise_attention"] = perplexity(m.model, eval_ids)["perplexity"]
    out = Path(args.out)

    def write() -> None:
        result["loadavg"]["end"] = [round(x, 2) for x in os.getloadavg()]
        result["wall_seconds"] = round(time.perf_counter() - wall, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")

    write()
    runs = [(s, 1 / 3, None) for s in SCORES] + [(RANDOM, 1 / 3, seed) for seed in args.random_seeds]
    if not args.no_two_thirds:
        runs += [("importance_ablation", 2 / 3, None), (RANDOM, 2 / 3, args.random_seeds[0])]
    removed_units: dict[str, list[list[int]]] = {}
    for score, fraction, seed in runs:
        t = time.perf_counter()
        heads = select_heads(atlas, g, score, fraction, seed=seed, info=m.info)
        pruned = prune_heads(m, heads)
        per_layer = [sorted({h // g.group_size for lay, h in heads if lay == layer}) for layer in range(g.n_layers)]
        name = f"{score}{'' if seed is None else f'_seed{seed}'}@{'1/3' if fraction < 0.5 else '2/3'}"
        removed_units[name] = per_layer
        entry = {"name": name, "score": score, "fraction": round(fraction, 4), "seed": seed,
                 "removed_kv_groups_per_layer": per_layer,
                 "removed_heads_per_layer": [[h for lay, h in heads if lay == layer] for layer in range(g.n_layers)],
                 "parameters": n_params(pruned),
                 "parameters_ratio": round(n_params(pruned) / base_params, 4),
                 **perplexity(pruned, eval_ids)}
        entry["perplexity_ratio"] = round(entry["perplexity"] / result["unpruned"]["perplexity"], 3)
        entry["speed"] = speed(base, pruned, prompt, args.new_tokens, args.rounds)
        entry["seconds"] = round(time.perf_counter() - t, 1)
        result["criteria"].append(entry)
        del pruned
        # layers where two criteria at the same fraction remove exactly the same units
        same = {}
        names = list(removed_units)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if a.split("@")[1] == b.split("@")[1]:
                    same[f"{a} vs {b}"] = sum(x == y for x, y in zip(removed_units[a], removed_units[b]))
        result["layers_with_identical_removal"] = {"note": f"of {g.n_layers} layers; two independent uniform "
                                                           f"choices agree in 1/3 of layers at 1/3 "
                                                           f"(~{g.n_layers / 3:.0f})", **same}
        write()
        sp = entry["speed"]
        print(f"{name:32s} ppl {entry['perplexity']:9.3f} (x{entry['perplexity_ratio']:6.2f})  params "
              f"{entry['parameters'] / 1e6:6.2f}M  prefill x{sp['prefill_speedup']:.3f}  decode "
              f"x{sp['decode_speedup']:.3f}  [{entry['seconds']:.0f}s]", flush=True)

    write()
    print(f"\nunpruned: ppl {result['unpruned']['perplexity']:.3f}, params {base_params / 1e6:.2f}M; "
          f"wall {result['wall_seconds']:.0f}s; loadavg {result['loadavg']['start'][0]} -> "
          f"{result['loadavg']['end'][0]}")
    print(f"{'criterion':32s} {'ppl':>9s} {'params':>8s} {'prefill tok/s':>14s} {'x':>6s} {'decode tok/s':>13s} "
          f"{'x':>6s}")
    for e in result["criteria"]:
        sp = e["speed"]
        print(f"{e['name']:32s} {e['perplexity']:9.3f} {e['parameters'] / 1e6:7.2f}M "
              f"{sp['prefill_tok_s']['pruned']:8.1f}/{sp['prefill_tok_s']['unpruned']:<6.1f}"
              f"{sp['prefill_speedup']:6.3f} {sp['decode_tok_s']['pruned']:6.2f}/{sp['decode_tok_s']['unpruned']:<6.2f}"
              f"{sp['decode_speedup']:6.3f}")


if __name__ == "__main__":
    main()
