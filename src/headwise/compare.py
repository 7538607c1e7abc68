"""A model and pruned versions of it, side by side in one process (`headwise compare`).

Every model is measured on the same inputs:
- perplexity on held-out prose: windows of the bundled text that no profile score read. The
  windows the profile's natural-text probes read (importance_text, the shared text probe,
  pattern_text; at the default profile settings and at the settings each pruned model's atlas
  recorded) are replayed and no held-out window overlaps one (held_out_text);
- in-context loss: the loss on the second copy of repeated random tokens (validate.in_context);
- the in-context task suite (headwise.tasks): greedy exact match, k-shot, on each task's test split;
- passkey retrieval at ~1K tokens (probes.needle, repeated filler, greedy reply), seeds 1000 and up,
  which nothing else in headwise uses and no setting was chosen on;
- parameters;
- prefill and decode tokens/s, timed interleaved (A B C A B C ..., after one untimed round), with
  medians and ratios to the base. Timings are the only numbers that vary between runs.

Models: the base and directories written by `headwise prune` (their headwise-pruned.json must
record the base's weights) or any Hugging Face directory with the base's tokenizer. compare()
hands its result to `checkpoint` after every finished model and speed round ("complete": false
until the end), so an interrupted run keeps what it finished. Memory holds every model at once
(the interleaved timing needs them all); each is loaded and checked before any is measured.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import _io
from ._plotting import pyplot
from ._progress import progress
from .errors import HeadwiseError

SCHEMA = "headwise.compare/1"
# A lookup, word forms and two spelling tasks, each with >= 50 test pairs, that smollm2-135m does neither never nor
# always 5-shot (30 pairs: 10-93%); english_french (7%) and next_month (0%) would sit at the floor.
DEFAULT_TASKS = ("antonyms", "country_capital", "first_letter", "lower_upper", "singular_plural")
BASE = "base"
PASSKEY_NEW_TOKENS = 12


@dataclass
class CompareSettings:
    heldout_windows: int = 16
    heldout_context: int = 256
    heldout_seed: int = 1
    icl_block: int = 64
    icl_sequences: int = 8
    icl_seed: int = 1  # validation's in-context loss uses seed 0
    tasks: tuple[str, ...] = DEFAULT_TASKS
    shots: int = 5
    limit: int = 30
    task_seed: int = 0
    passkey_context: int = 1024
    passkey_trials: int = 10
    passkey_seed: int = 1000
    speed_prompt: int = 512
    speed_new_tokens: int = 33  # 32 timed decode steps: the first token comes out of the prefill
    speed_repeats: int = 5
    speed_seed: int = 0

    def check(self, geometry: Any = None) -> None:
        """Refuse, in one line naming the flag, a setting that would crash or measure nothing; with the
        base's geometry, also lengths the model cannot hold."""
        counts = (("--heldout-windows", self.heldout_windows, 1), ("--heldout-context", self.heldout_context, 2),
                  ("heldout_seed", self.heldout_seed, 0), ("icl_block", self.icl_block, 2),
                  ("icl_sequences", self.icl_sequences, 1), ("icl_seed", self.icl_seed, 0),
                  ("--shots", self.shots, 0), ("--limit", self.limit, 1), ("task_seed", self.task_seed, 0),
                  ("--passkey-context", self.passkey_context, 64), ("--passkey-trials", self.passkey_trials, 0),
                  ("passkey_seed", self.passkey_seed, 0), ("--speed-prompt", self.speed_prompt, 1),
                  ("--speed-new-tokens", self.speed_new_tokens, 2), ("--speed-repeats", self.speed_repeats, 0),
                  ("speed_seed", self.speed_seed, 0))
        for flag, value, low in counts:
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise HeadwiseError(f"{flag} must be a whole number >= {low}, got {value!r}")
        if len(set(self.tasks)) != len(self.tasks):
            raise HeadwiseError(f"--tasks names a task twice ({', '.join(self.tasks)}); name each once")
        if geometry is not None:
            geometry.check_context(self.heldout_context)
            geometry.check_context(2 * self.icl_block + 1)
            if self.passkey_trials:
                geometry.check_context(self.passkey_context + PASSKEY_NEW_TOKENS)
            if self.speed_repeats:
                geometry.check_context(self.speed_prompt + self.speed_new_tokens)


