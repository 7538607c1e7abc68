"""RULER's synthetic tasks (Hsieh et al. 2024, arXiv 2404.06654; NVIDIA/RULER), generated offline.

Tasks, as configured in RULER's scripts/synthetic.yaml:
- niah_single_1 / _2 / _3: one needle "One of the special magic numbers for KEY is: VALUE." in the
  noise haystack ("The grass is green. ...", one copy per line) / the essay haystack, VALUE a
  7-digit number (_1, _2) or a UUID (_3);
- niah_multikey_1: four needles with different keys in the essay, one key asked;
- niah_multivalue: four needles with one key, all four values asked;
- niah_multiquery: four needles with different keys, all four keys asked;
- vt: variable tracking, one chain "VAR A = 12345", "VAR B = VAR A", ... of 4 hops in the noise
  haystack, after one worked example (RULER's in-context example, about 500 tokens); the answer is
  every variable that holds the value;
- cwe: common words extraction, a numbered word list where 10 words appear 30 times and the rest 3
  (6 and 1 below 4096 tokens), after one worked example; the answer is the 10 common words;
- fwe: frequent words extraction, coded 6-letter words drawn from a Zipf law (alpha 2), the most
  frequent one replaced by "..."; the answer is the three next most frequent.

Templates, answer prefixes, needle sentences, depths and tokens_to_generate are RULER's. What
differs, and why (see docs/ruler.md):
- The essay haystack is the bundled public-domain prose (headwise.probes.text.load_text, four
  19th-century novels joined), not Paul Graham's essays, which are not available offline. As in
  RULER, every essay prompt starts at the beginning of that text (repeated when too short), split
  into sentences by a regular expression instead of NLTK's punkt.
- NIAH keys are two words of that text joined by a hyphen ("harbour-lantern") and cwe's words are
  words of that text (lower-case, 4+ letters, the 50 commonest left out) in place of wonderwords'
  adjective-noun pairs and word lists, which are not available offline.
- `context` is the prompt's length: the prompt is the longest the generator makes within `context`
  tokens (a search over the haystack size, as RULER's), and the reply's tokens_to_generate come on
  top. RULER's max_seq_length counts both.
- Every random choice comes from the seed, and a case depends only on (tokenizer, task, context,
  seed). NIAH keys and values are drawn without repeats.

Framing: with a chat template the task text is the user turn and RULER's answer prefix starts the
assistant turn (RULER's model templates, e.g. meta-llama3, render the same way); without one the
prompt is the task text then the answer prefix (RULER's "base" template) after BOS where the
tokenizer adds it. Worked examples (vt, cwe) sit inside the user turn, before the task.

Scoring is RULER's string_match_all: the share of reference strings found in the reply,
case-insensitive. Replies are decoded as RULER decodes them, greedily up to tokens_to_generate or
the end of sequence (until="eos"), so a list of answers on several lines is not cut.
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from ..errors import HeadwiseError
from .base import adds_bos
from .text import load_text

NIAH_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue",
              "niah_multiquery")
RULER_TASKS: tuple[str, ...] = (*NIAH_TASKS, "vt", "cwe", "fwe")

# scripts/synthetic.yaml: haystack, value type, keys, values per key, keys asked
_NIAH = {"niah_single_1": ("noise", "numbers", 1, 1, 1), "niah_single_2": ("essay", "numbers", 1, 1, 1),
         "niah_single_3": ("essay", "uuids", 1, 1, 1), "niah_multikey_1": ("essay", "numbers", 4, 1, 1),
         "niah_multivalue": ("essay", "numbers", 1, 4, 1), "niah_multiquery": ("essay", "numbers", 1, 1, 4)}
VT_CHAINS, VT_HOPS = 1, 4
VT_EXAMPLE_TOKENS = 500  # RULER builds vt's in-context example to fit 500 tokens
CWE_COMMON = 10
FWE_ALPHA, FWE_WORD_LEN = 2.0, 6
TOKENS_TO_GENERATE = {**{t: 128 for t in NIAH_TASKS}, "vt": 30, "cwe": 120, "fwe": 50}
# RULER decodes every task to tokens_to_generate with no stop words: a newline does not end a reply.
STOP_RULE = {t: "eos" for t in RULER_TASKS}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                 "{type_needle_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
                "list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
DEPTHS = [round(i * 100 / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)): the needle depths in %
PLACEHOLDER = "\x00TASK\x00"
# Sentence ends for the essay haystack (punkt's job in RULER): not after the titles common in the bundled novels.
_SENTENCE_END = re.compile(r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?:(?<=[.!?])|(?<=[.!?][\"')]))\s+")


@dataclass
class RulerCase:
    """One RULER prompt [1, T], its text, and the strings a correct reply contains."""

    input_ids: Tensor
    text: str
    answers: list[str]
    task: str
    max_new_tokens: int  # RULER's tokens_to_generate for the task
    until: str = "eos"  # the stop rule the reply is decoded with (headwise.decode)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


def ruler_score(reply: str, answers: list[str]) -> float:
    """RULER's string_match_all for one reply: the share of `answers` found in it, case-insensitive."""
    if not answers:
        raise HeadwiseError("a RULER case needs at least one reference answer")
    reply = reply.lower()
    return sum(a.lower() in reply for a in answers) / len(answers)


