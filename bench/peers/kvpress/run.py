"""kvpress's presses on headwise's prompts and weights: accuracy, time and peak RSS.

Runs in bench/peers/kvpress/.venv (made by setup.sh); never imports headwise.

    bench/peers/kvpress/.venv/bin/python bench/peers/kvpress/run.py \
        --prompts bench/peers/models/prompts/passkey-1024.jsonl --budgets 0.3333,0.5 \
        --duo-pattern bench/peers/models/duo-smollm2-duo4k --out bench/results/kvpress_passkey.json

For every press, budget and context one child process loads the model and answers every prompt
of that context; the parent reads the child's own peak RSS (os.wait4's ru_maxrss), so a press's
memory is its own. A budget is the share of the context's KV cache kept (1/3 -> kvpress's
compression_ratio 0.667). Each prompt is decoded the way kvpress's pipeline does it
(KVPressTextGenerationPipeline._forward / generate_answer, kvpress 0.5.5): the context
(`input_ids[:question_start]`) is prefilled inside `with press(model)` and compressed there, then
the question is fed at its original positions and the reply decoded greedily from the compressed
cache. The loop is copied rather than called so its parts can be timed, and it stops where
headwise's decode.greedy stops for that prompt (the prompt's `until`: end of sequence or the budget,
and for the passkey also a newline after visible text), so replies and decode times compare with
`headwise eval`'s. `--compress prompt` instead compresses all of the prompt but its last token,
question included, and feeds that token after compression. `--compress whole` prefills the whole
prompt inside the press and takes the first reply token from that prefill, as headwise's
whole-prompt policies and its SnapKV do (the last prompt token's keys and values, and the first
reply token, then come from the uncompressed prefill). `--snapkv-window`/`--snapkv-kernel` change
SnapKVPress's window and pooling kernel (kvpress's defaults 64 and 5; headwise's SnapKV uses 32 and 7).

Scores, reimplemented here from headwise (this venv cannot import it): a passkey reply scores 1
when it contains the key (probes.needle.answer_found); a RULER reply scores the share of its
answers it contains, case-insensitive (probes.ruler.ruler_score). `bench/peers/common.py score
FILE` rescores every reply with headwise's own functions and counts disagreements.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE.parent
PRESSES = ("none", "streaming_llm", "snapkv", "knorm", "adakv_snapkv", "duo")

# What kvpress 0.5.5 does to the cache, read from its code (attention_patch.py, adakv_press.py,
# duo_attention_press.py, scorer_press.py): the scorer presses gather the kept tokens into smaller
# tensors; AdaKV and DuoAttention keep every token and, at decode time, overwrite the dropped keys
# with a fake key whose attention weight is exp(-large) = 0 ("this solution is not optimal as it
# does not reduce peak memory and slightly increases runtime").
MEMORY = {
    "none": "full cache",
    "streaming_llm": "really smaller: keeps 4 sinks + the most recent tokens, gathered into new tensors",
    "snapkv": "really smaller: keeps the top-scored tokens per KV head (window 64, pool kernel 5), gathered",
    "knorm": "really smaller: keeps the tokens with the smallest key norms per KV head, gathered",
    "adakv_snapkv": "masked, saves no memory: every token stays stored; the pruned ones get a fake key at decode",
    "duo": "masked, saves no memory: streaming heads keep every token stored; the middle ones get a fake key "
           "at decode",
}


def normalize(text: str) -> str:
    """headwise.probes.needle.normalize: lower case, punctuation but '-' dropped, spaces collapsed."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation.replace("-", "")))
    return re.sub(r"\s+", " ", text).strip()


def passkey_correct(reply: str, answers: list[str]) -> bool:
    return any(normalize(a) in normalize(reply) for a in answers)


def ruler_score(reply: str, answers: list[str]) -> float:
    """headwise.probes.ruler.ruler_score (RULER's string_match_all for one reply): the share of the answers
    found in the reply, case-insensitive."""
    reply = reply.lower()
    return sum(a.lower() in reply for a in answers) / len(answers)


