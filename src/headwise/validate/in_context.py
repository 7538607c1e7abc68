"""Induction and previous-token heads' job (Olsson et al. 2022): the in-context loss, i.e. the loss on
the second copy of a repeated random block, under each ablation."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..instrument import Session
from ..probes.repeated import repeated_tokens
from .base import TaskOutcome, ValidationTask


class InContextLossTask(ValidationTask):
    """Loss on the second copy of a repeated random block (its first token excluded: not inducible)."""

    name = "in_context_loss"
    metric = "in-context loss (nats, 2nd copy of repeated random tokens)"
    higher_is_better = False

    def __init__(self, block_len: int = 64, n_sequences: int = 8, seed: int = 0, rows_per_pass: int = 16):
        self.block_len, self.n_sequences, self.seed, self.rows_per_pass = block_len, n_sequences, seed, rows_per_pass

    def settings(self) -> dict[str, Any]:
        return {"block_len": self.block_len, "repeats": 2, "n_sequences": self.n_sequences, "seed": self.seed,
                "loss_on": "tokens 2..n of the second copy"}

    def evaluate(self, loaded: Any, scales: Tensor) -> TaskOutcome:
        probe = repeated_tokens(loaded.tokenizer, loaded.geometry.vocab_size, block_len=self.block_len, repeats=2,
                                n_sequences=self.n_sequences, seed=self.seed)
        ids, n = probe.input_ids, self.block_len
        # The last n positions hold the second copy; all but the last predict its tokens 2..n.
        targets = ids[:, -(n - 1):]
        c, s = scales.shape[0], ids.shape[0]
        rows = [(cond, seq) for cond in range(c) for seq in range(s)]
        losses = torch.zeros(c, s, dtype=torch.float64)
        device = loaded.device
        with torch.inference_mode():
            for start in range(0, len(rows), self.rows_per_pass):
                chunk = rows[start:start + self.rows_per_pass]
                cond = torch.tensor([r[0] for r in chunk])
                seq = torch.tensor([r[1] for r in chunk])
                with Session(loaded.geometry, head_scale=scales[cond].to(device)):
                    logits = loaded.model(input_ids=ids[seq].to(device), use_cache=False, logits_to_keep=n).logits
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets[seq].to(device),
                                                        reduction="none").mean(-1)
                losses[cond, seq] = nll.double().cpu()
        return TaskOutcome(values=[float(v) for v in losses.mean(1)],
                           details=[{"per_sequence": [round(float(x), 4) for x in row]} for row in losses])


__all__ = ["InContextLossTask"]