def load_tasks(settings: CompareSettings) -> list[Any]:
    """The task suite, each task checked for enough training pairs for the shots (before any model loads)."""
    from .tasks import load_task

    tasks = [load_task(name) for name in settings.tasks]
    for task in tasks:
        if settings.shots > len(task.train) - 1:
            raise HeadwiseError(f"task {task.name} has {len(task.train)} training pairs; --shots {settings.shots} "
                                f"needs at least {settings.shots + 1}")
    return tasks


# ---- the models ---------------------------------------------------------------------------------------
def read_provenance(directory: str | Path) -> dict[str, Any] | None:
    """A model directory's headwise-pruned.json (None for a directory headwise did not prune), checked.
    The directory itself is refused, in one line, when it is missing or holds no model."""
    from .prune import PROVENANCE_FILE
    from .prune import SCHEMA as PRUNED

    d = Path(directory)
    if not d.is_dir():
        raise HeadwiseError(f"no such directory: {d}; pass directories written by headwise prune")
    if not (d / "config.json").is_file():
        raise HeadwiseError(f"{d} is not a model directory (no config.json); pass a directory written by headwise "
                            f"prune or a Hugging Face model directory")
    path = d / PROVENANCE_FILE
    if not path.is_file():
        return None
    fix = f"re-run headwise prune into {d}"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HeadwiseError(f"{path} is unreadable or not JSON ({str(e).splitlines()[0][:120]}); {fix}") from None
    sha = record.get("source_model", {}).get("weights_sha256") if isinstance(record, dict) else None
    if not isinstance(record, dict) or record.get("schema") != PRUNED or not isinstance(sha, str):
        raise HeadwiseError(f"{path} is not a headwise-pruned.json of schema {PRUNED} with the source model's "
                            f"weights_sha256; {fix}")
    return record


def check_pruned_dirs(directories: Sequence[str | Path]) -> list[dict[str, Any] | None]:
    """Every directory's provenance, refused in one line before any model loads (see read_provenance)."""
    if not directories:
        raise HeadwiseError("give at least one pruned model directory (--pruned DIR)")
    seen = set()
    for d in directories:
        key = Path(d).resolve()
        if key in seen:
            raise HeadwiseError(f"{d} is given twice; name each pruned model once")
        seen.add(key)
    return [read_provenance(d) for d in directories]


def _check_same_base(base: Any, loaded: Any, path: Path, record: dict[str, Any] | None) -> None:
    """Refuse a directory pruned from other weights (its record says so); with `loaded`, one whose layers, head
    size, vocabulary or tokenizer differ from the base's."""
    if record is not None:
        theirs, ours = record["source_model"]["weights_sha256"], base.info.weights_sha256
        if theirs != ours:
            spec = record["source_model"].get("spec", "?")
            raise HeadwiseError(f"{path} was pruned from another model ({spec}, weights sha256 {theirs[:12]}...), not "
                                f"from {base.info.spec} ({ours[:12]}...); compare it with --model {spec}")
    if loaded is None:
        return
    g, b = loaded.geometry, base.geometry
    if loaded.geometry.modality != "text":
        raise HeadwiseError(f"{path} is not a language model; compare needs causal LMs")
    if (g.n_layers, g.head_dim, g.vocab_size) != (b.n_layers, b.head_dim, b.vocab_size):
        raise HeadwiseError(f"{path} has {g.n_layers} layers, head_dim {g.head_dim} and {g.vocab_size} tokens; "
                            f"{base.info.spec} has {b.n_layers}, {b.head_dim} and {b.vocab_size}: not a pruned "
                            f"version of it")
    a, t = base.tokenizer, loaded.tokenizer
    if a.get_vocab() != t.get_vocab() or (a.bos_token_id, a.eos_token_id) != (t.bos_token_id, t.eos_token_id):
        raise HeadwiseError(f"{path} has another tokenizer than {base.info.spec}; compare models that share one")