@lru_cache(maxsize=1)
def _essay_words() -> tuple[str, ...]:
    return tuple(re.sub(r"\s+", " ", "\n\n".join(load_text())).strip().split(" "))


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    """Content words of the bundled text, sorted: lower-case, alphabetic, 4+ letters, not among its 50 commonest."""
    counts = Counter(w for w in re.findall(r"[A-Za-z]+", "\n".join(load_text())) if w.islower())
    common = {w for w, _ in counts.most_common(50)}
    return tuple(sorted(w for w in counts if len(w) >= 4 and w not in common))


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def _essay(n_words: int) -> str:
    words = _essay_words()
    repeats = -(-n_words // len(words))
    return " ".join((words * repeats)[:n_words])


def _niah(task: str, seed: int, n: int) -> tuple[str, str, list[str]]:
    """(task text, answer prefix, answers) with a haystack of n units: essay words or noise lines."""
    haystack, type_v, n_keys, n_values, n_queries = _NIAH[task]
    n_keys = max(n_keys, n_queries)
    rng = random.Random(f"ruler/{task}/{seed}")
    vocab = _vocabulary()
    keys = []
    while len(keys) < n_keys:
        key = f"{rng.choice(vocab)}-{rng.choice(vocab)}"
        keys += [key] if key not in keys else []
    values: list[list[str]] = []
    needles = []
    seen: set[str] = set()
    for key in keys:
        values.append([])
        while len(values[-1]) < n_values:
            value = (str(rng.randint(10 ** 6, 10 ** 7 - 1)) if type_v == "numbers"
                     else str(uuid.UUID(int=rng.getrandbits(128), version=4)))
            if value not in seen:
                seen.add(value)
                values[-1].append(value)
                needles.append(NEEDLE.format(type_needle_v=type_v, key=key, value=value))
    rng.shuffle(needles)
    if haystack == "essay":
        sents = _sentences(_essay(n))
        cuts = [0, *sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles))), len(sents)]
        parts = []
        for i in range(1, len(cuts)):
            parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
        context = " ".join(parts)
    else:
        lines = [NOISE] * n
        for index, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
            lines.insert(index, needle)
        context = "\n".join(lines)
    asked = rng.sample(range(n_keys), n_queries)
    queries = [keys[i] for i in asked]
    answers = [v for i in asked for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix = NIAH_TEMPLATE, NIAH_PREFIX
    if n_queries * n_values == 1:  # RULER's singular wording, applied to its template and answer prefix alike
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(old, new), prefix.replace(old, new)
        type_v = type_v[:-1]
    fmt = {"type_needle_v": type_v, "context": context, "query": query}
    return template.format(**fmt), prefix.format(**fmt), answers


def _vt_chain(rng: random.Random, example: bool) -> tuple[list[str], list[str]]:
    """Variables and assignment lines of one chain; the example's use 3 letters and the value 12345."""
    size = 3 if example else 5
    names: list[str] = []
    while len(names) < VT_HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=size))
        names += [name] if name not in names and name != "VAR" else []
    value = "12345" if example else str(rng.randrange(10000, 99999))
    # RULER's hop lines end in a space
    return names, [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(VT_HOPS)]


