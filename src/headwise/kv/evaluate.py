"""Run the same prompts under several KV policies side by side: accuracy, KV bytes, speed, memory.

Policies are specs (kv/spec.py). Tasks: passkey, needle, multi_needle (probes/needle.py),
perplexity (probes/text.py), speed (one subprocess per policy, so each peak RSS is its own).
Replies end by headwise.decode's rule for replies to a question.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .._progress import progress
from ..errors import HeadwiseError
from .spec import parse_policy

TASKS = ("passkey", "needle", "multi_needle", "perplexity", "speed")
SCHEMA = "headwise.kv-eval/1"


@dataclass
class EvalSettings:
    tasks: tuple[str, ...] = ("passkey",)
    contexts: tuple[int, ...] = (1024, 2048)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    trials: int = 2
    fillers: tuple[str, ...] = ("repeat",)
    max_new_tokens: int = 12
    sink: int | None = None  # streaming heads' sinks and window; None: each policy's own default
    window: int | None = None
    seed: int = 0
    text: str | None = None
    perplexity_context: int = 2048
    speed_context: int = 8192
    speed_new_tokens: int = 32
    speed_repeats: int = 1
    prefill_chunk: int | None = None


def _cases(loaded: Any, task: str, settings: EvalSettings, context: int) -> list[tuple[dict[str, Any], Any]]:
    from ..probes.needle import bundled_needles, multi_needle_case, needle_case, passkey_case

    tok, max_pos = loaded.tokenizer, loaded.geometry.max_positions
    needles = bundled_needles() if task == "needle" else []
    out = []
    for trial in range(settings.trials):
        seed = settings.seed + trial
        if task == "multi_needle":
            for filler in settings.fillers:
                case = multi_needle_case(tok, context=context, seed=seed, filler=filler, text=settings.text,
                                         max_positions=max_pos)
                out.append(({"task": task, "context": context, "depth": None, "filler": filler, "trial": trial}, case))
            continue
        for depth in settings.depths:
            for filler in settings.fillers:
                if task == "passkey":
                    case = passkey_case(tok, context=context, depth=depth, seed=seed, filler=filler,
                                        text=settings.text, max_positions=max_pos)
                else:
                    # Seed s asks for bundled needle s (mod their number) and shuffles the haystack by s.
                    case = needle_case(tok, context=context, depth=depth, needle=needles[seed % len(needles)],
                                       filler=filler, seed=seed, text=settings.text, max_positions=max_pos)
                out.append(({"task": task, "context": context, "depth": depth, "filler": filler, "trial": trial},
                            case))
    return out


def _policies_for(specs: list[str], loaded: Any, atlas: Any, context: int, settings: EvalSettings) -> dict[str, Any]:
    return {s: parse_policy(s, loaded.geometry, atlas=atlas, context=context, sink=settings.sink,
                            window=settings.window) for s in specs}


def _describe(policy: Any, context: int) -> dict[str, Any]:
    fields = {k: v for k, v in policy.to_dict().items() if k not in ("schema", "geometry", "name", "source")}
    return {"description": policy.describe(), "source": policy.source, "context": context,
            "kv_bytes": policy.kv_bytes(context), **fields}


def run_retrieval(loaded: Any, specs: list[str], settings: EvalSettings, atlas: Any = None) -> list[dict[str, Any]]:
    """Every retrieval case under every policy (policies innermost, so they see the same load)."""
    from ..probes.needle import answer_found
    from .generate import generate

    rows = []
    work = [(task, ctx) for task in settings.tasks if task in ("passkey", "needle", "multi_needle")
            for ctx in settings.contexts]
    all_cases = [(meta, case, ctx) for task, ctx in work for meta, case in _cases(loaded, task, settings, ctx)]
    warned: set[int] = set()
    for meta, case, ctx in progress(all_cases, desc="kv eval cases", unit="case"):
        policies = _policies_for(specs, loaded, atlas, ctx, settings)
        # Needle replies get room to restate the needle sentence, as the retrieval score's decoding does.
        budget = settings.max_new_tokens if meta["task"] == "passkey" else max(
            settings.max_new_tokens, min(case.reply_budget, (loaded.geometry.max_positions or 1 << 30) - case.length))
        if meta["task"] != "passkey" and budget < case.reply_budget and ctx not in warned:
            warned.add(ctx)
            print(f"headwise: at {case.length} tokens the model's limit leaves {budget} reply tokens, fewer than the "
                  f"{case.reply_budget} a reply restating the needle takes; replies may be cut short (use a shorter "
                  f"context)", file=sys.stderr)
        for spec, policy in policies.items():
            res = generate(loaded, case.input_ids, policy, max_new_tokens=budget,
                           prefill_chunk=settings.prefill_chunk, until="line", answer_ids=case.answer_ids)
            rows.append({**meta, "policy": spec, "tokens": case.length, "answer": case.answer, "reply": res.text,
                         "new_tokens": len(res.tokens), "reply_budget": budget,
                         "correct": answer_found(res.text, case.answer),
                         **_answer_scores(res, case.key_tokens), "kv_bytes": res.kv_bytes,
                         "prefill_s": round(res.prefill_seconds, 4), "decode_s": round(res.decode_seconds, 4)})
    return rows


def _answer_scores(res: Any, key_tokens: list[int] | None) -> dict[str, Any]:
    if res.answer_logprobs is None:
        return {"answer_logprob": None, "key_recalled": None}
    return {"answer_logprob": round(res.answer_logprob, 4),
            "answer_token_logprobs": [round(x, 4) for x in res.answer_logprobs],
            "key_recalled": all(res.answer_argmax[i] for i in key_tokens)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """task -> context -> policy -> accuracy, trials, mean KV bytes and ratio to the full cache; where the task
    has a teacher-forced answer, its mean log-probability per token (nats) and the share of keys recalled."""
    out: dict[str, Any] = {}
    for row in rows:
        cell = out.setdefault(row["task"], {}).setdefault(str(row["context"]), {}).setdefault(
            row["policy"], {"correct": 0, "n": 0, "kv_bytes_sum": 0, "logprobs": [], "recalled": []})
        cell["correct"] += int(row["correct"])
        cell["n"] += 1
        cell["kv_bytes_sum"] += row["kv_bytes"]
        if row.get("answer_logprob") is not None:
            cell["logprobs"].append(row["answer_logprob"])
            cell["recalled"].append(bool(row["key_recalled"]))
    for task in out.values():
        for ctx in task.values():
            full = ctx.get("full")
            full_bytes = full["kv_bytes_sum"] / full["n"] if full else None
            for cell in ctx.values():
                cell["accuracy"] = cell["correct"] / cell["n"]
                lps, recalled = cell.pop("logprobs"), cell.pop("recalled")
                cell["answer_logprob"] = round(sum(lps) / len(lps), 4) if lps else None
                cell["key_recall"] = sum(recalled) / len(recalled) if recalled else None
                cell["kv_bytes"] = int(cell.pop("kv_bytes_sum") / cell["n"])
                cell["kv_ratio"] = round(cell["kv_bytes"] / full_bytes, 4) if full_bytes else None
    return out


def run_perplexity(loaded: Any, specs: list[str], settings: EvalSettings, atlas: Any = None) -> dict[str, Any]:
    from ..probes.text import natural_text
    from .generate import perplexity

    probe = natural_text(loaded.tokenizer, context=settings.perplexity_context, n_sequences=1, seed=settings.seed,
                         text=settings.text)
    out = {}
    for spec, policy in progress(list(_policies_for(specs, loaded, atlas, settings.perplexity_context,
                                                    settings).items()), desc="perplexity", unit="policy"):
        if not policy.accepts_chunks:
            out[spec] = {"skipped": f"{policy.policy_type} evicts once at the end of a prompt; not defined over a "
                                    f"stream"}
            continue
        out[spec] = perplexity(loaded, probe.input_ids, policy)
    return {"context": settings.perplexity_context, "probe": probe.settings, "policies": out}


def _speed_worker(args: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: load, one prompt, one policy; report times, bytes and peak RSS."""
    import torch

    from ..atlas import Atlas
    from ..load import load
    from ..probes.needle import passkey_case
    from .generate import generate

    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    loaded = load(args["model"])
    atlas = Atlas.load(args["atlas"]) if args.get("atlas") else None
    case = passkey_case(loaded.tokenizer, context=args["context"], depth=0.5, seed=0,
                        max_positions=loaded.geometry.max_positions)
    policy = parse_policy(args["policy"], loaded.geometry, atlas=atlas, context=args["context"], sink=args["sink"],
                          window=args["window"])
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = generate(loaded, case.input_ids, policy, max_new_tokens=args["new_tokens"], until="budget",
                   prefill_chunk=args.get("prefill_chunk"))
    return {"policy": args["policy"], "context": case.length, "prefill_s": res.prefill_seconds,
            "prefill_tok_s": res.prefill_tokens_per_second, "decode_tok_s": res.decode_tokens_per_second,
            "new_tokens": len(res.tokens), "kv_bytes": res.kv_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_after_load_bytes": rss_loaded}


def run_speed(model: str, specs: list[str], settings: EvalSettings, atlas_path: str | None = None) -> dict[str, Any]:
    """One subprocess per policy and repeat, alternating policies; the best repeat of each is kept.
    Each runs with this process's torch thread count."""
    import torch

    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in specs}
    jobs = [s for _ in range(settings.speed_repeats) for s in specs]
    for spec in progress(jobs, desc=f"speed @ {settings.speed_context} tokens", unit="run"):
        args = {"model": model, "policy": spec, "context": settings.speed_context, "atlas": atlas_path,
                "sink": settings.sink, "window": settings.window, "new_tokens": settings.speed_new_tokens,
                "prefill_chunk": settings.prefill_chunk, "threads": torch.get_num_threads()}
        proc = subprocess.run([sys.executable, "-m", "headwise.kv.evaluate", "--speed-worker", json.dumps(args)],
                              capture_output=True, text=True, env={**os.environ, "HEADWISE_QUIET": "1"})
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise HeadwiseError(f"speed run for policy '{spec}' failed: {tail}")
        runs[spec].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = {}
    for spec, rs in runs.items():
        best = max(rs, key=lambda r: r["decode_tok_s"])
        out[spec] = {**best, "repeats": len(rs), "decode_tok_s_all": [r["decode_tok_s"] for r in rs],
                     "prefill_s_all": [r["prefill_s"] for r in rs],
                     "peak_rss_bytes": min(r["peak_rss_bytes"] for r in rs)}
    if "full" in out:
        base = out["full"]
        for r in out.values():
            r["decode_speedup_vs_full"] = round(r["decode_tok_s"] / base["decode_tok_s"], 3)
            r["kv_ratio_vs_full"] = round(r["kv_bytes"] / base["kv_bytes"], 4)
            r["peak_rss_saved_bytes"] = base["peak_rss_bytes"] - r["peak_rss_bytes"]
            r["kv_saved_bytes"] = base["kv_bytes"] - r["kv_bytes"]
    return {"context": settings.speed_context, "new_tokens": settings.speed_new_tokens, "policies": out}