def score(task: str, reply: str, answers: list[str]) -> float:
    return float(passkey_correct(reply, answers)) if task == "passkey" else ruler_score(reply, answers)


def tensors_sha256(model) -> str:
    """headwise.load.weights_sha256's formula, so the hash matches the export's record."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        # The array itself, not a bytes copy: hashing must not raise the peak RSS this process reports.
        digest.update(tensor.detach().to("cpu").contiguous().view(__import__("torch").uint8).numpy().data)
    return digest.hexdigest()


def read_prompts(path: Path) -> tuple[dict, list[dict]]:
    header, rows = {}, []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "header" in record:
                header = record["header"]
            else:
                rows.append(record)
    return header, rows


def load_duo_pattern(directory: Path):
    """A DuoAttention pattern directory read exactly as kvpress's DuoAttentionPress.load_attention_pattern
    reads the hub's (np.loadtxt of the TSV, clipped to [0, 1]; sink_size and recent_size from config.json)."""
    from io import StringIO

    import numpy as np

    config = json.loads((directory / "config.json").read_text())
    text = (directory / "full_attention_heads.tsv").read_text()
    head_scores = np.clip(np.loadtxt(StringIO(text), dtype=float, delimiter="\t"), 0, 1)
    return config["sink_size"], config["recent_size"], head_scores


def _no_network(*args, **kwargs):
    raise RuntimeError("DuoAttentionPress tried the network: the pattern must come from the local directory")


def install_duo_pattern(model, directory: Path) -> tuple[int, int]:
    """Hand kvpress's DuoAttentionPress a local pattern, no network: its loader is a staticmethod memoised
    by cachetools in the module-level LRUCache `cache` under the key model.config.name_or_path, so an entry
    under that key is returned without the requests.get to GitHub that would otherwise run."""
    from kvpress.presses import duo_attention_press

    sink, recent, scores = load_duo_pattern(directory)
    n_layers, n_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    if scores.shape != (n_layers, n_kv):
        raise SystemExit(f"{directory} holds a {scores.shape} pattern; the model has {n_layers} x {n_kv} KV heads")
    duo_attention_press.requests.get = _no_network
    duo_attention_press.cache[model.config.name_or_path] = (sink, recent, scores)
    return sink, recent


def make_press(name: str, budget: float, context: int, duo: tuple[int, int] | None, window: int = 64,
               kernel: int = 5):
    """(press, what it was built with); None when the budget cannot be reached by this press."""
    from kvpress import AdaKVPress, DuoAttentionPress, KnormPress, SnapKVPress, StreamingLLMPress

    ratio = 1.0 - budget
    if name == "none":
        return None, {}
    if name == "streaming_llm":
        return StreamingLLMPress(compression_ratio=ratio), {"compression_ratio": ratio, "n_sink": 4}
    snap = {"window_size": window, "kernel_size": kernel}
    if name == "snapkv":
        return SnapKVPress(compression_ratio=ratio, **snap), {"compression_ratio": ratio, **snap}
    if name == "knorm":
        return KnormPress(compression_ratio=ratio), {"compression_ratio": ratio}
    if name == "adakv_snapkv":
        return AdaKVPress(SnapKVPress(compression_ratio=ratio, **snap)), {"compression_ratio": ratio,
                                                                          "alpha_safeguard": 0.2, **snap}
    if name == "duo":
        sink, recent = duo
        # A streaming head keeps sink + recent of the context: the share of heads made streaming that
        # leaves `budget` of the context's cache is (1 - budget) / (1 - (sink + recent) / context).
        head_ratio = ratio / (1.0 - (sink + recent) / context) if context > sink + recent else float("inf")
        if head_ratio > 1.0:
            return "unreachable", {"why": f"even all-streaming heads keep ({sink}+{recent})/{context} of the cache"}
        return DuoAttentionPress(head_compression_ratio=head_ratio), {"head_compression_ratio": head_ratio,
                                                                       "sink_size": sink, "recent_size": recent}
    raise SystemExit(f"unknown press {name}; choose from {', '.join(PRESSES)}")


