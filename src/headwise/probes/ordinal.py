"""Ordinal sequences for successor heads (Gould et al., arXiv 2312.09230).

The paper's tasks: numbers, number words, ordinal words, days, day prefixes, months, month
prefixes, letters. A member is used only where the tokenizer makes it one token: with a
leading space (" Monday", as inside running text) when that is one token, else bare ("7":
Llama-style tokenizers split a space before digits). Each task uses one form, whichever keeps
more members single tokens (ties: the leading-space form).

`ordinal_tasks` gives the token ids for the weight-based successor score; `ordinal_prompts`
gives prompts of consecutive members ("Monday, Tuesday, Wednesday,") whose next token should
be the successor, for measuring the model's own behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import HeadwiseError
from .base import Probe, adds_bos

_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                 "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
_ORDINAL_WORDS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"]

ORDINAL_SEQUENCES: dict[str, list[str]] = {
    "numbers": [str(i) for i in range(1, 201)],
    "number_words": _NUMBER_WORDS,
    "ordinal_words": _ORDINAL_WORDS,
    "days": _DAYS,
    "day_prefixes": [d[:3] for d in _DAYS],
    "months": _MONTHS,
    "month_prefixes": [m[:3] for m in _MONTHS],
    "letters": [chr(c) for c in range(ord("A"), ord("Z") + 1)],
}


@dataclass(frozen=True)
class OrdinalTask:
    """One ordinal sequence as token ids. `members[i]` is the token of `words[i]`; pairs
    (members[i], members[i+1]) are successions only where `consecutive[i]` (both words exist)."""

    name: str
    words: tuple[str, ...]
    members: tuple[int, ...]
    consecutive: tuple[bool, ...]
    form: str  # "space" or "bare"

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [(self.members[i], self.members[i + 1]) for i in range(len(self.members) - 1) if self.consecutive[i]]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "form": self.form, "members": len(self.members), "pairs": len(self.pairs)}


def _single_token(tokenizer: Any, text: str) -> int | None:
    """The token id of `text` if it is one ordinary token (not the unknown or another special token)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids) | {tokenizer.unk_token_id}
    return ids[0] if len(ids) == 1 and ids[0] not in special else None


def ordinal_tasks(tokenizer: Any, names: Sequence[str] | None = None, min_pairs: int = 2,
                  sequences: dict[str, list[str]] | None = None) -> list[OrdinalTask]:
    """The tasks this tokenizer can express with single tokens (at least `min_pairs` successions)."""
    sequences = ORDINAL_SEQUENCES if sequences is None else sequences
    names = list(sequences) if names is None else list(names)
    unknown = [n for n in names if n not in sequences]
    if unknown:
        raise HeadwiseError(f"unknown ordinal task(s) {', '.join(unknown)}; choose from {', '.join(sequences)}")
    tasks = []
    for name in names:
        best = None
        for form, prefix in (("space", " "), ("bare", "")):
            ids = [_single_token(tokenizer, prefix + w) for w in sequences[name]]
            if best is None or sum(i is not None for i in ids) > sum(i is not None for i in best[1]):
                best = (form, ids)
        form, ids = best
        kept = [(w, i) for w, i in zip(sequences[name], ids) if i is not None]
        if len({i for _, i in kept}) != len(kept):  # two members share a token: no clean successor
            continue
        index = {w: k for k, w in enumerate(sequences[name])}
        consecutive = tuple(index[kept[k + 1][0]] == index[kept[k][0]] + 1 for k in range(len(kept) - 1))
        task = OrdinalTask(name, tuple(w for w, _ in kept), tuple(i for _, i in kept), consecutive, form)
        if len(task.pairs) >= min_pairs:
            tasks.append(task)
    if not tasks:
        raise HeadwiseError("this tokenizer splits every ordinal word (days, months, numbers, letters) into several "
                            "tokens; the successor score needs single-token ordinals")
    return tasks


@dataclass
class OrdinalPrompts:
    """Prompts of `span` consecutive members; `targets[i]` is the member that should come next and
    `candidates[i]` the token ids of that prompt's task (the successor competes with them)."""

    probe: Probe
    targets: torch.Tensor  # [n] long
    tasks: list[str]
    candidates: list[tuple[int, ...]]


def ordinal_prompts(tokenizer: Any, tasks: Sequence[OrdinalTask] | None = None, span: int = 3,
                    prepend_bos: bool | None = None) -> OrdinalPrompts:
    """Every run of `span` consecutive members as a comma-separated list ("Monday, Tuesday,
    Wednesday,", the way lists occur in text), whose next token should be the successor."""
    tasks = ordinal_tasks(tokenizer) if tasks is None else list(tasks)
    if prepend_bos is None:
        prepend_bos = adds_bos(tokenizer)
    comma = _single_token(tokenizer, ",")
    if comma is None:
        raise HeadwiseError("this tokenizer has no single ',' token; ordinal prompts cannot be built")
    rows, targets, names, candidates = [], [], [], []
    for task in tasks:
        m, ok = task.members, task.consecutive
        for start in range(len(m) - span):
            if all(ok[start:start + span]):
                row = [tok for member in m[start:start + span] for tok in (member, comma)]
                rows.append(([tokenizer.bos_token_id] if prepend_bos else []) + row)
                targets.append(m[start + span])
                names.append(task.name)
                candidates.append(task.members)
    if not rows:
        raise HeadwiseError(f"no run of {span + 1} consecutive single-token ordinals for this tokenizer; use a "
                            f"shorter span")
    settings = {"span": span, "prepend_bos": bool(prepend_bos), "separator": ",",
                "tasks": [t.to_dict() for t in tasks]}
    probe = Probe(name="ordinal", input_ids=torch.tensor(rows, dtype=torch.long), settings=settings)
    return OrdinalPrompts(probe, torch.tensor(targets, dtype=torch.long), names, candidates)


__all__ = ["ORDINAL_SEQUENCES", "OrdinalPrompts", "OrdinalTask", "ordinal_prompts", "ordinal_tasks"]
