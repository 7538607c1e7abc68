"""DuoAttention's multi-passkey recall samples (Xiao et al. 2024, arXiv 2410.10819, Sec. 3.2).

Ten passkeys, each 32 words drawn from the NATO alphabet, are hidden at sorted random depths
(5%-95%) of a book-length haystack; after the book, the model is asked for each passkey in
turn and the passkey follows. The positions of that question-and-answer part are the ones
whose hidden states the gates must preserve (`label_mask`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import adds_bos
from .text import load_text

NATO = ("alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november oscar papa quebec "
        "romeo sierra tango uniform victor whiskey xray yankee zulu").split()
ORDINALS = ("first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
            "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth").split()
NEEDLE = "Remember this sequence of words, it's the {ordinal} passkey to the vault: "
QUESTION = "Based on the content of the book, what is the {ordinal} passkey to the vault?\nPasskey: "
PROMPT_START, PROMPT_END, SEPARATOR = "This is a very long story book: <book> ", " </book>.\n\n", "\n\n"


@dataclass
class PasskeySample:
    input_ids: Tensor  # [1, T]
    label_mask: Tensor  # [T] bool: the question-and-answer part after the book


class MultiPasskeySamples:
    """Seeded samples with `haystack` tokens of the bundled prose (or the user's text)."""

    def __init__(self, tokenizer: Any, haystack: int, n_passkeys: int = 10, passkey_words: int = 32,
                 min_depth: float = 0.05, max_depth: float = 0.95, text: str | None = None, seed: int = 0):
        if not 1 <= n_passkeys <= len(ORDINALS):
            raise ValueError(f"n_passkeys must be 1..{len(ORDINALS)}")
        self.tok, self.haystack, self.n, self.words = tokenizer, haystack, n_passkeys, passkey_words
        self.depths = (min_depth, max_depth)
        self.rng = random.Random(seed)
        self.docs = [ids for ids in (self._encode(d) for d in load_text(text)) if len(ids) >= haystack]
        if not self.docs:  # short user text: one long document
            joined = self._encode("\n\n".join(load_text(text)))
            self.docs = [(joined * (haystack // max(1, len(joined)) + 1))]

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def sample(self) -> PasskeySample:
        rng = self.rng
        doc = self.docs[rng.randrange(len(self.docs))]
        start = rng.randrange(len(doc) - self.haystack + 1)
        hay = doc[start:start + self.haystack]
        keys = [self._encode(" ".join(rng.choice(NATO) for _ in range(self.words))) for _ in range(self.n)]
        depths = sorted(rng.uniform(*self.depths) for _ in range(self.n))
        sep = self._encode(SEPARATOR)
        bos = [self.tok.bos_token_id] if adds_bos(self.tok) else []
        ids, last = bos + self._encode(PROMPT_START), 0
        for i, (depth, key) in enumerate(zip(depths, keys)):
            cut = int(len(hay) * depth)
            ids += hay[last:cut] + sep + self._encode(NEEDLE.format(ordinal=ORDINALS[i])) + key + sep
            last = cut
        ids += hay[last:] + self._encode(PROMPT_END)
        context_len = len(ids)
        for i, key in enumerate(keys):
            ids += self._encode(QUESTION.format(ordinal=ORDINALS[i])) + key + sep
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[context_len:] = True
        return PasskeySample(torch.tensor([ids]), mask)


__all__ = ["MultiPasskeySamples", "PasskeySample"]