def evaluate(loaded: Any, specs: list[str], settings: EvalSettings, atlas: Any = None, atlas_path: str | None = None,
             model_spec: str | None = None) -> dict[str, Any]:
    """The whole comparison as one JSON-ready dict."""
    from ..atlas import versions

    unknown = [t for t in settings.tasks if t not in TASKS]
    if unknown:
        raise HeadwiseError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if not specs:
        raise HeadwiseError("give at least one policy")
    if "full" not in specs:
        specs = ["full", *specs]  # every ratio is against the full cache measured in the same run
    for ctx in settings.contexts:
        loaded.geometry.check_context(ctx + settings.max_new_tokens)
    longest = max(settings.contexts)
    example = {s: _describe(p, longest) for s, p in _policies_for(specs, loaded, atlas, longest, settings).items()}
    t0 = time.perf_counter()
    result: dict[str, Any] = {"schema": SCHEMA, "model": loaded.info.to_dict(), "geometry": loaded.geometry.to_dict(),
                              "settings": asdict(settings), "versions": versions(), "policies": example,
                              "atlas": None if atlas is None else {"path": atlas_path, "model": atlas.model}}
    rows = run_retrieval(loaded, specs, settings, atlas)
    result["summary"] = summarize(rows)
    result["rows"] = rows
    if "perplexity" in settings.tasks:
        result["perplexity"] = run_perplexity(loaded, specs, settings, atlas)
    if "speed" in settings.tasks:
        result["speed"] = run_speed(model_spec or loaded.info.spec, specs, settings, atlas_path)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def plot(result: dict[str, Any], path: str | Path) -> Path | None:
    """Accuracy against KV bytes, one panel per task, one point per policy and context."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("headwise: matplotlib is not installed (pip install 'headwise[plot]'); skipping the plot",
              file=sys.stderr)
        return None
    tasks = list(result["summary"])
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        by_policy: dict[str, list[tuple[float, float, str]]] = {}
        for ctx, cells in result["summary"][task].items():
            for spec, cell in cells.items():
                by_policy.setdefault(spec, []).append((cell["kv_bytes"] / 2**20, cell["accuracy"], ctx))
        for spec, pts in by_policy.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=spec)
            for x, y, ctx in pts:
                ax.annotate(ctx, (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("KV cache (MiB)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{task} ({result['model']['spec']})")
        ax.set_ylim(-0.05, 1.05)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--speed-worker":
    print(json.dumps(_speed_worker(json.loads(sys.argv[2]))))
