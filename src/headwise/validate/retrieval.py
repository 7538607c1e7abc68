"""Retrieval heads' job (Wu et al. 2024 mask them and watch needle-in-a-haystack fail): passkey and
needle accuracy of the greedy reply, under each ablation."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from .._progress import progress
from ..decode import greedy
from ..probes.needle import answer_found, bundled_needles, needle_case, passkey_case
from .base import TaskOutcome, ValidationTask


class RetrievalTask(ValidationTask):
    """Passkey and needle-in-a-haystack accuracy (greedy reply contains the answer).

    The default context is 1024 tokens: the issue asks for 1K-2K, and smollm2-135m still
    answers at 1K (it fails most needles at 2K already, leaving nothing to break).
    """

    name = "retrieval"
    metric = "passkey + needle accuracy"
    higher_is_better = True

    def __init__(self, context: int = 1024, passkeys: int = 6, needles: int | None = None, depth: float = 0.5,
                 seed: int = 0, text: str | None = None):
        self.context, self.passkeys, self.depth, self.seed, self.text = context, passkeys, depth, seed, text
        self.needles = len(bundled_needles()) if needles is None else needles

    def settings(self) -> dict[str, Any]:
        return {"context": self.context, "passkeys": self.passkeys, "passkey_filler": "repeat",
                "passkey_depths": "evenly spaced in [0.1, 0.9]",
                "frame": "chat turn when the tokenizer has a chat template", "needles": self.needles,
                "needle_depth": self.depth,
                "needle_filler": "essay", "text": "bundled" if self.text is None else str(self.text),
                "seed": self.seed, "correct": "greedy reply contains the answer (case and punctuation ignored)"}

    def cases(self, loaded: Any) -> list[Any]:
        tok, limit = loaded.tokenizer, loaded.geometry.max_positions
        depths = np.linspace(0.1, 0.9, self.passkeys) if self.passkeys > 1 else [0.5] * self.passkeys
        cases = [passkey_case(tok, context=self.context, depth=float(d), seed=self.seed + i, max_positions=limit,
                              chat=None) for i, d in enumerate(depths)]
        for case in cases:
            case.settings["label"] = f"passkey {case.answer} at depth {case.settings['depths'][0]:.2f}"
        for i, n in enumerate(bundled_needles()[:self.needles]):
            case = needle_case(tok, context=self.context, depth=self.depth, needle=n, seed=self.seed + i,
                               text=self.text, max_positions=limit)
            case.settings["label"] = f"needle {i} ({n.answer})"
            cases.append(case)
        return cases

    def evaluate(self, loaded: Any, scales: Tensor) -> TaskOutcome:
        correct = np.zeros((scales.shape[0], 0), dtype=bool)
        names = []
        for case in progress(self.cases(loaded), desc="retrieval task", unit="prompt"):
            # Room to restate the needle, as the retrieval score decodes (headwise.decode's stop rule for replies).
            replies = greedy(loaded, case.input_ids.expand(scales.shape[0], -1), case.reply_budget, until="line",
                             head_scale=scales).texts
            hits = np.array([answer_found(r, case.answer) for r in replies])
            correct = np.concatenate([correct, hits[:, None]], axis=1)
            names.append(case.settings["label"])
        details = [{"correct": [names[i] for i in np.nonzero(row)[0]]} for row in correct]
        return TaskOutcome(values=[float(v) for v in correct.mean(1)], details=details)


__all__ = ["RetrievalTask"]
