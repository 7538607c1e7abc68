"""Successor heads' job (Gould et al. 2023): continue "Monday, Tuesday, Wednesday," with " Thursday".
Metric: top-1 accuracy of the next token over the ordinal prompts (probes/ordinal.py)."""

from __future__ import annotations

from typing import Any

import torch

from ..instrument import Session
from ..probes.ordinal import ordinal_prompts
from .base import TaskOutcome, ValidationTask


def _conditions_by_rows(loaded: Any, scales: torch.Tensor, ids: torch.Tensor, rows_per_pass: int,
                        read: Any) -> torch.Tensor:
    """Run every (condition, sequence) pair as one row under its head scales; `read(logits_last, seq)` -> [rows]."""
    c, s = scales.shape[0], ids.shape[0]
    pairs = [(cond, seq) for cond in range(c) for seq in range(s)]
    values = torch.zeros(c, s, dtype=torch.float64)
    device = loaded.device
    with torch.inference_mode():
        for start in range(0, len(pairs), rows_per_pass):
            chunk = pairs[start:start + rows_per_pass]
            cond = torch.tensor([p[0] for p in chunk])
            seq = torch.tensor([p[1] for p in chunk])
            with Session(loaded.geometry, head_scale=scales[cond].to(device)):
                logits = loaded.model(input_ids=ids[seq].to(device), use_cache=False, logits_to_keep=1).logits[:, -1]
            values[cond, seq] = read(logits.float(), seq).double().cpu()
    return values


class SuccessorTask(ValidationTask):
    """Successor heads' job (Gould et al.): continue "Monday, Tuesday, Wednesday," with " Thursday".
    Metric: top-1 accuracy of the next token over the ordinal prompts (probes/ordinal.py)."""

    name = "ordinal_successor"
    metric = "next-ordinal accuracy (top-1, comma-separated ordinal lists)"
    higher_is_better = True

    def __init__(self, span: int = 3, rows_per_pass: int = 64):
        self.span, self.rows_per_pass = span, rows_per_pass

    def settings(self) -> dict[str, Any]:
        return {"span": self.span, "separator": ","}

    def evaluate(self, loaded: Any, scales: torch.Tensor) -> TaskOutcome:
        prompts = ordinal_prompts(loaded.tokenizer, span=self.span)
        targets = prompts.targets.to(loaded.device)
        hits = _conditions_by_rows(loaded, scales, prompts.probe.input_ids, self.rows_per_pass,
                                   lambda logits, seq: (logits.argmax(-1) == targets[seq.to(targets.device)]).float())
        per_task = [{name: round(float(row[[i for i, t in enumerate(prompts.tasks) if t == name]].mean()), 4)
                     for name in dict.fromkeys(prompts.tasks)} for row in hits]
        return TaskOutcome(values=[float(v) for v in hits.mean(1)], details=per_task)


__all__ = ["SuccessorTask"]
