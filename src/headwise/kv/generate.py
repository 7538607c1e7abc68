"""Greedy generation and chunked scoring through a HeadwiseCache, timed.

The prompt is prefilled in chunks (default 1024 tokens) so that streaming heads never hold
more than sinks + window + one chunk of keys. A policy with a whole-prompt prefill (SnapKV,
`+whole`) takes the whole prompt in one call: its streaming heads attend to all of it.
Decoding is headwise.decode's loop: until="eos" for free text, "line" for replies to a
question (`headwise eval`), "budget" for timing runs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..decode import Until, forward, greedy
from ..errors import HeadwiseError
from ..instrument import HeadEdits
from .cache import HeadwiseCache
from .policy import CachePolicy

PREFILL_CHUNK = 1024


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    kv_bytes: int
    kv_report: dict[str, Any] = field(default_factory=dict)
    # With answer_ids: each answer token's log-probability (nats), teacher-forced after the prompt, and
    # whether it was the most likely next token there.
    answer_logprobs: list[float] | None = None
    answer_argmax: list[bool] | None = None

    @property
    def answer_logprob(self) -> float | None:
        """Mean log-probability per token of the teacher-forced answer."""
        return sum(self.answer_logprobs) / len(self.answer_logprobs) if self.answer_logprobs else None

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(0, len(self.tokens) - 1)  # the first new token comes out of the prefill
        return steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")


def generate(loaded: Any, input_ids: Tensor, policy: CachePolicy, max_new_tokens: int = 32,
             prefill_chunk: int | None = PREFILL_CHUNK, until: Until = "eos",
             answer_ids: list[int] | None = None, edits: HeadEdits | None = None) -> GenerationResult:
    """Greedy decoding of one prompt [1, T] under `policy` (headwise.decode's loop and stop rule).

    With `answer_ids`, also scores that answer teacher-forced after the prompt, on a copy of the
    prefilled cache (outside the timings): a graded measure beside the all-or-nothing reply.
    """
    policy.check(loaded.geometry)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise HeadwiseError("input_ids must be one prompt, [1, tokens]")
    cache = HeadwiseCache(policy, max_length=input_ids.shape[1] + max_new_tokens)
    # A whole-prompt policy attends to the whole prompt in one call, then cuts (SnapKV, +whole).
    chunk = None if policy.one_call_prefill else prefill_chunk
    scored: dict[str, Any] = {}

    def after_prefill(logits: Tensor, prefilled: Any) -> None:
        scored["logprobs"], scored["argmax"] = score_answer(loaded.model, logits, prefilled, answer_ids)

    replies = greedy(loaded, input_ids, max_new_tokens, until=until, cache=cache, prefill_chunk=chunk,
                     after_prefill=after_prefill if answer_ids else None, edits=edits)
    return GenerationResult(tokens=replies.tokens[0], text=replies.texts[0], prompt_tokens=int(input_ids.shape[1]),
                            prefill_seconds=replies.prefill_seconds, decode_seconds=replies.decode_seconds,
                            kv_bytes=cache.nbytes(), kv_report=cache.report(),
                            answer_logprobs=scored.get("logprobs"), answer_argmax=scored.get("argmax"))


def score_answer(model: Any, last_logits: Tensor, cache: HeadwiseCache,
                 answer_ids: list[int]) -> tuple[list[float], list[bool]]:
    """Log-prob of each of `answer_ids` following the prefilled prompt, and whether each was the argmax.
    Runs on a copy so that the cache the greedy reply decodes from has not seen the answer."""
    steps = [last_logits[:, None]]
    scratch = copy.deepcopy(cache) if len(answer_ids) > 1 else cache
    for tok in answer_ids[:-1]:  # one token per call, as decoding feeds them (SnapKV takes no multi-token update)
        steps.append(forward(model, torch.tensor([[tok]], device=last_logits.device), scratch)[0])
    logits = torch.cat(steps, dim=1)
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    target = torch.tensor(answer_ids, device=logp.device)
    picked = logp.gather(1, target[:, None])[:, 0]
    return [float(x) for x in picked], [bool(x) for x in logp.argmax(-1) == target]


@torch.no_grad()
def perplexity(loaded: Any, input_ids: Tensor, policy: CachePolicy, chunk: int = 256) -> dict[str, Any]:
    """Next-token perplexity of [1, T] read chunk by chunk through the cache (what decoding would see)."""
    policy.check(loaded.geometry)
    if not policy.accepts_chunks:
        raise HeadwiseError(f"policy '{policy.name}' evicts once, at the end of a prompt; perplexity over a stream "
                            f"does not apply")
    ids = input_ids.to(loaded.device)
    cache = HeadwiseCache(policy, max_length=ids.shape[1])
    nll, count = 0.0, 0
    for start in range(0, ids.shape[1] - 1, chunk):
        piece = ids[:, start:start + chunk]
        logits = forward(loaded.model, piece, cache, last_only=False)[0].float()
        target = ids[:, start + 1:start + 1 + piece.shape[1]]
        logits = logits[:, :target.shape[1]]
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                       reduction="sum"))
        count += target.numel()
    return {"perplexity": math.exp(nll / count), "tokens": count, "kv_bytes": cache.nbytes()}


__all__ = ["GenerationResult", "PREFILL_CHUNK", "generate", "perplexity", "score_answer"]
