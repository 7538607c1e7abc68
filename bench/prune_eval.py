"""Head pruning evaluated through headwise.compare: atlas-guided criteria against random draws and AMP.

    python bench/prune_eval.py [--model smollm2-135m] [--atlas bench/results/prune_eval_atlas-smollm2-135m.json]

Criteria: the atlas's importance_ablation and importance_grad, AMP's importance_norm, and `random`
with seeds 0, 1, 2, at every fraction the model can represent (prune.representable_fractions:
whole pruning units, the same number in every layer, head counts its config accepts). The issue
asks for 10%, 20% and 30%; the JSON records what each becomes (smollm2-135m: 3 KV groups per
layer, so 10% prunes none and is refused, 20% and 30% both round to one group, 1/3 of the heads;
2/3 is run too). Importance comes from the atlas file (profiled here with the default importance
settings, 4 x 128 tokens of bundled prose, seed 0, when it does not exist yet).

Every pruned model is written by prune.save_pruned (the provenance records its atlas's probes) into
--work and measured by headwise.compare with the base in one process: held-out perplexity (windows
apart from every profile probe's), in-context loss, the task suite, passkey at 1K, parameters, and
prefill/decode speed interleaved across all models. torch runs with --threads threads (1). Other
jobs share the machine's 2 cores: timings are noisy; read the ratios, measured round by round in
the same process, and the load averages recorded beside them.

--protect-roles previous-token,induction runs each criterion again keeping, in every layer, the units
that hold a head the roles atlas labels with one of those roles (profiled here with the default
settings when missing): the importance scores, read on short prose windows, rank the induction
circuit's heads low. Only those criteria run then (no random draws), into prune_eval_protect.json.

Writes bench/results/prune_eval.json (rewritten after every model) and prune_eval.png.
`--table FILE` prints a finished (or cut-short) result as the markdown table of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SCORES = ("importance_ablation", "importance_grad", "importance_norm")
ASKED = (0.1, 0.2, 0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--atlas", default=None, help="atlas file with the importance scores (default: "
                                                  "bench/results/prune_eval_atlas-MODEL.json; profiled if missing)")
    ap.add_argument("--work", default=None, help="directory for the pruned models (default /tmp/headwise-prune-eval/"
                                                 "MODEL); a pruned model already there with the same heads is reused")
    ap.add_argument("--criteria", nargs="+", default=list(SCORES))
    ap.add_argument("--random-seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--protect-roles", default=None, help="comma-separated role labels whose units are kept")
    ap.add_argument("--roles-atlas", default=None, help="atlas with the role scores (default: bench/results/"
                                                        "prune_eval_roles-MODEL.json; profiled if missing)")
    ap.add_argument("--fractions", default="all", help="'all' representable, or k/u,k/u (e.g. 1/3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed-repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="default bench/results/prune_eval.json (others: prune_eval_MODEL.json)")
    ap.add_argument("--table", default=None, help="only print this result file as a markdown table")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    os.environ["HEADWISE_QUIET"] = "1"
    import torch

    import headwise
    from headwise import ProfileSettings
    from headwise.atlas import Atlas
    from headwise.compare import CompareSettings, compare, plot, write_result
    from headwise.errors import HeadwiseError
    from headwise.prune import (
        PROVENANCE_FILE,
        RANDOM,
        describe_fractions,
        provenance,
        prune_heads,
        representable_fractions,
        save_pruned,
        select_heads,
    )

    torch.set_num_threads(args.threads)
    tag = args.model.replace("/", "_")
    atlas_path = Path(args.atlas or RESULTS / f"prune_eval_atlas-{tag}.json")
    work = Path(args.work or f"/tmp/headwise-prune-eval/{tag}")
    stem = "prune_eval" + ("_protect" if args.protect_roles else "")
    out = Path(args.out or RESULTS / (f"{stem}.json" if args.model == "smollm2-135m" else f"{stem}_{tag}.json"))
    wall = time.perf_counter()
    m = headwise.load(args.model)
    g = m.geometry
    if atlas_path.is_file():
        atlas = Atlas.load(atlas_path)
        atlas_how = f"reused {atlas_path}"
    else:
        t = time.perf_counter()
        atlas = headwise.profile(m, list(SCORES), ProfileSettings())
        atlas.save(atlas_path)
        atlas_how = f"profiled in this run ({time.perf_counter() - t:.0f} s), saved to {atlas_path}"
    atlas.check_model(m.info, g)
    protect = None
    if args.protect_roles:
        atlas, args.criteria, protect = protected_criteria(m, atlas, args, tag)

    possible = representable_fractions(g, m.model.config)
    if args.fractions != "all":
        wanted = {tuple(int(x) for x in f.split("/")) for f in args.fractions.split(",")}
        possible = [p for p in possible if p in wanted]
    asked = {}
    for f in ASKED:  # what the fractions become on this model
        try:
            n = len(select_heads(atlas, g, "importance_norm", f, info=m.info, config=m.model.config)) // g.n_layers
            asked[str(f)] = f"prunes {n} of {g.n_heads} query heads per layer ({n / g.n_heads:.3f})"
        except HeadwiseError as e:
            asked[str(f)] = f"refused: {e}"

    work.mkdir(parents=True, exist_ok=True)
    dirs = []
    for k, u in possible:
        fraction = k / u
        for score, seed in [(s, None) for s in args.criteria] + [(RANDOM, s) for s in args.random_seeds]:
            heads = select_heads(atlas, g, score, fraction, seed=seed, info=m.info, config=m.model.config)
            name = f"{score}{'' if seed is None else f'-seed{seed}'}@{k}of{u}"
            d = work / name
            record = provenance(m, heads, score=score, fraction=fraction, seed=seed, atlas=atlas)
            old = d / PROVENANCE_FILE
            same = old.is_file() and json.loads(old.read_text()).get("removed_heads") == record["removed_heads"] \
                and json.loads(old.read_text())["source_model"] == record["source_model"]
            if not same:
                save_pruned(prune_heads(m, heads), m.tokenizer, d, record)
            dirs.append(d)
            print(f"{name}: {'reused' if same else 'pruned'}", flush=True)

    settings = CompareSettings(speed_repeats=args.speed_repeats)
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    extra = {"benchmark": "prune_eval", "bench_command": command, "atlas": {"path": str(atlas_path), "how": atlas_how,
                                                                          "scores": atlas.score_names,
                                                                          "settings": atlas.data["settings"]},
             "geometry": g.to_dict(), "representable_fractions": describe_fractions(
                 representable_fractions(g, m.model.config)), "issue_fractions": asked,
             "torch_threads": args.threads, "cpus": os.cpu_count(), "protected_roles": protect}
    print(json.dumps(asked, indent=1), flush=True)

    def checkpoint(partial: dict) -> None:
        partial.update(extra)
        partial["wall_seconds"] = round(time.perf_counter() - wall, 1)
        write_result(out, partial)
        done = partial["models"][-1] if partial["models"] else None
        if done is not None and partial["speed"] is None:
            print(f"{done['name']:34s} ppl {done['perplexity']['perplexity']:9.3f} icl {done['in_context_loss']:.3f} "
                  f"tasks {done.get('task_accuracy', 0):.3f} passkey {done['passkey']['accuracy']:.2f} "
                  f"[{done['seconds']:.0f}s]", flush=True)

    result = compare(m, [str(d) for d in dirs], settings, model_spec=args.model, checkpoint=checkpoint,
                     command=command)
    result.update(extra)
    result["wall_seconds"] = round(time.perf_counter() - wall, 1)
    write_result(out, result)
    plot(result, out.with_suffix(".png"))
    speed = result["speed"]["models"] if result.get("speed") else {}
    print(f"\n{'model':34s} {'removed':>7s} {'params':>8s} {'ppl':>9s} {'icl':>6s} {'tasks':>6s} {'passkey':>7s} "
          f"{'prefill x':>9s} {'decode x':>8s}")
    for e in result["models"]:
        s = speed.get(e["name"], {})
        print(f"{e['name']:34s} {e['heads_removed_share']:7.3f} {e['parameters'] / 1e6:7.2f}M "
              f"{e['perplexity']['perplexity']:9.3f} {e['in_context_loss']:6.3f} {e.get('task_accuracy', 0):6.3f} "
              f"{e['passkey']['accuracy']:7.2f} {s.get('prefill_ratio', float('nan')):9.3f} "
              f"{s.get('decode_ratio', float('nan')):8.3f}")
    print(f"wall {result['wall_seconds']:.0f} s; written to {out}")


def protected_criteria(m, atlas, args, tag: str):
    """A copy of the atlas with, for each criterion S, a score "S+protect": S plus 1e6 on every head of a unit
    that holds a head labelled with one of --protect-roles, so select_heads keeps such units while it can
    (a layer whose units all hold one prunes by S alone)."""
    import copy

    import numpy as np

    import headwise
    from headwise import ProfileSettings
    from headwise.atlas import Atlas
    from headwise.prune import pruning_units

    g = m.geometry
    wanted = {r.strip() for r in args.protect_roles.split(",") if r.strip()}
    path = Path(args.roles_atlas or RESULTS / f"prune_eval_roles-{tag}.json")
    if path.is_file():
        roles = Atlas.load(path)
    else:
        roles = headwise.profile(m, ["previous_token", "induction"], ProfileSettings())
        roles.save(path)
    roles.check_model(m.info, g)
    units = pruning_units(g)
    kept = [[u for u, heads in enumerate(units) if any(wanted & set(roles.roles(layer, h)) for h in heads)]
            for layer in range(g.n_layers)]
    derived = Atlas(copy.deepcopy(atlas.data))
    names = []
    for score in args.criteria:
        values = atlas.score(score).copy()
        bonus = np.zeros_like(values)
        for layer, us in enumerate(kept):
            for u in us:
                bonus[layer, units[u]] = 1e6
        derived.set_score(f"{score}+protect", values + bonus, family="bench/prune_eval.py", probe=None,
                          description=f"{score}, +1e6 on units holding a {'/'.join(sorted(wanted))} head",
                          settings={"base_score": score, "roles": sorted(wanted), "roles_atlas": str(path)})
        names.append(f"{score}+protect")
    record = {"roles": sorted(wanted), "roles_atlas": str(path), "rules": roles.data["roles"]["rules"],
              "units_kept_per_layer": kept, "layers_with_a_kept_unit": sum(bool(k) for k in kept)}
    return derived, names, record


def table(result: dict) -> str:
    """One row per model (random draws: each, then their mean), metrics and ratios to the unpruned model."""
    speed = (result.get("speed") or {}).get("models", {})
    base = result["models"][0]
    lines = [f"| model | heads removed | parameters | perplexity | in-context loss | tasks "
             f"({len(base.get('tasks', {}))}, {result['settings']['limit']} each) | passkey "
             f"@{result['settings']['passkey_context']} | prefill x | decode x |", "|---" * 9 + "|"]

    def cells(e: dict, s: dict) -> list[str]:
        return [f"{e['heads_removed_share']:.0%}", f"{e['parameters'] / 1e6:.2f}M",
                f"{e['perplexity']['perplexity']:.2f}", f"{e['in_context_loss']:.3f}",
                f"{e.get('task_accuracy', float('nan')):.3f}",
                f"{e['passkey']['correct']}/{e['passkey']['n']}" if "passkey" in e else "-",
                f"{s['prefill_ratio']:.3f}" if s else "-", f"{s['decode_ratio']:.3f}" if s else "-"]

    groups: dict[tuple, list[dict]] = {}
    for e in result["models"]:
        groups.setdefault((e["heads_removed_share"], e["criterion"] or e["name"]), []).append(e)
    for (share, criterion), entries in groups.items():
        for e in entries:
            lines.append(f"| {e['name']} | " + " | ".join(cells(e, speed.get(e['name'], {}))) + " |")
        if len(entries) > 1:
            mean = {"heads_removed_share": share, "parameters": entries[0]["parameters"],
                    "perplexity": {"perplexity": statistics.fmean(x["perplexity"]["perplexity"] for x in entries)},
                    "in_context_loss": statistics.fmean(x["in_context_loss"] for x in entries),
                    "task_accuracy": statistics.fmean(x.get("task_accuracy", float("nan")) for x in entries),
                    "passkey": {"correct": statistics.fmean(x["passkey"]["correct"] for x in entries),
                                "n": entries[0]["passkey"]["n"]}}
            rows = [speed[x["name"]] for x in entries if x["name"] in speed]
            s = {k: statistics.fmean(r[k] for r in rows) for k in ("prefill_ratio", "decode_ratio")} if rows else {}
            lines.append(f"| **{criterion} mean of {len(entries)}** | " + " | ".join(cells(mean, s)) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