def _vt_body(rng: random.Random, n: int, example: bool) -> tuple[str, str, list[str]]:
    names, chain = _vt_chain(rng, example)
    value = chain[0].split("=")[-1].strip()
    lines = [NOISE] * n
    for j, pos in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
        lines.insert(pos + j, chain[j])
    context = "\n".join(lines).replace(". \n", ".\n")
    fmt = {"context": context, "query": value, "num_v": VT_HOPS + 1}
    return VT_TEMPLATE.format(**fmt), VT_PREFIX.format(**fmt), names


def _vt_example(tokenizer: Any, seed: int) -> str:
    """RULER's in-context example: the task at up to 500 tokens with its answer, names and value re-drawn."""
    def build(n: int) -> tuple[str, str, list[str]]:
        return _vt_body(random.Random(f"ruler/vt-example/{seed}"), n, example=True)

    n = _fit(lambda n: len(_encode(tokenizer, "".join(build(n)[:2]))), 5, VT_EXAMPLE_TOKENS) or 5
    text, prefix, names = build(n)
    shown = text + prefix + " " + " ".join(names) + "\n"
    rng = random.Random(f"ruler/vt-example-names/{seed}")
    fresh: list[str] = []
    while len(fresh) < len(names):
        name = "".join(rng.choices(string.ascii_uppercase, k=3))
        fresh += [name] if name not in fresh and name not in names and name != "VAR" else []
    for old, new in zip(names, fresh):
        shown = shown.replace(old, new)
    return shown.replace("12345", str(rng.randrange(10000, 99999)))


def _vt(example: str, seed: int, n: int) -> tuple[str, str, list[str]]:
    text, prefix, names = _vt_body(random.Random(f"ruler/vt/{seed}"), n, example=False)
    return example + "\n" + text, prefix, names


def _cwe_list(rng: random.Random, n_words: int, common_repeats: int, other_repeats: int) -> tuple[str, list[str]]:
    vocab = _vocabulary()
    if n_words > len(vocab):
        raise HeadwiseError(f"cwe needs {n_words} distinct words at this context but the bundled text has "
                            f"{len(vocab)}; use a shorter context for cwe")
    words = rng.sample(vocab, n_words)
    common = words[:CWE_COMMON]
    listed = common * common_repeats + words[CWE_COMMON:] * other_repeats
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), common


def _cwe(context: int, seed: int, n: int) -> tuple[str, str, list[str]]:
    rng = random.Random(f"ruler/cwe/{seed}")
    # RULER's frequencies: fewer repeats for short prompts (it switches at max_seq_length 4096)
    (ex_n, ex_c, ex_o), (c, o) = ((20, 3, 1), (6, 1)) if context < 4096 else ((40, 10, 3), (30, 3))
    ex_list, ex_common = _cwe_list(rng, ex_n, ex_c, ex_o)
    shot = (CWE_TEMPLATE.format(context=ex_list) + CWE_PREFIX + " "
            + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_common)))
    listed, common = _cwe_list(rng, n, c, o)
    return shot + "\n" + CWE_TEMPLATE.format(context=listed), CWE_PREFIX, common


def _fwe(context: int, seed: int, n: int) -> tuple[str, str, list[str]]:
    rng = random.Random(f"ruler/fwe/{seed}")
    size = max(context // 50, 5)  # RULER: vocab_size = max_seq_length // 50
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LEN)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # the top-ranked word is noise
    zeta = math.pi ** 2 / 6  # zeta(FWE_ALPHA = 2)
    words = [w for k, w in enumerate(ranked, 1) for _ in range(int(n * k ** -FWE_ALPHA / zeta))]
    rng.shuffle(words)
    return FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX, ranked[1:4]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _fit(count: Callable[[int], int], low: int, context: int) -> int | None:
    """The largest haystack size n >= low whose prompt has at most `context` tokens (None if even `low` is
    too long): doubling, then bisection, keeping only sizes that were counted to fit."""
    if count(low) > context:
        return None
    high = low * 2
    while count(high) <= context:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if count(mid) <= context else (low, mid)
    return low