def _summary(record: dict[str, Any] | None, base: Any, loaded: Any) -> dict[str, Any]:
    removed = 1 - loaded.geometry.n_heads / base.geometry.n_heads
    if record is None:
        return {"criterion": None, "seed": None, "fraction_asked": None, "heads_removed_share": round(removed, 4)}
    return {"criterion": record.get("score"), "seed": record.get("seed"), "fraction_asked": record.get("fraction"),
            "heads_removed_share": round(removed, 4)}


def _geometry(g: Any) -> dict[str, Any]:
    return {"layers": g.n_layers, "query_heads": g.n_heads, "kv_heads": g.n_kv_heads, "head_dim": g.head_dim}


# ---- held-out text -------------------------------------------------------------------------------------
def profile_text_probes(atlas_settings: dict[str, Any] | None, source: str) -> list[dict[str, Any]]:
    """The natural-text probes an atlas's scores read (context, sequences, seed, text): those it recorded,
    or, without an atlas, those of the default profile settings."""
    if atlas_settings is None:
        from .profile import ProfileSettings

        s = ProfileSettings()
        return [{"probe": name, "context": int(c), "n_sequences": int(n), "seed": int(s.seed), "text": "bundled",
                 "source": source}
                for name, c, n in (("importance_text", s.importance_context, s.importance_sequences),
                                   ("text", s.context, s.text_sequences),
                                   ("pattern_text", s.pattern_context, s.pattern_sequences))]
    out = []
    for name, p in (atlas_settings.get("probes") or {}).items():
        if isinstance(p, dict) and {"context", "n_sequences", "seed", "text", "text_sha256"} <= set(p):
            out.append({"probe": name, "context": int(p["context"]), "n_sequences": int(p["n_sequences"]),
                        "seed": int(p["seed"]), "text": p["text"], "source": source})
    return out


def text_windows(encoded: list[list[int]], *, context: int, n_sequences: int, seed: int,
                 prepend_bos: bool) -> list[tuple[int, int, int]] | None:
    """(document, start token, tokens) of each window probes.text.natural_text draws (its sampling, replayed;
    tests/test_compare.py holds them equal), or None when no document is long enough (it joins them)."""
    body = context - int(prepend_bos)
    docs = [i for i, e in enumerate(encoded) if len(e) >= body]
    if not docs:
        return None
    gen = torch.Generator().manual_seed(seed)
    weights = torch.tensor([len(encoded[i]) - body + 1 for i in docs], dtype=torch.float64)
    spans = []
    for _ in range(n_sequences):
        d = docs[int(torch.multinomial(weights, 1, generator=gen))]
        start = int(torch.randint(0, len(encoded[d]) - body + 1, (1,), generator=gen))
        spans.append((d, start, body))
    return spans


