"""Run the same prompts under several KV policies side by side: accuracy, KV bytes, speed, memory.

Policies are specs (kv/spec.py). Tasks: passkey, needle, multi_needle (probes/needle.py),
RULER's synthetic tasks ("ruler" for all of them, or each by name; probes/ruler.py, scored by RULER's
string_match_all), perplexity (probes/text.py), speed (one subprocess per policy, so each peak RSS
is its own). Replies end by headwise.decode's rule for replies to a question; RULER's replies by
its own rule, tokens_to_generate or the end of sequence. Settings are checked in one
place (EvalSettings.check); a long run hands its finished cases to `checkpoint` as it goes, so
`headwise eval --out` keeps them when interrupted ("complete": false), and load_eval reads a
result back, checked against its schema.
"""

from __future__ import annotations

import io
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .._io import write_bytes_atomic
from .._memory import PeakRSS, peak_rss
from .._plotting import pyplot
from .._progress import progress
from .._schema import EVAL as SCHEMA
from ..errors import HeadwiseError
from ..probes.ruler import RULER_TASKS, TOKENS_TO_GENERATE, RulerCase, ruler_case, ruler_score
from .spec import parse_policy

TASKS = ("passkey", "needle", "multi_needle", "perplexity", "speed", "ruler", *RULER_TASKS)
PROMPT_TASKS = ("passkey", "needle", "multi_needle", *RULER_TASKS)  # the tasks run_retrieval decodes


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

    def __post_init__(self) -> None:
        # "ruler" stands for all of RULER's tasks
        expanded = [x for t in self.tasks for x in (RULER_TASKS if t == "ruler" else (t,))]
        self.tasks = tuple(dict.fromkeys(expanded))

    def check(self, geometry: Any = None) -> None:
        """Refuse settings that would crash or mislead (one line naming the flag), before a model loads;
        with the model's geometry, also the sizes it cannot hold. evaluate() checks them again."""
        from ..probes.needle import FILLER_STYLES
        from .spec import check_sink_window

        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise HeadwiseError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; choose from "
                                f"{', '.join(TASKS)}")
        retrieval = any(t in ("passkey", "needle", "multi_needle") for t in self.tasks)
        ruler = [t for t in self.tasks if t in RULER_TASKS]
        if (retrieval or ruler) and not self.contexts:
            raise HeadwiseError("--contexts is empty; give at least one prompt length, e.g. --contexts 1024")
        if retrieval and "multi_needle" not in self.tasks and not self.depths:
            raise HeadwiseError("--depths is empty; give needle depths in [0, 1], e.g. --depths 0.1,0.5,0.9")
        for depth in self.depths:
            if not (isinstance(depth, (int, float)) and math.isfinite(depth) and 0.0 <= depth <= 1.0):
                raise HeadwiseError(f"--depths are fractions of the prompt in [0, 1], got {depth}")
        bad = [f for f in self.fillers if f not in FILLER_STYLES]
        if bad or (retrieval and not self.fillers):
            raise HeadwiseError(f"unknown filler(s) {', '.join(bad) or '(none given)'}; choose from "
                                f"{', '.join(FILLER_STYLES)}")
        counts = (("--trials", self.trials, 1), ("max_new_tokens", self.max_new_tokens, 1),
                  ("--speed-context", self.speed_context, 1), ("speed_new_tokens", self.speed_new_tokens, 1),
                  ("speed_repeats", self.speed_repeats, 1), ("--perplexity-context", self.perplexity_context, 2),
                  ("--seed", self.seed, 0), ("--prefill-chunk", self.prefill_chunk, 1),
                  *(("--contexts", c, 1) for c in self.contexts))
        for flag, value, low in counts:
            if value is None and flag == "--prefill-chunk":
                continue
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise HeadwiseError(f"{flag} must be a whole number >= {low}, got {value!r}")
        if self.text is not None and not Path(self.text).is_file():
            raise HeadwiseError(f"--text {self.text} is not a file; pass a UTF-8 text file or leave --text out")
        check_sink_window(self.sink, self.window, geometry)
        if geometry is not None:
            if retrieval:
                for ctx in self.contexts:  # the prompt and its reply
                    geometry.check_context(ctx + self.max_new_tokens)
            for ctx in self.contexts if ruler else ():
                geometry.check_context(ctx + max(TOKENS_TO_GENERATE[t] for t in ruler))
            if "perplexity" in self.tasks:
                geometry.check_context(self.perplexity_context)
            if "speed" in self.tasks:
                geometry.check_context(self.speed_context + self.speed_new_tokens)


