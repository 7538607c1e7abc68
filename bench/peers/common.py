"""What every peer benchmark shares with headwise: the same weights and the same prompts.

Runs in headwise's venv (.venv). Two commands:

    python bench/peers/common.py model   [--model smollm2-135m] [--out bench/peers/models/smollm2-135m]
    python bench/peers/common.py prompts --task passkey --contexts 1024 --depths 0.5 --trials 2 --seed 0 \
        [--out bench/peers/models/prompts/passkey-1024.jsonl]

`model` saves the model headwise loads (de-quantized from its GGUF by headwise.load) as a plain
Hugging Face safetensors directory, with `headwise-export.json` beside it: headwise's own model
record (the GGUF's hash) and `tensors_sha256`, a hash of every tensor as loaded (the formula of
headwise.load.weights_sha256). A peer recomputes that hash from what it loaded, so a result file
proves which weights produced it.

`prompts` writes one JSON line per prompt, built by headwise's own probes with the loop and seeds
of `headwise eval` (seed = --seed + trial, every depth per trial), so a peer answers exactly the
token ids headwise's policies answered. Each line splits the prompt into the context (what a
peer compresses) and the question (appended after compression): `question_start` is where the
question begins.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent
MODELS = ROOT / "models"


def _versions() -> dict[str, str]:
    from headwise.atlas import versions

    return versions()


def export_model(spec: str, out: Path) -> dict:
    """Save headwise's model `spec` to `out` (safetensors + tokenizer) and return the record written beside it."""
    import headwise
    from headwise.load import file_sha256, weights_sha256

    loaded = headwise.load(spec)
    model, tok = loaded.model, loaded.tokenizer
    out.mkdir(parents=True, exist_ok=True)
    # headwise routes attention through its own registered function; a peer must load with a stock one.
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    record = {
        "model_spec": spec,
        "headwise_model": loaded.info.to_dict(),
        "geometry": loaded.geometry.to_dict(),
        "tensors_sha256": weights_sha256(model),
        "tensors_sha256_formula": "sha256 over sorted(state_dict): name bytes, then the tensor's raw bytes",
        "files_sha256": {p.name: file_sha256(p) for p in sorted(out.glob("*.safetensors"))},
        "versions": _versions(),
    }
    (out / "headwise-export.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _passkey_rows(tok, contexts, depths, trials, seed, max_positions):
    from headwise.probes.needle import passkey_case

    for context in contexts:
        for trial in range(trials):
            s = seed + trial
            for depth in depths:
                case = passkey_case(tok, context=context, depth=depth, seed=s, filler="repeat",
                                    max_positions=max_positions)
                ids = case.input_ids[0].tolist()
                # passkey_case is plain (chat=False): the prompt ends "\n\n" + question + answer prefix,
                # tokenized on its own (build_case encodes that piece separately).
                frame = f"\n\n{case.needles[case.target].question}{case.settings['answer_prefix']}"
                question = tok(frame, add_special_tokens=False).input_ids
                start = len(ids) - len(question)
                if ids[start:] != question:
                    raise SystemExit(f"passkey prompt (context {context}, seed {s}) does not end in the question "
                                     f"frame; headwise's passkey prompt changed: update bench/peers/common.py")
                needle_start, needle_end = case.needle_spans[case.target]
                yield {"id": f"passkey-{context}-d{depth:g}-s{s}", "task": "passkey", "context": context,
                       "depth": depth, "seed": s, "trial": trial, "input_ids": ids, "question_start": start,
                       "needle_span": [needle_start, needle_end], "answers": [case.answer],
                       "max_new_tokens": case.reply_budget, "until": "line", "text": tok.decode(ids)}


def _ruler_rows(tok, task, contexts, trials, seed, max_positions):
    try:
        from headwise.probes.ruler import ruler_case
    except ImportError:
        raise SystemExit("headwise.probes.ruler is not in this checkout; only --task passkey works") from None
    for context in contexts:
        for trial in range(trials):
            s = seed + trial
            case = ruler_case(tok, task, context=context, seed=s, max_positions=max_positions)
            ids = case.input_ids[0].tolist()
            yield {"id": f"ruler-{task}-{context}-s{s}", "task": f"ruler:{task}", "context": context, "seed": s,
                   "trial": trial, "input_ids": ids, "question_start": ruler_question_start(tok, case, ids),
                   "answers": list(case.answers), "max_new_tokens": int(case.max_new_tokens), "until": case.until,
                   "text": case.text}


def ruler_question_start(tok, case, ids: list[int]) -> int:
    """Where a RULER prompt's question begins: the last line of the prompt's text that starts as the line after
    {context} in its template does ("\nWhat " or "\nQuestion: "); the token index is the longest run
    of ids that the text before it tokenizes to (a token merged across the boundary stays in the question)."""
    from headwise.probes import ruler

    template = {"vt": ruler.VT_TEMPLATE, "cwe": ruler.CWE_TEMPLATE, "fwe": ruler.FWE_TEMPLATE}.get(
        case.task, ruler.NIAH_TEMPLATE)
    # Only the line's first word: the NIAH template's question is reworded for one key ("What is ...").
    marker = template.split("{context}", 1)[1].split(" ", 1)[0] + " "
    cut = case.text.rfind(marker)
    if cut < 0:
        raise SystemExit(f"the {case.task} prompt does not hold its question line {marker!r}; update common.py")
    lead = len(ids) - len(tok(case.text, add_special_tokens=False).input_ids)  # BOS of the plain framing
    before = ids[:lead] + tok(case.text[:cut], add_special_tokens=False).input_ids
    start = 0
    while start < min(len(before), len(ids)) and before[start] == ids[start]:
        start += 1
    return start


def write_prompts(args: argparse.Namespace) -> Path:
    import headwise

    contexts = [int(x) for x in args.contexts.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    loaded = headwise.load(args.model)
    tok = loaded.tokenizer
    if args.task == "passkey":
        rows = list(_passkey_rows(tok, contexts, depths, args.trials, args.seed, loaded.geometry.max_positions))
    elif args.task.startswith("ruler:"):
        from headwise.probes.ruler import RULER_TASKS

        tasks = args.task.split(":", 1)[1]
        rows = [r for task in (RULER_TASKS if tasks == "all" else tasks.split("+"))
                for r in _ruler_rows(tok, task, contexts, args.trials, args.seed, loaded.geometry.max_positions)]
    else:
        raise SystemExit(f"unknown --task {args.task}; use passkey or ruler:TASK")
    out = Path(args.out) if args.out else (
        MODELS / "prompts" / f"{args.task.replace(':', '-')}-{'_'.join(map(str, contexts))}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"kind": "headwise-peer-prompts", "model": loaded.info.to_dict(), "task": args.task,
              "contexts": contexts, "depths": depths, "trials": args.trials, "seed": args.seed,
              "versions": _versions()}
    tmp = out.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in [{"header": header}, *rows]))
    os.replace(tmp, out)
    return out