def _overlaps(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    return a[0] == b[0] and a[1] < b[1] + b[2] and b[1] < a[1] + a[2]


def held_out_text(tokenizer: Any, read: list[dict[str, Any]], settings: CompareSettings) -> tuple[torch.Tensor, dict]:
    """`heldout_windows` windows of `heldout_context` tokens of the bundled prose that overlap no window of the
    probes in `read` (profile_text_probes) nor each other: natural_text's sampling with `heldout_seed`,
    candidates that overlap skipped. Returns the ids [windows, context] and a record of every window."""
    from .probes.base import adds_bos
    from .probes.text import bundled_text_files, load_text

    docs = load_text(None)
    names = [p.name for p in bundled_text_files()]
    bos = adds_bos(tokenizer)
    encoded = [tokenizer(d, add_special_tokens=False).input_ids for d in docs]
    taken: list[tuple[int, int, int]] = []
    excluded = []
    merged: dict[tuple, dict[str, Any]] = {}  # one entry per probe setting, naming every source that read it
    for probe in read:
        key = tuple(probe[k] for k in ("probe", "context", "n_sequences", "seed", "text"))
        if key in merged:
            merged[key]["sources"].append(probe["source"])
        else:
            merged[key] = {**{k: v for k, v in probe.items() if k != "source"}, "sources": [probe["source"]]}
    for probe in merged.values():
        if probe["text"] != "bundled":  # the user's own text: no bundled window was read
            excluded.append({**probe, "windows": []})
            continue
        spans = text_windows(encoded, context=probe["context"], n_sequences=probe["n_sequences"],
                             seed=probe["seed"], prepend_bos=bos)
        if spans is None:
            raise HeadwiseError(f"probe {probe['probe']} ({probe['sources'][0]}) read {probe['context']}-token windows "
                                f"of the bundled documents joined end to end, so none of them is held out from it")
        taken += spans
        excluded.append({**probe, "windows": [{"document": names[d], "start_token": s, "tokens": n}
                                              for d, s, n in spans]})
    candidates = text_windows(encoded, context=settings.heldout_context, n_sequences=50 * settings.heldout_windows,
                              seed=settings.heldout_seed, prepend_bos=bos) or []
    chosen: list[tuple[int, int, int]] = []
    drawn = 0
    for span in candidates:
        drawn += 1
        if not any(_overlaps(span, t) for t in taken + chosen):
            chosen.append(span)
            if len(chosen) == settings.heldout_windows:
                break
    if len(chosen) < settings.heldout_windows:
        raise HeadwiseError(f"found only {len(chosen)} held-out windows of {settings.heldout_context} tokens apart "
                            f"from the profile's; lower --heldout-windows or --heldout-context")
    prefix = [tokenizer.bos_token_id] if bos else []
    ids = torch.tensor([prefix + encoded[d][s:s + n] for d, s, n in chosen], dtype=torch.long)
    record = {"source": "bundled prose (headwise/data/text)", "context": settings.heldout_context,
              "n_windows": settings.heldout_windows, "seed": settings.heldout_seed, "prepend_bos": bos,
              "how": f"natural_text's sampling with seed {settings.heldout_seed}; candidates overlapping a window a "
                     f"profile probe read, or an earlier held-out window, skipped ({drawn} drawn)",
              "windows": [{"document": names[d], "start_token": s, "tokens": n} for d, s, n in chosen],
              "not_overlapping": excluded}
    return ids, record


# ---- the measurements ----------------------------------------------------------------------------------
def perplexity(loaded: Any, ids: torch.Tensor, batch: int = 4) -> dict[str, Any]:
    """Next-token perplexity over every position of the windows [n, T] (one forward pass per batch)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, ids.shape[0], batch):
            x = ids[i:i + batch].to(loaded.device)
            logits = loaded.model(input_ids=x, use_cache=False).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             x[:, 1:].reshape(-1), reduction="sum"))
            count += x[:, 1:].numel()
    return {"perplexity": math.exp(total / count), "mean_nll": total / count, "tokens": count}


def in_context_loss(loaded: Any, settings: CompareSettings) -> float:
    from .validate.in_context import InContextLossTask

    task = InContextLossTask(block_len=settings.icl_block, n_sequences=settings.icl_sequences, seed=settings.icl_seed)
    g = loaded.geometry
    return task.evaluate(loaded, torch.ones(1, g.n_layers, g.n_heads)).values[0]


def task_scores(loaded: Any, tasks: list[Any], settings: CompareSettings) -> dict[str, Any]:
    from .tasks import task_accuracy

    out = {}
    for task in tasks:
        score = task_accuracy(loaded, task, shots=settings.shots, limit=settings.limit, seed=settings.task_seed)
        out[task.name] = {**score.record(), "digest": task.digest}
    return out


def passkey_depths(n: int) -> list[float]:
    """Evenly spread needle depths in [0.05, 0.95]."""
    return [0.5] if n == 1 else [round(0.05 + 0.9 * i / (n - 1), 4) for i in range(n)]


def passkey_cases(loaded: Any, settings: CompareSettings) -> list[tuple[dict[str, Any], Any]]:
    """The passkey prompts (the same for every model: they share the tokenizer), built before any is measured."""
    from .probes.needle import passkey_case

    cases = []
    for i, depth in enumerate(passkey_depths(settings.passkey_trials)):
        seed = settings.passkey_seed + i
        case = passkey_case(loaded.tokenizer, context=settings.passkey_context, depth=depth, seed=seed,
                            filler="repeat", max_positions=loaded.geometry.max_positions)
        cases.append(({"seed": seed, "depth": depth, "tokens": case.length, "answer": case.answer}, case))
    return cases


def passkey(loaded: Any, cases: list[tuple[dict[str, Any], Any]]) -> dict[str, Any]:
    """Greedy replies to the passkey prompts; a reply is right when it contains the key."""
    from .decode import greedy
    from .probes.needle import answer_found

    rows = []
    for meta, case in progress(cases, desc="passkey", unit="prompt"):
        reply = greedy(loaded, case.input_ids, PASSKEY_NEW_TOKENS, until="line").texts[0]
        rows.append({**meta, "reply": reply, "correct": answer_found(reply, case.answer)})
    correct = sum(r["correct"] for r in rows)
    return {"accuracy": correct / len(rows), "correct": correct, "n": len(rows), "cases": rows}


def parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(loaded: Any, heldout: torch.Tensor, tasks: list[Any], keys: list[tuple[dict[str, Any], Any]],
            settings: CompareSettings) -> dict[str, Any]:
    """Every quality metric and the parameter count of one model (keys: passkey_cases)."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"parameters": parameters(loaded.model), "perplexity": perplexity(loaded, heldout),
                           "in_context_loss": in_context_loss(loaded, settings)}
    if tasks:
        out["tasks"] = task_scores(loaded, tasks, settings)
        out["task_accuracy"] = statistics.fmean(t["accuracy"] for t in out["tasks"].values())
    if keys:
        out["passkey"] = passkey(loaded, keys)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# Ratios to the base: value / base value (for speed: tokens/s, so > 1 is faster).