def _stops(tokenizer, model) -> set[int]:
    ids = set()
    for source in (tokenizer.eos_token_id, model.generation_config.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


def answer(model, tokenizer, press, ids: list[int], question_start: int, max_new_tokens: int,
           until: str = "line") -> dict:
    """One prompt as kvpress's pipeline runs it (see the module docstring), timed in three parts (wall and
    this process's CPU seconds: on a shared machine the CPU time is the steadier of the two).
    until="line" also ends the reply at a newline after visible text (headwise's rule for a question);
    "eos" only at the end of sequence or the budget (RULER's). question_start == len(ids): the whole prompt is
    prefilled inside the press and the first reply token comes from that prefill (no question step)."""
    import torch
    from transformers import DynamicCache

    whole = question_start >= len(ids)
    context = torch.tensor([ids[:question_start]])
    question = torch.tensor([ids[question_start:]])
    cache = DynamicCache()
    with torch.inference_mode():
        t0, c0 = time.perf_counter(), time.process_time()
        with press(model) if press is not None else _null():
            if whole:
                out = model(input_ids=context, past_key_values=cache, logits_to_keep=1)
            else:
                model.model(input_ids=context, past_key_values=cache)
        t1, c1 = time.perf_counter(), time.process_time()
        layers = model.model.layers
        stored = sum(int(cache.layers[i].keys.shape[2]) * int(cache.layers[i].keys.shape[1])
                     for i in range(len(cache.layers)))
        masked = sum(len(idx[2]) for idx in (getattr(layer.self_attn, "masked_key_indices", None) for layer in layers)
                     if idx is not None)
        n = context.shape[1]
        if not whole:
            position_ids = torch.arange(n, n + question.shape[1]).unsqueeze(0)
            out = model(input_ids=question, past_key_values=cache, position_ids=position_ids, logits_to_keep=1)
        t2, c2 = time.perf_counter(), time.process_time()
        position = torch.tensor([[len(ids)]])
        stops, reply = _stops(tokenizer, model), []
        token = int(out.logits[0, -1].argmax())
        while token not in stops:
            reply.append(token)
            text = tokenizer.decode(reply, skip_special_tokens=True)
            if len(reply) >= max_new_tokens or (until == "line" and "\n" in text.lstrip()):
                break
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, position_ids=position)
            position = position + 1
            token = int(out.logits[0, -1].argmax())
        t3, c3 = time.perf_counter(), time.process_time()
    head_dim = cache.layers[0].keys.shape[3]
    full = n * model.config.num_hidden_layers * model.config.num_key_value_heads
    return {"reply": tokenizer.decode(reply, skip_special_tokens=True).strip(), "new_tokens": len(reply),
            "prefill_s": t1 - t0, "question_s": t2 - t1, "decode_s": t3 - t2,
            "prefill_cpu_s": c1 - c0, "question_cpu_s": c2 - c1, "decode_cpu_s": c3 - c2,
            "kv_tokens_full": full, "kv_tokens_stored": stored, "kv_tokens_masked": masked,
            "kv_share_stored": stored / full, "kv_share_effective": (stored - masked) / full,
            "kv_bytes_stored": stored * 2 * head_dim * cache.layers[0].keys.element_size(),
            "kvpress_compression_ratio": _ratio(press)}


