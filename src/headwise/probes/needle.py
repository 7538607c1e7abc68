"""Needle-in-a-haystack, passkey and multi-needle prompts, built token by token.

The prompt is assembled from separately tokenized pieces (instruction, filler, needle,
filler, question), so the needle's token span is known exactly rather than re-found in a
re-tokenized string. Needle prompts put the haystack in a chat turn when the tokenizer has a
chat template and use a plain "Question: ... Answer:" frame otherwise. The passkey task keeps
its paper's form for every model, a plain continuation ending "What is the pass key? The pass
key is": SmolLM2-135M-Instruct answers it at 4K tokens, yet mostly fails it there inside a chat
turn or after "Question: ... Answer:".

Filler styles:
- "essay": the bundled public-domain prose (or the user's text), at a seeded offset;
- "repeat": the passkey filler of Mohtashami & Jaggi (2023), "The grass is green. ..." repeated;
- "words": seeded random common words (no sentence structure to lean on).
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import HeadwiseError
from .base import adds_bos
from .text import load_text

PLACEHOLDER = "\x00HAYSTACK\x00"
REPEAT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
FILLER_STYLES = ("essay", "repeat", "words")
_WORDS = ("time year people way day man thing woman life child world school state family student group country "
          "problem hand part place case week company system program question work government number night point "
          "home water room mother area money story fact month lot right study book eye job word business issue "
          "side kind head house service friend father power hour game line end member law car city community name "
          "president team minute idea kid body information back parent face others level office door health person "
          "art war history party result change morning reason research girl guy moment air teacher force "
          "education").split()


REPLY_EXTRA_TOKENS = 4  # a small model often restates the needle sentence before (or as) its answer


@dataclass(frozen=True)
class Needle:
    text: str
    question: str
    answer: str


@dataclass
class NeedleCase:
    """One prompt: ids [1, T], where each needle sits, and what a correct answer contains."""

    input_ids: Tensor
    needle_spans: list[tuple[int, int]]  # [start, end) token positions of each inserted needle
    needles: list[Needle]
    target: int  # index of the needle the question asks for
    settings: dict[str, Any] = field(default_factory=dict)
    # When the prompt ends in an answer prefix ("The pass key is"), the tokens a correct reply starts
    # with (" 12345"), for scoring the answer teacher-forced, and which of them spell the key (not the
    # space before it); None when the reply is free-form.
    answer_ids: list[int] | None = None
    key_tokens: list[int] | None = None

    @property
    def answer(self) -> str:
        return self.needles[self.target].answer

    @property
    def reply_budget(self) -> int:
        """New tokens for a reply that restates the target needle: its length + REPLY_EXTRA_TOKENS."""
        start, end = self.needle_spans[self.target]
        return end - start + REPLY_EXTRA_TOKENS

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


def bundled_needles() -> list[Needle]:
    data = json.loads(Path(str(files("headwise").joinpath("data", "needles.json"))).read_text())
    return [Needle(**n) for n in data["needles"]]


def normalize(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation.replace("-", "")))
    return re.sub(r"\s+", " ", text).strip()


def answer_found(reply: str, answer: str) -> bool:
    """Whether a model's reply contains the answer (case, punctuation and spacing ignored)."""
    return normalize(answer) in normalize(reply)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


PLAIN_QA = "\n\nQuestion: {question}\nAnswer:{answer_prefix}"
PASSKEY_QA = "\n\n{question}{answer_prefix}"  # Mohtashami & Jaggi: "... What is the pass key? The pass key is"