RATIOS = {"parameters": lambda m: m["parameters"], "perplexity": lambda m: m["perplexity"]["perplexity"],
          "in_context_loss": lambda m: m["in_context_loss"], "task_accuracy": lambda m: m.get("task_accuracy"),
          "passkey_accuracy": lambda m: m["passkey"]["accuracy"] if "passkey" in m else None}


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None:
        return None
    return value / base if base else (1.0 if value == base else None)


def time_models(models: dict[str, Any], settings: CompareSettings,
                on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Prefill (speed_prompt random tokens, KV cache on) and speed_new_tokens greedy steps per model, in the
    order A B C A B C ...: one untimed round, then speed_repeats timed ones. Medians; ratios to the first
    model (the base) from the medians. on_round(result so far) after every timed round."""
    from .decode import greedy

    first = next(iter(models.values()))
    gen = torch.Generator().manual_seed(settings.speed_seed)
    prompt = torch.randint(0, first.geometry.vocab_size, (1, settings.speed_prompt), generator=gen)
    steps = settings.speed_new_tokens - 1  # the first new token comes out of the prefill
    times: dict[str, dict[str, list[float]]] = {n: {"prefill_s": [], "decode_s": []} for n in models}
    result: dict[str, Any] = {
        "prompt_tokens": settings.speed_prompt, "prompt": f"uniform random token ids, seed {settings.speed_seed}",
        "decode_steps": steps, "repeats": settings.speed_repeats, "rounds_done": 0,
        "order": "each round times every model once, in the order listed; one untimed round first",
        "threads": torch.get_num_threads(), "loadavg": {"start": _loadavg()}, "models": {}}

    def summarise() -> None:
        base, base_t = None, None
        for name, t in times.items():
            if not t["prefill_s"]:
                continue
            p, d = statistics.median(t["prefill_s"]), statistics.median(t["decode_s"])
            row = {"prefill_tok_s": settings.speed_prompt / p, "decode_tok_s": steps / d,
                   "prefill_s": [round(x, 4) for x in t["prefill_s"]], "decode_s": [round(x, 4) for x in t["decode_s"]]}
            base, base_t = (base, base_t) if base else (row, t)
            row["prefill_ratio"] = row["prefill_tok_s"] / base["prefill_tok_s"]
            row["decode_ratio"] = row["decode_tok_s"] / base["decode_tok_s"]
            # The same round's base time over this model's: what drifting load cannot skew between rounds.
            for what in ("prefill", "decode"):
                row[f"{what}_ratio_per_round"] = [round(b / x, 4) for b, x in zip(base_t[f"{what}_s"], t[f"{what}_s"])]
            result["models"][name] = row
        result["loadavg"]["end"] = _loadavg()

    rounds = progress(range(settings.speed_repeats + 1), desc="speed rounds", unit="round")
    for r in rounds:
        for name, loaded in models.items():
            out = greedy(loaded, prompt, settings.speed_new_tokens, until="budget")
            if r > 0:
                times[name]["prefill_s"].append(out.prefill_seconds)
                times[name]["decode_s"].append(out.decode_seconds)
        if r > 0:
            result["rounds_done"] = r
            summarise()
            if on_round is not None:
                on_round(result)
    return result


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---- the whole comparison ------------------------------------------------------------------------------
def compare(base: Any, pruned: Sequence[str | Path], settings: CompareSettings | None = None, *,
            model_spec: str | None = None, checkpoint: Callable[[dict[str, Any]], None] | None = None,
            command: Any = None) -> dict[str, Any]:
    """The base (a LoadedModel) and the model directories `pruned`, measured side by side (see the module
    docstring); a JSON-ready dict with "complete": true. checkpoint(result so far) runs after every model and
    every speed round ("complete": false), so that an interrupted run can keep them. `command`: what ran it
    (recorded as given)."""
    from .atlas import versions
    from .load import load

    settings = settings or CompareSettings()
    base.require("text", "headwise compare")
    settings.check(base.geometry)
    records = check_pruned_dirs(pruned)
    tasks = load_tasks(settings)
    t0 = time.perf_counter()
    read = profile_text_probes(None, "the default profile settings")
    for path, record in zip(pruned, records):
        if record is not None and record.get("atlas"):
            read += profile_text_probes(record["atlas"].get("settings") or {}, f"the atlas {Path(path).name} was "
                                                                                f"pruned by")
    heldout, heldout_record = held_out_text(base.tokenizer, read, settings)
    keys = passkey_cases(base, settings)
    names = _names(pruned)
    result: dict[str, Any] = {
        "schema": SCHEMA, "complete": False, "command": command, "base": {"spec": model_spec or base.info.spec,
                                                                           "model": base.info.to_dict()},
        "settings": {**asdict(settings), "passkey_new_tokens": PASSKEY_NEW_TOKENS,
                     "passkey_depths": passkey_depths(settings.passkey_trials),
                     "tasks_split": "test", "task_records": [t.record() for t in tasks]},
        "versions": versions(), "held_out_text": heldout_record,
        "models_done": 0, "models_total": 1 + len(pruned), "models": [], "speed": None}

    def save() -> None:
        result["seconds"] = round(time.perf_counter() - t0, 1)
        if checkpoint is not None:
            checkpoint(result)

    # Every model loaded and checked before any is measured: a wrong directory costs seconds, not a run.
    loaded_models = {BASE: base}
    for path, record in zip(pruned, records):
        _check_same_base(base, None, Path(path), record)
    for name, path, record in zip(names, pruned, records):
        # In the base's dtype: the comparison is of heads removed, not of precision.
        loaded_models[name] = load(str(path), dtype=base.dtype_name)
        _check_same_base(base, loaded_models[name], Path(path), record)
    work = [(BASE, None, None)] + [(n, Path(p), r) for n, p, r in zip(names, pruned, records)]
    for name, path, record in progress(work, desc="models", unit="model"):
        loaded = loaded_models[name]
        entry = {"name": name, "path": None if path is None else str(path),
                 "role": BASE if path is None else "pruned", "model": loaded.info.to_dict(),
                 "geometry": _geometry(loaded.geometry), **_summary(record, base, loaded),
                 "provenance": record, **measure(loaded, heldout, tasks, keys, settings)}
        first = result["models"][0] if result["models"] else entry
        entry["ratios"] = {k: _ratio(get(entry), get(first)) for k, get in RATIOS.items()}
        result["models"].append(entry)
        result["models_done"] += 1
        save()
    if settings.speed_repeats:
        def on_round(speed: dict[str, Any]) -> None:
            result["speed"] = speed
            for entry in result["models"]:
                row = speed["models"].get(entry["name"])
                if row is not None:
                    entry["ratios"].update(prefill_tok_s=row["prefill_ratio"], decode_tok_s=row["decode_ratio"])
            save()

        time_models(loaded_models, settings, on_round)
    result["complete"] = True
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _names(paths: Sequence[str | Path]) -> list[str]:
    """Each model's name in the result: its directory's name, or its path where two names are equal."""
    short = [Path(p).name for p in paths]
    return [s if short.count(s) == 1 and s != BASE else str(p) for s, p in zip(short, paths)]


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    try:
        _io.write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    except OSError as e:
        raise HeadwiseError(f"could not write the comparison to {path} ({e.strerror or e}); free some space or "
                            f"choose another --out") from None


# ---- the plot ------------------------------------------------------------------------------------------
PANELS = (("held-out perplexity", lambda m: m["perplexity"]["perplexity"], "log"),
          ("in-context loss (nats)", lambda m: m["in_context_loss"], "linear"),
          ("task accuracy (mean)", lambda m: m.get("task_accuracy"), "linear"),
          ("passkey accuracy", lambda m: m["passkey"]["accuracy"] if "passkey" in m else None, "linear"),
          ("parameters (M)", lambda m: m["parameters"] / 1e6, "linear"),
          ("prefill tok/s ratio to base", lambda m: m["ratios"].get("prefill_tok_s"), "linear"),
          ("decode tok/s ratio to base", lambda m: m["ratios"].get("decode_tok_s"), "linear"))


def plot(result: dict[str, Any], path: str | Path) -> Path | None:
    """Each metric against the share of heads removed: one line per criterion from the base (x = 0), random
    draws as points with their mean as the line. None (and a note) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    models = result["models"]
    if not models:
        return None
    base = models[0]
    groups: dict[str, list[dict[str, Any]]] = {}
    for m in models[1:]:
        groups.setdefault(m["criterion"] or m["name"], []).append(m)
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, get, scale) in zip(axes.flat, PANELS):
        b = get(base)
        for i, (criterion, ms) in enumerate(sorted(groups.items())):
            colour = colours[i % len(colours)]
            by_x: dict[float, list[float]] = {}
            for m in ms:
                v = get(m)
                if v is not None:
                    by_x.setdefault(m["heads_removed_share"], []).append(v)
            if not by_x:
                continue
            xs = sorted(by_x)
            means = [statistics.fmean(by_x[x]) for x in xs]
            several = any(len(v) > 1 for v in by_x.values())
            label = f"{criterion} ({max(len(v) for v in by_x.values())} draws, mean)" if several else criterion
            ax.plot(([0.0] if b is not None else []) + xs, ([b] if b is not None else []) + means, marker="o",
                    color=colour, label=label)
            if several:
                for x in xs:
                    ax.scatter([x] * len(by_x[x]), by_x[x], color=colour, marker="x", s=22, alpha=0.7)
        if b is not None:
            ax.scatter([0.0], [b], color="black", zorder=3, label="unpruned")
        ax.set_yscale(scale)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("share of query heads removed", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].axis("off")
    axes.flat[-1].legend(handles, labels, fontsize=8, loc="center")
    speed = result.get("speed") or {}
    fig.suptitle(f"{result['base']['spec']}: pruned vs unpruned (speed: {speed.get('rounds_done', 0)} interleaved "
                 f"rounds, {speed.get('threads', '?')} thread(s))", fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.08, top=0.91, wspace=0.28, hspace=0.38)  # tight_layout: 2 s
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, metadata={"Software": None})  # no timestamps
    plt.close(fig)
    _io.write_bytes_atomic(path, png.getvalue())
    return Path(path)


__all__ = ["BASE", "DEFAULT_TASKS", "SCHEMA", "CompareSettings", "check_pruned_dirs", "compare", "held_out_text",
           "in_context_loss", "load_tasks", "passkey", "passkey_cases", "perplexity", "plot", "profile_text_probes",
           "read_provenance", "text_windows", "time_models", "write_result"]