def _cases(loaded: Any, task: str, settings: EvalSettings, context: int) -> list[tuple[dict[str, Any], Any]]:
    from ..probes.needle import bundled_needles, multi_needle_case, needle_case, passkey_case

    tok, max_pos = loaded.tokenizer, loaded.geometry.max_positions
    if task in RULER_TASKS:  # seed + trial draws the whole case: RULER has no depth or filler setting
        return [({"task": task, "context": context, "depth": None, "filler": None, "trial": trial,
                  "seed": settings.seed + trial},
                 ruler_case(tok, task, context=context, seed=settings.seed + trial, max_positions=max_pos))
                for trial in range(settings.trials)]
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
                            window=settings.window, dtype_bytes=loaded.dtype_bytes) for s in specs}


def _describe(policy: Any, context: int, dtype_bytes: int) -> dict[str, Any]:
    fields = {k: v for k, v in policy.to_dict().items() if k not in ("schema", "geometry", "name", "source")}
    return {"description": policy.describe(), "source": policy.source, "context": context,
            "kv_bytes": policy.kv_bytes(context, dtype_bytes=dtype_bytes), **fields}


def run_retrieval(loaded: Any, specs: list[str], settings: EvalSettings, atlas: Any = None, *,
                  on_case: Callable[[list[dict[str, Any]], int, int], None] | None = None) -> list[dict[str, Any]]:
    """Every retrieval case under every policy (policies innermost, so they see the same load).

    on_case(rows so far, cases done, cases in all) is called after each case (e.g. to save them)."""
    from ..probes.needle import answer_found
    from .generate import generate

    rows = []
    work = [(task, ctx) for task in settings.tasks if task in PROMPT_TASKS for ctx in settings.contexts]
    all_cases = [(meta, case, ctx) for task, ctx in work for meta, case in _cases(loaded, task, settings, ctx)]
    warned: set[int] = set()
    for done, (meta, case, ctx) in enumerate(progress(all_cases, desc="kv eval cases", unit="case"), 1):
        policies = _policies_for(specs, loaded, atlas, ctx, settings)
        if isinstance(case, RulerCase):
            rows += _ruler_rows(loaded, case, meta, policies, settings)
            if on_case is not None:
                on_case(rows, done, len(all_cases))
            continue
        # Needle replies get room to restate the needle sentence, as the retrieval score's decoding does.
        budget = settings.max_new_tokens if meta["task"] == "passkey" else max(
            settings.max_new_tokens, min(case.reply_budget, (loaded.geometry.max_positions or 1 << 30) - case.length))
        if meta["task"] != "passkey" and budget < case.reply_budget and ctx not in warned:
            warned.add(ctx)
            print(f"headwise: at {case.length} tokens the model's limit leaves {budget} reply tokens, fewer than the "
                  f"{case.reply_budget} a reply restating the needle takes; replies may be cut short (use a shorter "
                  f"context)", file=sys.stderr)
        for spec, policy in policies.items():
            with peak_rss() as memory:
                res = generate(loaded, case.input_ids, policy, max_new_tokens=budget,
                               prefill_chunk=settings.prefill_chunk, until="line", answer_ids=case.answer_ids)
            rows.append({**meta, "policy": spec, "tokens": case.length, "answer": case.answer, "reply": res.text,
                         "new_tokens": len(res.tokens), "reply_budget": budget,
                         "correct": answer_found(res.text, case.answer),
                         **_answer_scores(res, case.key_tokens), **_costs(res, memory)})
        if on_case is not None:
            on_case(rows, done, len(all_cases))
    return rows


