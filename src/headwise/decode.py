"""Greedy decoding: the one loop behind every reply headwise reads.

Retrieval scoring, causal validation, `headwise generate` and `headwise eval` all decode
here, so an accuracy means the same thing wherever it is measured.

Stop rule. A row's reply ends at the first of:
- an end-of-sequence token: the tokenizer's, or any of the model's generation_config (chat
  models often end a turn with a token the tokenizer does not call EOS). It is not part of
  the reply;
- the token budget, `max_new_tokens`;
- with until="line" (a reply to a question: retrieval scoring, validation, `headwise eval`):
  the first newline after the reply has begun. A newline before any visible text does not
  end it (some chat models open their turn with one); the token holding the newline is kept.
until="eos" (free text, `headwise generate`) drops the newline rule; until="budget" (timing
runs) decodes exactly `max_new_tokens` tokens.

What callers differ in comes in as hooks:
- head_scale [rows, layers, heads]: a different head ablation per row (validation);
- cache: a transformers Cache to fill instead of the model's own (kv's HeadwiseCache);
- observe: a factory of observers for each decode step. The prompt's last token is then fed
  as the first observed step, so every generated token's query is watched (retrieval);
- after_prefill(logits, cache): runs between prefill and decoding, outside both timings
  (kv eval scores a teacher-forced answer on a copy of the prefilled cache);
- prefill_chunk: feed the prompt in pieces of this many tokens;
- edits: instrument.HeadEdits applied in every pass (steering).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .errors import HeadwiseError
from .instrument import HeadEdits, Observer, Session

Until = Literal["line", "eos", "budget"]
UNTIL: tuple[str, ...] = ("line", "eos", "budget")


@dataclass
class Replies:
    """What greedy decoding produced, one entry per batch row."""

    tokens: list[list[int]]  # every decoded token, end-of-sequence excluded
    texts: list[str]  # the tokens as text (special tokens skipped), stripped
    prefill_seconds: float
    decode_seconds: float
    cache: Any  # the cache after the last step


def stop_ids(tokenizer: Any, model: Any) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the model's generation_config's."""
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for source in (tokenizer.eos_token_id, config_eos):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The KV-cache argument under its current name (`cache` since transformers 5.2x, else `past_key_values`)."""
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def forward(model: Any, ids: Tensor, cache: Any = None, last_only: bool = True) -> tuple[Tensor, Any]:
    """(logits [b, T or 1, vocab], the cache after the call) of one cached forward pass."""
    kwargs: dict[str, Any] = {"use_cache": True}
    if cache is not None:
        kwargs.update(cache_kwargs(model, cache))
    if last_only and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=ids, **kwargs)
    returned = getattr(out, "cache", None)
    returned = returned if returned is not None else out.past_key_values
    logits = out.logits[:, -1:] if last_only else out.logits
    return logits, returned


def _ended(tokenizer: Any, reply: list[int]) -> bool:
    """A newline after visible text ends a reply to a question."""
    return "\n" in tokenizer.decode(reply, skip_special_tokens=True).lstrip()


def greedy(loaded: Any, input_ids: Tensor, max_new_tokens: int, *, until: Until = "line",
           head_scale: Tensor | None = None, cache: Any = None,
           observe: Callable[[], Sequence[Observer]] | None = None,
           on_step: Callable[[int, Tensor, Sequence[Observer]], None] | None = None,
           after_prefill: Callable[[Tensor, Any], None] | None = None,
           prefill_chunk: int | None = None, edits: HeadEdits | None = None) -> Replies:
    """Greedy replies to input_ids [rows, T] (see the module docstring for the stop rule and hooks).

    on_step(step, tokens [rows], observers) sees every decoded token, end-of-sequence included.
    """
    if until not in UNTIL:
        raise HeadwiseError(f"unknown stop rule '{until}'; choose from {', '.join(UNTIL)}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise HeadwiseError("input_ids must be [rows, tokens] with at least one token")
    if max_new_tokens < 1:
        raise HeadwiseError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if observe is not None and after_prefill is not None:  # observing starts inside the prompt's last token
        raise HeadwiseError("after_prefill and observe cannot be combined: with observers the prompt's last token "
                            "is decoded as the first step")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise HeadwiseError(f"the prefill chunk must be at least 1 token, got {prefill_chunk}")
    geometry, model, tokenizer = loaded.geometry, loaded.model, loaded.tokenizer
    geometry.check_context(input_ids.shape[1] + max_new_tokens)
    ids = input_ids.to(loaded.device)
    rows = ids.shape[0]
    if head_scale is not None:
        head_scale = head_scale.to(loaded.device)
    stops = stop_ids(tokenizer, model) if until != "budget" else set()
    replies: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    # With observers, the last prompt token is decoded as step 0 so that its query is watched too.
    prompt = ids[:, :-1] if observe is not None and ids.shape[1] > 1 else ids
    pending = ids[:, -1:] if prompt.shape[1] < ids.shape[1] else None
    chunk = prefill_chunk or prompt.shape[1]
    logits = None
    with torch.inference_mode():
        t0 = time.perf_counter()
        with Session(geometry, head_scale=head_scale, edits=edits):
            for start in range(0, prompt.shape[1], chunk):
                logits, cache = forward(model, prompt[:, start:start + chunk], cache)
        t1 = time.perf_counter()
        if after_prefill is not None:
            after_prefill(logits[:, -1], cache)
        t_decode = time.perf_counter()
        for step in range(max_new_tokens):
            observers: Sequence[Observer] = observe() if observe is not None else ()
            if pending is not None:
                with Session(geometry, observers, head_scale=head_scale, edits=edits):
                    logits, cache = forward(model, pending, cache)
            tokens = logits[:, -1].argmax(-1)
            if on_step is not None:
                on_step(step, tokens, observers)
            for row, token in enumerate(tokens.tolist()):
                if done[row]:
                    continue
                if token in stops:
                    done[row] = True
                    continue
                replies[row].append(token)
                done[row] = until == "line" and _ended(tokenizer, replies[row])
            if all(done):
                break
            pending = tokens[:, None]
        t2 = time.perf_counter()
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in replies]
    return Replies(tokens=replies, texts=texts, prefill_seconds=t1 - t0, decode_seconds=t2 - t_decode, cache=cache)


__all__ = ["Replies", "UNTIL", "Until", "cache_kwargs", "forward", "greedy", "stop_ids"]