def _frame(tokenizer: Any, question: str, answer_prefix: str, intro: str, chat: bool | None = None,
           plain: str = PLAIN_QA) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack; chat=None uses the chat template when there is one."""
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": PLACEHOLDER}], tokenize=False,
                                                 add_generation_prompt=True)
        before, after = rendered.split(PLACEHOLDER)
        return (_encode(tokenizer, before + intro),
                _encode(tokenizer, "\n\n" + question) + _encode(tokenizer, after + answer_prefix))
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    return bos + _encode(tokenizer, intro), _encode(tokenizer, plain.format(question=question,
                                                                            answer_prefix=answer_prefix))


def _filler(tokenizer: Any, style: str, n_tokens: int, rng: random.Random, text: str | Path | None) -> list[int]:
    if style == "repeat":
        unit = _encode(tokenizer, REPEAT_FILLER)
        return (unit * (n_tokens // len(unit) + 1))[:n_tokens]
    if style == "words":
        words = " ".join(rng.choice(_WORDS) for _ in range(n_tokens))
        return _encode(tokenizer, words)[:n_tokens]
    if style != "essay":
        raise HeadwiseError(f"unknown filler style '{style}'; choose from {', '.join(FILLER_STYLES)}")
    docs = [d for d in load_text(text) if d.strip()]
    doc = docs[rng.randrange(len(docs))]
    ids = _encode(tokenizer, doc)
    while len(ids) < n_tokens:  # short user text: cycle it
        ids = ids + _encode(tokenizer, "\n\n" + doc)
    start = rng.randrange(len(ids) - n_tokens + 1)
    return ids[start:start + n_tokens]


def _boundaries(tokenizer: Any, ids: list[int]) -> list[int]:
    """Positions just after a sentence end, where a needle can go without splitting a sentence."""
    out = [0]
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(ids)):
        piece = str(piece)
        if piece.endswith((".", "!", "?")) or "\n" in piece or "Ċ" in piece:
            out.append(i + 1)
    return out


def build_case(tokenizer: Any, needles: list[Needle], depths: list[float], *, context: int, question: str,
               target: int = 0, filler: str = "essay", seed: int = 0, text: str | Path | None = None,
               answer_prefix: str = "", intro: str = "", max_positions: int | None = None,
               chat: bool | None = None, plain: str = PLAIN_QA) -> NeedleCase:
    """Place `needles` at fractional `depths` of a filler haystack so the prompt is `context` tokens."""
    if max_positions is not None and context > max_positions:
        raise HeadwiseError(f"context of {context} tokens is longer than this model allows ({max_positions})")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise HeadwiseError("chat=True needs a tokenizer with a chat template; this one has none")
    before, after = _frame(tokenizer, question, answer_prefix, intro, chat, plain)
    needle_ids = [_encode(tokenizer, " " + n.text.strip() + " ") for n in needles]
    n_filler = context - len(before) - len(after) - sum(len(n) for n in needle_ids)
    if n_filler < 0:
        raise HeadwiseError(f"context of {context} tokens cannot hold the question and needles "
                            f"({context - n_filler} tokens); raise the context")
    rng = random.Random(seed)
    hay = _filler(tokenizer, filler, n_filler, rng, text)
    cuts = _boundaries(tokenizer, hay)
    order = sorted(range(len(needles)), key=lambda i: depths[i])
    ids, spans, last = list(before), [None] * len(needles), 0
    for i in order:
        want = round(depths[i] * len(hay))
        cut = min((c for c in cuts if c >= last), key=lambda c: abs(c - want), default=len(hay))
        ids += hay[last:cut]
        spans[i] = (len(ids), len(ids) + len(needle_ids[i]))
        ids += needle_ids[i]
        last = cut
    ids += hay[last:] + after
    settings = {"context": context, "depths": list(depths), "filler": filler, "seed": seed,
                "text": "bundled" if text is None else str(text),
                "chat_template": bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat,
                "answer_prefix": answer_prefix}
    answer_ids = _encode(tokenizer, " " + needles[target].answer) if answer_prefix else None
    key_tokens = [i for i, t in enumerate(answer_ids) if tokenizer.decode([t]).strip()] if answer_ids else None
    return NeedleCase(input_ids=torch.tensor([ids]), needle_spans=spans, needles=list(needles), target=target,
                      settings=settings, answer_ids=answer_ids, key_tokens=key_tokens)


def needle_case(tokenizer: Any, *, context: int, depth: float, needle: Needle | int = 0, filler: str = "essay",
                seed: int = 0, text: str | Path | None = None, max_positions: int | None = None) -> NeedleCase:
    """One needle at `depth` (0 = start, 1 = end), asked for by its question; an int picks a bundled needle."""
    if isinstance(needle, int):
        bundled = bundled_needles()
        if not 0 <= needle < len(bundled):
            raise HeadwiseError(f"there are {len(bundled)} bundled needles (0-{len(bundled) - 1}), not {needle}; "
                                f"pass a Needle for others")
        needle = bundled[needle]
    case = build_case(tokenizer, [needle], [depth], context=context, question=needle.question, filler=filler,
                      seed=seed, text=text, max_positions=max_positions)
    case.settings["task"] = "needle"
    return case


def passkey_case(tokenizer: Any, *, context: int, depth: float, seed: int = 0, filler: str = "repeat",
                 text: str | Path | None = None, max_positions: int | None = None,
                 chat: bool | None = False) -> NeedleCase:
    """The passkey task (Mohtashami & Jaggi 2023): a 5-digit key hidden in filler, as a plain continuation
    (chat=None: in a chat turn when the tokenizer has a template, as the needle prompts)."""
    key = str(random.Random(f"passkey-{seed}").randrange(10000, 100000))
    needle = Needle(text=f"The pass key is {key}. Remember it. {key} is the pass key.",
                    question="What is the pass key?", answer=key)
    intro = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
             "I will quiz you about the important information there.\n\n")
    case = build_case(tokenizer, [needle], [depth], context=context, question=needle.question,
                      answer_prefix=" The pass key is", intro=intro, filler=filler, seed=seed, text=text,
                      max_positions=max_positions, chat=chat, plain=PASSKEY_QA)
    case.settings["task"] = "passkey"
    return case


def multi_needle_case(tokenizer: Any, *, context: int, n_needles: int = 4, seed: int = 0, filler: str = "essay",
                      text: str | Path | None = None, max_positions: int | None = None) -> NeedleCase:
    """RULER-style multi-key retrieval: several "magic number" needles, the question asks for one."""
    rng = random.Random(f"multi-{seed}")
    keys = rng.sample(_WORDS, n_needles)
    needles = [Needle(text=f"One of the special magic numbers for {k} is: {rng.randrange(1000000, 10000000)}.",
                      question=f"What is the special magic number for {k}?", answer="") for k in keys]
    needles = [Needle(n.text, n.question, n.text.rsplit(" ", 1)[1].rstrip(".")) for n in needles]
    target = rng.randrange(n_needles)
    depths = sorted(rng.uniform(0.05, 0.95) for _ in range(n_needles))
    case = build_case(tokenizer, needles, depths, context=context, question=needles[target].question, target=target,
                      answer_prefix=f" The special magic number for {keys[target]} is", filler=filler, seed=seed,
                      text=text, max_positions=max_positions)
    case.settings["task"] = "multi_needle"
    return case


__all__ = ["FILLER_STYLES", "Needle", "NeedleCase", "REPLY_EXTRA_TOKENS", "answer_found", "build_case",
           "bundled_needles", "multi_needle_case", "needle_case", "normalize", "passkey_case"]