def _ruler_rows(loaded: Any, case: RulerCase, meta: dict[str, Any], policies: dict[str, Any],
                settings: EvalSettings) -> list[dict[str, Any]]:
    """One RULER case under every policy: the reply to RULER's token budget and stop rule, and its score."""
    from .generate import generate

    rows = []
    for spec, policy in policies.items():
        with peak_rss() as memory:
            res = generate(loaded, case.input_ids, policy, max_new_tokens=case.max_new_tokens,
                           prefill_chunk=settings.prefill_chunk, until=case.until)
        score = ruler_score(res.text, case.answers)
        rows.append({**meta, "policy": spec, "tokens": case.length, "answers": case.answers, "reply": res.text,
                     "new_tokens": len(res.tokens), "reply_budget": case.max_new_tokens, "until": case.until,
                     "score": score, "correct": score == 1.0, **_costs(res, memory)})
    return rows


def _costs(res: Any, memory: PeakRSS) -> dict[str, Any]:
    """What one reply cost: KV bytes, prefill and decode seconds, and the peak RSS while it ran (Linux; else None).

    The peak is read in this process, after giving free memory back, so it counts the prompt's activations and
    cache, not memory an earlier policy left behind (speed's subprocesses give each policy a process of its own)."""
    return {"kv_bytes": res.kv_bytes, "prefill_s": round(res.prefill_seconds, 4),
            "decode_s": round(res.decode_seconds, 4), "peak_rss_bytes": memory.peak_bytes,
            "peak_rss_above_start_bytes": memory.above_start_bytes}