def _ratio(press) -> float | None:
    """The compression ratio kvpress reports (DuoAttentionPress: what its mask achieved on this prompt)."""
    try:
        return None if press is None else float(press.compression_ratio)
    except (AssertionError, AttributeError, TypeError):
        return None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def child(spec: dict) -> None:
    """One press at one budget on one context's prompts, in this process alone; rows go to spec['out']."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa",
                                                 local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], local_files_only=True)
    import kvpress  # noqa: F401  (patches transformers' attention functions for the masking presses)

    # The weights are memory-mapped: hashing reads every page in, so the RSS after it is the baseline
    # (imports + all weights) that a press's peak adds its KV cache and activations to.
    sha = tensors_sha256(model)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    duo = install_duo_pattern(model, Path(spec["duo_pattern"])) if spec["press"] == "duo" else None
    _, prompts = read_prompts(Path(spec["prompts"]))
    rows = []
    for p in prompts:
        if p["context"] != spec["context"]:
            continue
        # "context": kvpress's pipeline, the question after compression; "prompt": compress everything but the
        # prompt's last token, question included, then feed that token; "whole": compress the whole prompt and
        # answer from its prefill (headwise's whole-prompt policies and SnapKV).
        split = {"context": p["question_start"], "prompt": len(p["input_ids"]) - 1,
                 "whole": len(p["input_ids"])}[spec["compress"]]
        press, args = make_press(spec["press"], spec["budget"], split, duo, spec.get("snapkv_window", 64),
                                 spec.get("snapkv_kernel", 5))
        row = {"id": p["id"], "task": p["task"], "context": p["context"], "press": spec["press"],
               "budget": spec["budget"], "press_args": args, "answers": p["answers"], "compressed_tokens": split}
        if press == "unreachable":
            rows.append({**row, "skipped": args["why"]})
            continue
        row.update(answer(model, tokenizer, press, p["input_ids"], split, p["max_new_tokens"],
                          p.get("until", "line")))
        row["score"] = score(p["task"], row["reply"], p["answers"])
        row["correct"] = row["score"] == 1.0
        rows.append(row)
        print(f"  {spec['press']}@{spec['budget']:g} {p['id']}: score {row['score']:.2f} "
              f"prefill {row['prefill_s']:.1f}s decode {row['decode_s']:.1f}s ({row['new_tokens']} tok) "
              f"{row['reply'][:50]!r}", flush=True)
    Path(spec["out"]).write_text(json.dumps({"rows": rows, "rss_baseline_bytes": rss_loaded,
                                             "tensors_sha256": sha,
                                             "name_or_path": model.config.name_or_path}))


def _versions() -> dict[str, str]:
    import platform
    from importlib.metadata import version

    return {"python": platform.python_version(),
            **{p: version(p) for p in ("kvpress", "transformers", "torch", "numpy")}}


def run_group(spec: dict) -> dict:
    """Run child(spec) in a subprocess; its rows plus its own peak RSS (ru_maxrss of that child alone)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "out": str(Path(tmp) / "rows.json")}
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"the {spec['press']}@{spec['budget']:g} run on {spec['context']} tokens failed "
                             f"(exit {proc.returncode}); its error is above")
        result = json.loads(Path(spec["out"]).read_text())
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports KiB
    result["wall_s"] = time.perf_counter() - t0
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    # Other processes on the machine slow wall times: the 1-minute load average before and after says how much.
    result["loadavg_1min"] = [load0, os.getloadavg()[0]]
    return result


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        if r.get("skipped") or r.get("score") is None:
            continue
        cell = out.setdefault(r["task"], {}).setdefault(str(r["context"]), {}).setdefault(
            f"{r['press']}@{r['budget']:g}", {"correct": 0, "n": 0, "mean_score": 0.0, "kv_share_stored": [],
                                              "kv_share_effective": []})
        cell["mean_score"] = (cell["mean_score"] * cell["n"] + r["score"]) / (cell["n"] + 1)
        cell["correct"] += int(r["correct"])
        cell["n"] += 1
        cell["kv_share_stored"].append(round(r["kv_share_stored"], 4))
        cell["kv_share_effective"].append(round(r["kv_share_effective"], 4))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="kvpress presses on headwise's prompts (see the module docstring)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=str(PEERS / "models" / "smollm2-135m"))
    p.add_argument("--prompts", default=str(PEERS / "models" / "prompts" / "passkey-1024.jsonl"),
                   help="JSONL from bench/peers/common.py prompts; comma-separate several files")
    p.add_argument("--presses", default=",".join(PRESSES))
    p.add_argument("--budgets", default="0.3333", help="shares of the context's KV cache kept, e.g. 0.3333,0.5")
    p.add_argument("--duo-pattern", default=str(PEERS / "models" / "duo-smollm2-duo4k"),
                   help="a DuoAttention pattern directory (headwise export-duo) for the duo press")
    p.add_argument("--compress", choices=("context", "prompt", "whole"), default="context",
                   help="context: compress the context, then feed the question (kvpress's pipeline); prompt: "
                        "compress all of the prompt but its last token, question included; whole: compress the "
                        "whole prompt and answer from its prefill (headwise's regime)")
    p.add_argument("--snapkv-window", type=int, default=64, help="SnapKVPress window_size (kvpress's default 64)")
    p.add_argument("--snapkv-kernel", type=int, default=5, help="SnapKVPress kernel_size (kvpress's default 5)")
    p.add_argument("--out", default="bench/results/kvpress_passkey.json")
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    presses = [s.strip() for s in args.presses.split(",") if s.strip()]
    for name in presses:
        if name not in PRESSES:
            raise SystemExit(f"unknown press {name}; choose from {', '.join(PRESSES)}")
    budgets = [float(b) for b in args.budgets.split(",")]
    if not all(0 < b < 1 for b in budgets):
        raise SystemExit("--budgets are shares of the cache kept, each in (0, 1)")
    if "duo" in presses and not (Path(args.duo_pattern) / "full_attention_heads.tsv").is_file():
        raise SystemExit(f"{args.duo_pattern} is no DuoAttention pattern; make one with headwise export-duo")
    export = json.loads((Path(args.model) / "headwise-export.json").read_text())
    prompt_files = [Path(f) for f in args.prompts.split(",")]
    result = {"kind": "headwise-peer-kvpress", "complete": False, "versions": _versions(),
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "settings": {"presses": presses, "budgets": budgets, "threads": 1, "model": args.model,
                           "compress": args.compress, "snapkv_window": args.snapkv_window,
                           "snapkv_kernel": args.snapkv_kernel,
                           "duo_pattern": args.duo_pattern if "duo" in presses else None,
                           "prompts": [{"path": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
                                        "header": read_prompts(f)[0]} for f in prompt_files]},
              "model": {"export": export, "tensors_sha256_seen": None, "same_weights": None},
              "memory": MEMORY, "groups": [], "rows": []}
    if "duo" in presses:
        pattern = Path(args.duo_pattern)
        result["settings"]["duo_pattern_files"] = {
            f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(pattern.iterdir()) if f.is_file()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for f in prompt_files:
        contexts = sorted({r["context"] for r in read_prompts(f)[1]})
        for context in contexts:
            for name in presses:
                for budget in ([1.0] if name == "none" else budgets):
                    spec = {"model": args.model, "prompts": str(f), "press": name, "budget": budget,
                            "context": context, "duo_pattern": args.duo_pattern, "compress": args.compress,
                            "snapkv_window": args.snapkv_window, "snapkv_kernel": args.snapkv_kernel}
                    print(f"{name}@{budget:g} on {context} tokens ({f.name})", flush=True)
                    group = run_group(spec)
                    seen = group["tensors_sha256"]
                    result["model"]["tensors_sha256_seen"] = seen
                    same = seen == export["tensors_sha256"]
                    result["model"]["same_weights"] = same if result["model"]["same_weights"] is None else (
                        result["model"]["same_weights"] and same)
                    result["groups"].append({"press": name, "budget": budget, "context": context,
                                             "prompts": f.name, "peak_rss_bytes": group["peak_rss_bytes"],
                                             "rss_baseline_bytes": group["rss_baseline_bytes"],
                                             "wall_s": group["wall_s"], "cpu_s": group["cpu_s"],
                                             "loadavg_1min": group["loadavg_1min"], "n_rows": len(group["rows"])})
                    result["rows"].extend(group["rows"])
                    result["summary"] = summarize(result["rows"])
                    out.write_text(json.dumps(result, indent=1) + "\n")
    result["complete"] = True
    out.write_text(json.dumps(result, indent=1) + "\n")
    for task, by_ctx in result["summary"].items():
        for ctx, cells in by_ctx.items():
            print(f"{task} @ {ctx}: " + "  ".join(f"{k}: {c['correct']}/{c['n']} (mean {c['mean_score']:.2f})"
                                                  for k, c in cells.items()))
    print(f"same weights as headwise's export: {result['model']['same_weights']}; results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
