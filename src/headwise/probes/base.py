"""What every probe returns, and token helpers shared by probes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Probe:
    """Equal-length token sequences [n, T] plus the settings that reproduce them."""

    name: str
    input_ids: Tensor
    settings: dict[str, Any] = field(default_factory=dict)

    def model_inputs(self, batch: Tensor) -> dict[str, Any]:
        """The keyword arguments of one forward pass over a batch of this probe (no cache, one logit row:
        observers read attention, not predictions)."""
        return {"input_ids": batch, "use_cache": False, "logits_to_keep": 1}

    @property
    def n_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        for start in range(0, self.n_sequences, batch_size):
            yield self.input_ids[start:start + batch_size]


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts plain text with BOS (models trained so expect it)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def content_token_ids(tokenizer: Any, vocab_size: int) -> Tensor:
    """Ordinary vocabulary ids: no special or added tokens (Gemma alone has thousands unused)."""
    n = min(len(tokenizer), vocab_size)
    excluded = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    keep = torch.ones(n, dtype=torch.bool)
    keep[[i for i in excluded if 0 <= i < n]] = False
    return torch.nonzero(keep).flatten()


__all__ = ["Probe", "adds_bos", "content_token_ids"]
