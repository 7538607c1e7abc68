"""Small in-context tasks (antonyms, capitals, ...): the prompts steering learns from and is scored on.

A task is a list of {"prompt", "target"} pairs split once into train and test. The bundled tasks
(data/tasks/NAME.jsonl) carry their split in each line ("split": "train" | "test"); a user's JSONL
without one is split by a hash of the prompt (a fixed 30% held out), so the split never depends
on a seed or on the order of the file.

Prompts follow the function-vector literature (Todd et al. 2024), which the steering papers
evaluate with: "Q: {prompt}\\nA: {target}" examples separated by a blank line, the query last
("Q: {prompt}\\nA:"). A reply is right when its first line, stripped of spaces and a final
full stop, equals the target exactly (case included: "lower to upper" is about case).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._jsonl import json_lines
from ._progress import progress
from .decode import greedy
from .errors import HeadwiseError
from .instrument import HeadEdits

TEST_SHARE = 0.3
MAX_PAIRS = 100_000
MAX_FIELD_CHARS = 2000


@dataclass(frozen=True)
class Pair:
    prompt: str
    target: str


@dataclass(frozen=True)
class Task:
    name: str
    train: tuple[Pair, ...]
    test: tuple[Pair, ...]
    source: str  # "bundled" or the file's path
    digest: str  # sha256 of the pairs and their split: what a result was measured on

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "digest": self.digest, "train": len(self.train),
                "test": len(self.test)}


def bundled_tasks() -> tuple[str, ...]:
    folder = files("headwise") / "data" / "tasks"
    return tuple(sorted(p.name[:-len(".jsonl")] for p in folder.iterdir() if p.name.endswith(".jsonl")))


def _held_out(prompt: str) -> bool:
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < TEST_SHARE


def load_task(spec: str) -> Task:
    """A bundled task by name, or a JSONL file of {"prompt", "target"[, "split"]} lines."""
    bundled = bundled_tasks()
    if spec in bundled:
        path, source = Path(str(files("headwise") / "data" / "tasks" / f"{spec}.jsonl")), "bundled"
    else:
        path, source = Path(spec), str(Path(spec).resolve())
        if not path.suffix == ".jsonl" and not path.exists():
            raise HeadwiseError(f"unknown task '{spec}'; choose a bundled task ({', '.join(bundled)}) or pass a "
                                f".jsonl file of {{\"prompt\", \"target\"}} lines")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HeadwiseError(f"cannot read task file {path} ({getattr(e, 'strerror', None) or e}); pass a UTF-8 "
                            f".jsonl file") from None
    expected = 'one {"prompt": ..., "target": ...} object per line'
    train: list[Pair] = []
    test: list[Pair] = []
    seen: set[str] = set()
    for number, value in json_lines(path, raw, expected):
        if not isinstance(value, dict) or not all(isinstance(value.get(k), str) for k in ("prompt", "target")):
            raise HeadwiseError(f"{path} line {number}: write {expected}")
        prompt, target = value["prompt"].strip(), value["target"].strip()
        if not prompt or not target or "\n" in prompt or "\n" in target:
            raise HeadwiseError(f"{path} line {number}: prompt and target must be non-empty single lines")
        if len(prompt) > MAX_FIELD_CHARS or len(target) > MAX_FIELD_CHARS:
            raise HeadwiseError(f"{path} line {number}: a prompt or target over {MAX_FIELD_CHARS} characters; these "
                                f"are short in-context tasks")
        if prompt in seen:
            raise HeadwiseError(f"{path} line {number}: prompt '{prompt[:40]}' appears twice; keep one target per "
                                f"prompt")
        seen.add(prompt)
        split = value.get("split")
        if split not in (None, "train", "test"):
            raise HeadwiseError(f"{path} line {number}: split must be \"train\" or \"test\", got {split!r}")
        held_out = split == "test" if split is not None else _held_out(prompt)
        (test if held_out else train).append(Pair(prompt, target))
        if len(seen) > MAX_PAIRS:
            raise HeadwiseError(f"{path} holds more than {MAX_PAIRS} pairs; pass a smaller task")
    if len(train) < 11 or len(test) < 1:
        raise HeadwiseError(f"{path} has {len(train)} training and {len(test)} test pairs; a task needs at least 11 "
                            f"training pairs (10 shots plus the query) and 1 test pair")
    name = spec if source == "bundled" else path.stem
    h = hashlib.sha256()
    for tag, pairs in (("train", train), ("test", test)):
        for p in pairs:
            h.update(f"{tag}\t{p.prompt}\t{p.target}\n".encode())
    return Task(name, tuple(train), tuple(test), source, h.hexdigest())


def example(pair: Pair) -> str:
    return f"Q: {pair.prompt}\nA: {pair.target}"


def query(prompt: str) -> str:
    return f"Q: {prompt}\nA:"


def few_shot_prompt(task: Task, prompt: str, shots: int, rng: np.random.Generator) -> str:
    """`shots` training examples (never the query itself) and then the query."""
    pool = [p for p in task.train if p.prompt != prompt]
    if shots < 0:
        raise HeadwiseError(f"shots must be 0 or more, got {shots}")
    if shots > len(pool):
        raise HeadwiseError(f"task {task.name} has {len(pool)} training pairs besides the query; ask for at most "
                            f"that many shots")
    chosen = rng.choice(len(pool), size=shots, replace=False) if shots else []
    return "\n\n".join([example(pool[i]) for i in chosen] + [query(prompt)])


def is_right(reply: str, target: str) -> bool:
    line = reply.strip().split("\n", 1)[0].strip()
    # The exact line also counts: a target may end in a full stop itself ("Washington, D.C.").
    return line == target or line.removesuffix(".").strip() == target


@dataclass
class TaskScore:
    accuracy: float
    correct: int
    n: int
    replies: list[str]
    prompt_tokens: float  # mean prompt length: what a few-shot prompt costs at inference

    def record(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "correct": self.correct, "n": self.n,
                "mean_prompt_tokens": self.prompt_tokens}


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text).input_ids)


def task_accuracy(loaded: Any, task: Task, *, shots: int = 0, split: str = "test", limit: int | None = None,
                  seed: int = 0, edits: HeadEdits | None = None, batch: int = 16) -> TaskScore:
    """Greedy exact-match accuracy on `split`, with `shots` examples from task.train in each prompt
    (drawn with `seed`) and `edits` (a steering) applied. Prompts of equal token length are decoded
    together (greedy decoding takes no padding)."""
    if split not in ("train", "test"):
        raise HeadwiseError(f"split must be 'train' or 'test', got '{split}'")
    if limit is not None and limit < 1:
        raise HeadwiseError(f"limit must be at least 1 pair, got {limit}")
    if batch < 1:
        raise HeadwiseError(f"batch must be at least 1 prompt, got {batch}")
    loaded.require("text", "a task")
    pairs = list(getattr(task, split))[:limit]
    rng = np.random.default_rng(seed)
    tok = loaded.tokenizer
    prompts = [encode(tok, few_shot_prompt(task, p.prompt, shots, rng)) for p in pairs]
    budget = max(len(encode(tok, " " + p.target)) for p in pairs) + 2
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        groups.setdefault(len(ids), []).append(i)
    replies = [""] * len(pairs)
    chunks = [idx[s:s + batch] for idx in groups.values() for s in range(0, len(idx), batch)]
    for idx in progress(chunks, desc=f"{task.name} {shots}-shot", unit="batch"):
        ids = torch.tensor([prompts[i] for i in idx])
        out = greedy(loaded, ids, budget, until="line", edits=edits)
        for i, text in zip(idx, out.texts):
            replies[i] = text
    correct = sum(is_right(r, p.target) for r, p in zip(replies, pairs))
    return TaskScore(accuracy=correct / len(pairs), correct=correct, n=len(pairs), replies=replies,
                     prompt_tokens=float(np.mean([len(p) for p in prompts])))


__all__ = ["Pair", "Task", "TaskScore", "bundled_tasks", "encode", "example", "few_shot_prompt", "is_right",
           "load_task", "query", "task_accuracy"]