def _answer_scores(res: Any, key_tokens: list[int] | None) -> dict[str, Any]:
    if res.answer_logprobs is None:
        return {"answer_logprob": None, "key_recalled": None}
    return {"answer_logprob": round(res.answer_logprob, 4),
            "answer_token_logprobs": [round(x, 4) for x in res.answer_logprobs],
            "key_recalled": all(res.answer_argmax[i] for i in key_tokens)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """task -> context -> policy -> accuracy, trials, mean KV bytes and ratio to the full cache; where the task
    has a teacher-forced answer, its mean log-probability per token (nats) and the share of keys recalled.

    RULER tasks' cells add "score", RULER's string_match_all on its 0-100 scale (accuracy there is the share of
    replies with every answer), and a "ruler" task averages their scores over the RULER tasks run, as RULER
    averages its tasks."""
    out: dict[str, Any] = {}
    for row in rows:
        cell = out.setdefault(row["task"], {}).setdefault(str(row["context"]), {}).setdefault(
            row["policy"], {"correct": 0, "n": 0, "kv_bytes_sum": 0, "logprobs": [], "recalled": [], "rss": []})
        cell["correct"] += int(row["correct"])
        cell["n"] += 1
        cell["kv_bytes_sum"] += row["kv_bytes"]
        if row.get("peak_rss_above_start_bytes") is not None:  # older results and non-Linux runs have none
            cell["rss"].append(row["peak_rss_above_start_bytes"])
        if row.get("answer_logprob") is not None:
            cell["logprobs"].append(row["answer_logprob"])
            cell["recalled"].append(bool(row["key_recalled"]))
        if "score" in row:
            cell.setdefault("scores", []).append(row["score"])
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
                rss = cell.pop("rss")
                cell["peak_rss_above_start_bytes"] = max(rss) if rss else None
                cell["kv_ratio"] = round(cell["kv_bytes"] / full_bytes, 4) if full_bytes else None
                if "scores" in cell:
                    scores = cell.pop("scores")
                    cell["score"] = round(sum(scores) / len(scores) * 100, 2)
    ruler = [t for t in RULER_TASKS if t in out]
    if ruler:
        out["ruler"] = _ruler_average({t: out[t] for t in ruler})
    return out


def _ruler_average(tasks: dict[str, Any]) -> dict[str, Any]:
    """context -> policy -> the mean of the RULER tasks' scores (each task weighs the same), pooled counts."""
    avg: dict[str, Any] = {}
    for by_ctx in tasks.values():
        for ctx, cells in by_ctx.items():
            for spec, c in cells.items():
                a = avg.setdefault(ctx, {}).setdefault(spec, {"correct": 0, "n": 0, "bytes": 0, "scores": []})
                a["correct"] += c["correct"]
                a["n"] += c["n"]
                a["bytes"] += c["kv_bytes"] * c["n"]
                a["scores"].append(c["score"])
    for cells in avg.values():
        for a in cells.values():
            scores = a.pop("scores")
            a.update(accuracy=a["correct"] / a["n"], kv_bytes=int(a.pop("bytes") / a["n"]),
                     score=round(sum(scores) / len(scores), 2), tasks=len(scores))
        full = cells.get("full")
        for a in cells.values():
            a["kv_ratio"] = round(a["kv_bytes"] / full["kv_bytes"], 4) if full else None
    return avg


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
    loaded = load(args["model"], dtype=args["dtype"])
    atlas = Atlas.load(args["atlas"]) if args.get("atlas") else None
    case = passkey_case(loaded.tokenizer, context=args["context"], depth=0.5, seed=0,
                        max_positions=loaded.geometry.max_positions)
    policy = parse_policy(args["policy"], loaded.geometry, atlas=atlas, context=args["context"], sink=args["sink"],
                          window=args["window"], dtype_bytes=loaded.dtype_bytes)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = generate(loaded, case.input_ids, policy, max_new_tokens=args["new_tokens"], until="budget",
                   prefill_chunk=args.get("prefill_chunk"))
    return {"policy": args["policy"], "context": case.length, "prefill_s": res.prefill_seconds,
            "prefill_tok_s": res.prefill_tokens_per_second, "decode_tok_s": res.decode_tokens_per_second,
            "new_tokens": len(res.tokens), "kv_bytes": res.kv_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_after_load_bytes": rss_loaded}


def run_speed(model: str, specs: list[str], settings: EvalSettings, atlas_path: str | None = None,
              dtype: str = "float32") -> dict[str, Any]:
    """One subprocess per policy and repeat, alternating policies; the best repeat of each is kept.
    Each runs with this process's torch thread count."""
    import torch

    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in specs}
    jobs = [s for _ in range(settings.speed_repeats) for s in specs]
    for spec in progress(jobs, desc=f"speed @ {settings.speed_context} tokens", unit="run"):
        args = {"model": model, "policy": spec, "context": settings.speed_context, "atlas": atlas_path,
                "sink": settings.sink, "window": settings.window, "new_tokens": settings.speed_new_tokens,
                "prefill_chunk": settings.prefill_chunk, "threads": torch.get_num_threads(), "dtype": dtype}
        # Its output is captured, so a worker stopped by Ctrl-C (which reaches it too) prints nothing here.
        proc = subprocess.run([sys.executable, "-m", "headwise.kv.evaluate", "--speed-worker", json.dumps(args)],
                              capture_output=True, text=True, env={**os.environ, "HEADWISE_QUIET": "1"},
                              stdin=subprocess.DEVNULL)
        if proc.returncode in (130, -signal.SIGINT):
            raise KeyboardInterrupt
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("headwise: error: ")
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
             model_spec: str | None = None, *,
             checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The whole comparison as one JSON-ready dict ("complete": true).

    checkpoint(partial result) is called after every retrieval case and after the perplexity and speed
    runs, with "complete": false and the cases done so far, so that an interrupted run can keep them."""
    from ..atlas import versions

    settings.check(loaded.geometry)
    if not specs:
        raise HeadwiseError("give at least one policy")
    if "full" not in specs:
        specs = ["full", *specs]  # every ratio is against the full cache measured in the same run
    longest = max(settings.contexts) if settings.contexts else settings.perplexity_context
    example = {s: _describe(p, longest, loaded.dtype_bytes)
               for s, p in _policies_for(specs, loaded, atlas, longest, settings).items()}
    t0 = time.perf_counter()
    result: dict[str, Any] = {"schema": SCHEMA, "model": loaded.info.to_dict(), "geometry": loaded.geometry.to_dict(),
                              "settings": asdict(settings), "versions": versions(), "policies": example,
                              "atlas": None if atlas is None else {"path": atlas_path, "model": atlas.model},
                              "complete": False, "cases": {"done": 0, "total": None}, "summary": {}, "rows": []}

    def save(rows: list[dict[str, Any]] | None = None, done: int | None = None, total: int | None = None) -> None:
        if rows is not None:
            result.update(summary=summarize(rows), rows=list(rows), cases={"done": done, "total": total})
        result["seconds"] = round(time.perf_counter() - t0, 1)
        if checkpoint is not None:
            checkpoint(result)

    rows = run_retrieval(loaded, specs, settings, atlas, on_case=save)
    result.update(summary=summarize(rows), rows=rows)
    if "perplexity" in settings.tasks:
        result["perplexity"] = run_perplexity(loaded, specs, settings, atlas)
        save()
    if "speed" in settings.tasks:
        result["speed"] = run_speed(model_spec or loaded.info.spec, specs, settings, atlas_path, loaded.dtype_name)
        save()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["complete"] = True
    return result


def load_eval(path: str | Path) -> dict[str, Any]:
    """A result of `headwise eval --out`, checked (one-line errors naming the field). An interrupted run's
    file loads too: its "complete" is false and "cases" says how many were done."""
    from .._schema import eval_schema, load_json_file, validate_json

    fix = "re-run headwise eval"
    doc = load_json_file(path, what="a headwise eval result", fix=fix)
    validate_json(doc, eval_schema(), source=str(path), fix=fix)
    return doc


def plot(result: dict[str, Any], path: str | Path) -> Path | None:
    """Accuracy against KV bytes, one panel per task, one point per policy and context; RULER's tasks in one
    panel, their average score / 100."""
    plt = pyplot()
    if plt is None:
        return None
    tasks = [t for t in result["summary"] if t not in RULER_TASKS]
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        by_policy: dict[str, list[tuple[float, float, str]]] = {}
        for ctx, cells in result["summary"][task].items():
            for spec, cell in cells.items():
                y = cell["score"] / 100 if "score" in cell else cell["accuracy"]
                by_policy.setdefault(spec, []).append((cell["kv_bytes"] / 2**20, y, ctx))
        for spec, pts in by_policy.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=spec)
            for x, y, ctx in pts:
                ax.annotate(ctx, (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("KV cache (MiB)")
        ax.set_ylabel("RULER score / 100" if task == "ruler" else "accuracy")
        ax.set_title(f"{task} ({result['model']['spec']})")
        ax.set_ylim(-0.05, 1.05)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, metadata={"Software": None})  # no timestamps: same result, same bytes
    plt.close(fig)
    write_bytes_atomic(path, png.getvalue())
    return path


def _worker_main(arg: str) -> int:
    """The speed worker's process: one line of JSON, or one line of error; never a traceback for Ctrl-C."""
    try:
        print(json.dumps(_speed_worker(json.loads(arg))))
    except HeadwiseError as e:
        print(f"headwise: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


__all__ = ["SCHEMA", "TASKS", "EvalSettings", "evaluate", "load_eval", "plot", "run_perplexity", "run_retrieval",
           "run_speed", "summarize"]

if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--speed-worker":
    sys.exit(_worker_main(sys.argv[2]))
