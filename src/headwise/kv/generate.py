"""Greedy generation and chunked scoring through a HeadwiseCache, timed.

The prompt is prefilled in chunks (default 1024 tokens) so that streaming heads never hold
more than sinks + window + one chunk of keys. SnapKV needs the whole prompt in one call (it
scores the prompt tokens by its last queries), as its paper does, and so does a policy with a
whole-prompt prefill (its streaming heads attend to the whole prompt).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import HeadwiseError
from .cache import HeadwiseCache
from .policy import Policy
from .snapkv import SnapKVPolicy

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


def check_policy(policy: Any, loaded: Any) -> None:
    policy.check(loaded.geometry)


def _forward(model: Any, ids: Tensor, cache: HeadwiseCache, keep_last: bool) -> Tensor:
    kwargs = {"logits_to_keep": 1} if keep_last else {}
    try:
        return model(input_ids=ids, cache=cache, use_cache=True, **kwargs).logits
    except TypeError:  # architectures without logits_to_keep (GPT-2)
        return model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:] if keep_last else \
            model(input_ids=ids, cache=cache, use_cache=True).logits


def prefill(model: Any, ids: Tensor, cache: HeadwiseCache, chunk: int | None) -> Tensor:
    """Run the prompt through the cache; returns the logits of its last position [b, vocab]."""
    if chunk is None or cache.policy.prefill == "whole":  # SnapKVPolicy.prefill is "whole" too
        chunk = ids.shape[1]
    logits = None
    for start in range(0, ids.shape[1], chunk):
        logits = _forward(model, ids[:, start:start + chunk], cache, keep_last=True)
    return logits[:, -1]


@torch.no_grad()
def greedy(loaded: Any, input_ids: Tensor, policy: Policy | SnapKVPolicy, max_new_tokens: int = 32,
           prefill_chunk: int | None = PREFILL_CHUNK, stop_at_eos: bool = True,
           answer_ids: list[int] | None = None) -> GenerationResult:
    """Greedy decoding of one prompt [1, T] under `policy`.

    With `answer_ids`, also scores that answer teacher-forced after the prompt, on a copy of the
    prefilled cache (outside the timings): a graded measure beside the all-or-nothing reply.
    """
    check_policy(policy, loaded)
    if input_ids.dim() != 2:
        raise HeadwiseError("input_ids must be [batch, tokens]")
    loaded.geometry.check_context(input_ids.shape[1] + max_new_tokens)
    model = loaded.model
    ids = input_ids.to(loaded.device)
    cache = HeadwiseCache(policy, max_length=ids.shape[1] + max_new_tokens)
    eos = loaded.tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    t0 = time.perf_counter()
    logits = prefill(model, ids, cache, prefill_chunk)
    t1 = time.perf_counter()
    logprobs, argmax = _score_answer(model, logits, cache, answer_ids) if answer_ids else (None, None)
    t_decode = time.perf_counter()
    out: list[int] = []
    nxt = logits.argmax(-1, keepdim=True)
    for _ in range(max_new_tokens):
        tok = int(nxt[0, 0])
        out.append(tok)
        if (stop_at_eos and tok in eos_ids) or len(out) == max_new_tokens:
            break
        nxt = _forward(model, nxt, cache, keep_last=True)[:, -1].argmax(-1, keepdim=True)
    t2 = time.perf_counter()
    text = loaded.tokenizer.decode(out, skip_special_tokens=True)
    return GenerationResult(tokens=out, text=text, prompt_tokens=int(ids.shape[1]), prefill_seconds=t1 - t0,
                            decode_seconds=t2 - t_decode, kv_bytes=cache.nbytes(), kv_report=cache.report(),
                            answer_logprobs=logprobs, answer_argmax=argmax)


def _score_answer(model: Any, last_logits: Tensor, cache: HeadwiseCache,
                  answer_ids: list[int]) -> tuple[list[float], list[bool]]:
    """Log-prob of each of `answer_ids` following the prefilled prompt, and whether each was the argmax.
    Runs on a copy so that the cache the greedy reply decodes from has not seen the answer."""
    steps = [last_logits[:, None]]
    scratch = copy.deepcopy(cache) if len(answer_ids) > 1 else cache
    for tok in answer_ids[:-1]:  # one token per call, as decoding feeds them (SnapKV takes no multi-token update)
        steps.append(_forward(model, torch.tensor([[tok]], device=last_logits.device), scratch, keep_last=True))
    logits = torch.cat(steps, dim=1)
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    target = torch.tensor(answer_ids, device=logp.device)
    picked = logp.gather(1, target[:, None])[:, 0]
    return [float(x) for x in picked], [bool(x) for x in logp.argmax(-1) == target]


@torch.no_grad()
def perplexity(loaded: Any, input_ids: Tensor, policy: Policy | SnapKVPolicy, chunk: int = 256) -> dict[str, Any]:
    """Next-token perplexity of [1, T] read chunk by chunk through the cache (what decoding would see)."""
    check_policy(policy, loaded)
    if isinstance(policy, SnapKVPolicy):
        raise HeadwiseError("SnapKV evicts once, at the end of a prompt; perplexity over a stream does not apply")
    ids = input_ids.to(loaded.device)
    cache = HeadwiseCache(policy, max_length=ids.shape[1])
    nll, count = 0.0, 0
    for start in range(0, ids.shape[1] - 1, chunk):
        piece = ids[:, start:start + chunk]
        logits = _forward(loaded.model, piece, cache, keep_last=False).float()
        target = ids[:, start + 1:start + 1 + piece.shape[1]]
        logits = logits[:, :target.shape[1]]
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                       reduction="sum"))
        count += target.numel()
    return {"perplexity": math.exp(nll / count), "tokens": count, "kv_bytes": cache.nbytes()}