def _framer(tokenizer: Any, chat: bool) -> Callable[[str, str], tuple[str, list[int]]]:
    """(task text, answer prefix) -> (prompt text, ids)."""
    if chat:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": PLACEHOLDER}], tokenize=False,
                                                 add_generation_prompt=True)
        before, after = rendered.split(PLACEHOLDER)

        def frame(text: str, prefix: str) -> tuple[str, list[int]]:
            prompt = before + text + after + prefix
            return prompt, _encode(tokenizer, prompt)
        return frame
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []

    def plain(text: str, prefix: str) -> tuple[str, list[int]]:
        return text + prefix, bos + _encode(tokenizer, text + prefix)
    return plain


# The smallest haystack each generator takes: noise lines for the needle or the chain, essay words, cwe's words
# (some beyond the 10 common ones), fwe's words (from 100 on, the third answer outnumbers the fourth-ranked word).
_LOWEST = {**{t: 50 for t in NIAH_TASKS}, "niah_single_1": 4, "vt": 5, "cwe": 20, "fwe": 100}
_HAYSTACK = {**{t: spec[0] for t, spec in _NIAH.items()}, "vt": "noise", "cwe": "word list", "fwe": "coded words"}


def ruler_case(tokenizer: Any, task: str, *, context: int, seed: int, max_positions: int | None = None,
               chat: bool | None = None) -> RulerCase:
    """One prompt of RULER task `task`, the longest within `context` tokens, drawn from `seed`.

    chat=None frames the task in the tokenizer's chat template when it has one (see the module docstring).
    """
    if task not in RULER_TASKS:
        raise HeadwiseError(f"unknown RULER task '{task}'; choose from {', '.join(RULER_TASKS)}")
    if not (isinstance(context, int) and not isinstance(context, bool) and context >= 1):
        raise HeadwiseError(f"context must be a whole number of tokens >= 1, got {context!r}")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise HeadwiseError(f"seed must be a whole number >= 0, got {seed!r}")
    budget = TOKENS_TO_GENERATE[task]
    if max_positions is not None and context + budget > max_positions:
        raise HeadwiseError(f"{task} at {context} tokens plus its {budget}-token reply is longer than this model "
                            f"allows ({max_positions}); use a context of at most {max_positions - budget}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise HeadwiseError("chat=True needs a tokenizer with a chat template; this one has none")
    chat = has_template if chat is None else chat
    frame = _framer(tokenizer, chat)
    example = _vt_example(tokenizer, seed) if task == "vt" else ""
    makers: dict[str, Callable[[int], tuple[str, str, list[str]]]] = {
        "vt": lambda n: _vt(example, seed, n), "cwe": lambda n: _cwe(context, seed, n),
        "fwe": lambda n: _fwe(context, seed, n)}
    generate = makers.get(task, lambda n: _niah(task, seed, n))
    counted: dict[int, int] = {}
    failed: dict[int, HeadwiseError] = {}

    def count(n: int) -> int:
        if n not in counted:
            try:
                counted[n] = len(frame(*generate(n)[:2])[1])
            except HeadwiseError as e:  # cwe out of words: no prompt this long
                failed[n], counted[n] = e, context + 1
        return counted[n]

    n = _fit(count, _LOWEST[task], context)
    if n is None:
        raise HeadwiseError(f"{task} needs more than {context} tokens (its smallest prompt here has "
                            f"{count(_LOWEST[task])}); raise the context")
    if n + 1 in failed:  # the prompt would stop well short of the context
        raise failed[n + 1]
    body, prefix, answers = generate(n)
    text, ids = frame(body, prefix)
    settings = {"task": task, "context": context, "seed": seed, "haystack_units": n, "chat_template": chat,
                "haystack": _HAYSTACK[task], "stop": STOP_RULE[task]}
    return RulerCase(input_ids=torch.tensor([ids], dtype=torch.long), text=text, answers=list(answers), task=task,
                     max_new_tokens=budget, until=STOP_RULE[task], settings=settings)


def string_match_all(replies: list[str], references: list[list[str]]) -> float:
    """RULER's corpus-level metric: the mean of ruler_score over replies, times 100, rounded to 2 decimals."""
    if not replies or len(replies) != len(references):
        raise HeadwiseError("string_match_all needs one list of references per reply, and at least one reply")
    return round(sum(ruler_score(p, r) for p, r in zip(replies, references)) / len(replies) * 100, 2)


__all__ = ["NIAH_TASKS", "RULER_TASKS", "STOP_RULE", "TOKENS_TO_GENERATE", "RulerCase", "ruler_case", "ruler_score",
           "string_match_all"]
