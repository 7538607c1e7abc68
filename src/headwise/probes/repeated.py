"""Random token blocks repeated k times: the standard probe for induction-type heads.

On the second and later copies, an induction head attends from token A to the token that
followed the earlier A (offset block_len - 1 back), a duplicate-token head to the earlier
A itself (offset block_len), a previous-token head to offset 1 (Olsson et al. 2022).
Tokens within a block are distinct, so "the earlier copy of A" is unambiguous.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import HeadwiseError
from .base import Probe, adds_bos, content_token_ids


def repeated_tokens(tokenizer: Any, vocab_size: int, *, block_len: int = 64, repeats: int = 2, n_sequences: int = 8,
                    seed: int = 0, prepend_bos: bool | None = None, name: str = "repeated") -> Probe:
    pool = content_token_ids(tokenizer, vocab_size)
    if block_len > len(pool):
        raise HeadwiseError(f"block of {block_len} distinct tokens asked for, but the vocabulary has {len(pool)}")
    if prepend_bos is None:
        prepend_bos = adds_bos(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_sequences):
        block = pool[torch.randperm(len(pool), generator=gen)[:block_len]]
        row = block.repeat(repeats)
        if prepend_bos:
            row = torch.cat([torch.tensor([tokenizer.bos_token_id]), row])
        rows.append(row)
    settings = {"block_len": block_len, "repeats": repeats, "n_sequences": n_sequences, "seed": seed,
                "prepend_bos": bool(prepend_bos), "prefix_len": int(bool(prepend_bos))}
    return Probe(name=name, input_ids=torch.stack(rows).long(), settings=settings)


__all__ = ["repeated_tokens"]