def score(path: Path) -> dict:
    """Score a peer's result file's replies with headwise's own scorers (answer_found for the passkey,
    ruler_score for RULER) into `headwise_score`, and say where the peer's own score disagrees."""
    from headwise.probes.needle import answer_found

    result = json.loads(path.read_text())
    disagree = 0
    for row in result["rows"]:
        if "reply" not in row:
            continue
        if row["task"] == "passkey":
            value = float(any(answer_found(row["reply"], a) for a in row["answers"]))
        else:
            from headwise.probes.ruler import ruler_score

            value = ruler_score(row["reply"], row["answers"])
        row["headwise_score"] = value
        own = row.get("score", None if row.get("correct") is None else float(row["correct"]))
        disagree += own is not None and abs(own - value) > 1e-12
    result["headwise_scored"] = {"rows": sum("headwise_score" in r for r in result["rows"]),
                                 "disagreeing_with_peer": int(disagree), "versions": _versions()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    return result["headwise_scored"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("model", help="export headwise's model as a Hugging Face safetensors directory")
    m.add_argument("--model", default="smollm2-135m")
    m.add_argument("--out", default=None, help="default: bench/peers/models/MODEL")
    q = sub.add_parser("prompts", help="write prompts (token ids, answers, question start) to JSONL")
    q.add_argument("--model", default="smollm2-135m")
    q.add_argument("--task", default="passkey",
                   help="passkey, ruler:TASK[+TASK...] or ruler:all (headwise.probes.ruler's tasks)")
    q.add_argument("--contexts", default="1024")
    q.add_argument("--depths", default="0.1,0.5,0.9", help="passkey depths (as headwise eval --depths)")
    q.add_argument("--trials", type=int, default=1, help="seeds per depth: --seed, --seed + 1, ...")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default=None)
    r = sub.add_parser("score", help="score a peer result file's replies with headwise's own scorers")
    r.add_argument("result")
    args = p.parse_args(argv)
    if args.command == "score":
        print(f"scored {args.result}: {score(Path(args.result))}")
    elif args.command == "model":
        out = Path(args.out) if args.out else MODELS / args.model
        record = export_model(args.model, out)
        print(f"exported {args.model} to {out}; tensors_sha256 {record['tensors_sha256']}")
    else:
        print(f"prompts written to {write_prompts(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
