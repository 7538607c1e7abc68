"""Steering through heads on smollm2-135m: for each bundled task, held-out accuracy zero-shot, few-shot
(1, 5, 10 examples), each steering method (soft injection, LoFiT, ACT) on its own choice of heads and
on as many random heads, with trained parameters and inference cost relative to few-shot prompting.

    python bench/steer_table.py [--tasks antonyms,country_capital] [--limit 50] [--controls 0]
    python bench/steer_table.py --summary          # the markdown table of every finished task

Every method fits on the task's train split only (its own hyperparameters, chosen by its module on a
slice of train, or the paper's defaults); the test split is read only to score. One JSON per task,
bench/results/steer_table/TASK.json, written when the task finishes (a cut-short run keeps finished
tasks; a finished task is skipped unless --redo). Several processes may run disjoint --tasks at once.
Timing columns are ratios measured in the same process (seconds per query / the k-shot prompt's).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "steer_table"
METHODS = ("soft_injection", "lofit", "act")


def _run(args: argparse.Namespace) -> None:
    import torch

    import headwise
    from headwise.atlas import versions
    from headwise.steer import steering_rows
    from headwise.tasks import bundled_tasks, load_task

    torch.set_num_threads(args.threads)
    loaded = headwise.load(args.model)
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else list(bundled_tasks())
    methods = [m for m in args.methods.split(",") if m]
    controls = tuple(int(c) for c in args.controls.split(",") if c)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in tasks:
        path = OUT / f"{name}.json"
        if path.exists() and not args.redo:
            print(f"{name}: done before, skipped", file=sys.stderr)
            continue
        task = load_task(name)
        t0 = time.perf_counter()
        rows = steering_rows(loaded, task, methods, limit=args.limit, seed=args.seed, control_seeds=controls,
                             on_row=lambda k, r, task=name: print(f"{task} {k}: {r['correct']}/{r['n']}",
                                                                  file=sys.stderr))
        doc = {"command": "python " + shlex.join(sys.argv), "model": loaded.info.to_dict(), "task": task.record(),
               "limit": args.limit, "seed": args.seed, "control_seeds": list(controls), "threads": args.threads,
               "seconds": time.perf_counter() - t0, "machine": platform.machine(), "versions": versions(),
               "rows": rows}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(path)


def _summary() -> None:
    docs = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    if not docs:
        sys.exit("no finished task in " + str(OUT))
    names = list(docs[0]["rows"])
    print("| task | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for d in docs:
        cells = [f"{d['rows'][n]['accuracy']:.0%}" if n in d["rows"] else "-" for n in names]
        print(f"| {d['task']['name']} (n={d['rows']['0-shot']['n']}) | " + " | ".join(cells) + " |")
    print()
    print("| method | trained parameters (mean) | heads (mean) | time / query vs 5-shot | tokens vs 5-shot |")
    print("|---|---|---|---|---|")
    for n in names:
        rows = [d["rows"][n] for d in docs if n in d["rows"]]
        mean = {key: sum(r.get(key, 0) or 0 for r in rows) / len(rows)
                for key in ("trained_parameters", "time_vs_5_shot", "tokens_vs_5_shot")}
        heads = sum(len(r.get("heads", [])) for r in rows) / len(rows)
        print(f"| {n} | {mean['trained_parameters']:,.0f} | {heads:.1f} | {mean['time_vs_5_shot']:.2f}x | "
              f"{mean['tokens_vs_5_shot']:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="", help="comma-separated bundled tasks (default: all)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--limit", type=int, default=50, help="held-out pairs scored per task")
    p.add_argument("--controls", default="0", help="seeds of the random-heads controls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--redo", action="store_true")
    p.add_argument("--summary", action="store_true")
    args = p.parse_args()
    _summary() if args.summary else _run(args)


if __name__ == "__main__":
    main()
