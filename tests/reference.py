"""Naive reference implementations, written from the papers' definitions with explicit loops
over eager attention weights (transformers' own `output_attentions`), to check headwise's
chunked, vectorised observers against."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def eager_attentions(model, input_ids: torch.Tensor) -> list[np.ndarray]:
    """Per layer [batch, heads, T, T] attention probabilities from eager attention."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation("headwise")
    return [a.double().numpy() for a in out.attentions]


# --- TransformerLens head detector, transcribed (transformer_lens/head_detector.py) ---------
def tl_previous_token_pattern(tokens: np.ndarray) -> np.ndarray:
    n = len(tokens)
    p = np.zeros((n, n))
    p[1:, :-1] = np.eye(n - 1)
    return np.tril(p)


def tl_duplicate_token_pattern(tokens: np.ndarray) -> np.ndarray:
    token_pattern = np.tile(tokens, (len(tokens), 1))
    eq = np.equal(token_pattern, token_pattern.T).astype(int)
    np.fill_diagonal(eq, 0)
    return np.tril(eq.astype(float))


def tl_induction_pattern(tokens: np.ndarray) -> np.ndarray:
    dup = tl_duplicate_token_pattern(tokens)
    shifted = np.roll(dup, 1, axis=1)
    shifted[:, 0] = 0
    return np.tril(shifted)


def tl_score(attn: np.ndarray, pattern: np.ndarray, exclude_bos: bool, exclude_current: bool) -> float:
    attn = attn.copy()
    if exclude_bos:
        attn[:, 0] = 0
    if exclude_current:
        np.fill_diagonal(attn, 0)
    return float((attn * pattern).sum() / attn.sum())


def tl_scores(atts, input_ids, which: str, exclude_bos=False, exclude_current=False) -> np.ndarray:
    make = {"previous_token": tl_previous_token_pattern, "duplicate_token": tl_duplicate_token_pattern,
            "induction": tl_induction_pattern}[which]
    n_layers, (n_seq, n_heads) = len(atts), atts[0].shape[:2]
    out = np.zeros((n_seq, n_layers, n_heads))
    for b in range(n_seq):
        pattern = make(input_ids[b].numpy())
        for layer in range(n_layers):
            for head in range(n_heads):
                out[b, layer, head] = tl_score(atts[layer][b, head], pattern, exclude_bos, exclude_current)
    return out.mean(0)


# --- RazorAttention echo / induction --------------------------------------------------------
def razor_scores(atts, input_ids) -> tuple[np.ndarray, np.ndarray]:
    n_layers, (n_seq, n_heads) = len(atts), atts[0].shape[:2]
    echo = np.zeros((n_seq, n_layers, n_heads))
    ind = np.zeros((n_seq, n_layers, n_heads))
    for b in range(n_seq):
        tok = input_ids[b].tolist()
        queries = [i for i in range(len(tok)) if tok[i] in tok[:i]]
        for layer in range(n_layers):
            for head in range(n_heads):
                a = atts[layer][b, head]
                e = [sum(a[i, j] for j in range(i) if tok[j] == tok[i]) for i in queries]
                n = [sum(a[i, j] for j in range(1, i + 1) if tok[j - 1] == tok[i] and j - 1 < i) for i in queries]
                echo[b, layer, head], ind[b, layer, head] = np.mean(e), np.mean(n)
    return echo.mean(0), ind.mean(0)


# --- sink, streaming, distance --------------------------------------------------------------
def per_head(atts, fn) -> np.ndarray:
    n_layers, (n_seq, n_heads) = len(atts), atts[0].shape[:2]
    out = np.array([[[fn(atts[layer][b, head]) for head in range(n_heads)] for layer in range(n_layers)]
                    for b in range(n_seq)])
    return out.mean(0)


def sink(a: np.ndarray) -> float:
    return float(np.mean([a[i, 0] for i in range(len(a))]))


def streamable(a: np.ndarray, s: int, w: int) -> float:
    vals = []
    for i in range(s + w, len(a)):
        vals.append(sum(a[i, j] for j in range(i + 1) if j < s or j > i - w))
    return float(np.mean(vals))


def distance_profile(a: np.ndarray, bins: list[tuple[int, int]]) -> np.ndarray:
    prof = np.zeros(len(bins))
    for i in range(len(a)):
        for j in range(i + 1):
            d = i - j
            for k, (lo, hi) in enumerate(bins):
                if lo <= d <= hi:
                    prof[k] += a[i, j]
    return prof / len(a)


def mean_distance(a: np.ndarray) -> float:
    return float(np.mean([sum(a[i, j] * (i - j) for j in range(i + 1)) for i in range(len(a))]))


def entropy(a: np.ndarray) -> float:
    return float(np.mean([-sum(p * np.log(p) for p in a[i, : i + 1] if p > 0) for i in range(len(a))]))


# --- the streaming heads of the KV cache ---------------------------------------------------
def naive_sink_window_attention(query: Tensor, keys: Tensor, values: Tensor, scaling: float, sink: int, window: int,
                                compensate: bool = False, whole_calls: list[tuple[int, int]] = (),
                                middle: tuple[int, ...] = (), tail: int | None = None, stride: int = 0) -> Tensor:
    """Reference: each query at position t (t = index, all keys given) in an explicit loop. [b, h, T, d].

    For tests: no chunking, no cache, no prefix sums. keys/values already expanded to the
    query heads. `whole_calls`: (start, end) of the multi-token calls of a whole-prompt
    prefill, whose queries see sinks, the `window` tokens before `start`, and the call itself.
    `middle`: positions every query after the first call also sees (Policy.middle). `tail`: the
    tail prefill: in the first call only its last `tail` queries see everything, the others their window
    (None: every query of the first call sees everything), and with `stride` also positions sink + stride - 1,
    sink + 2 stride - 1, ...
    """
    b, h, t, d = query.shape
    out = torch.zeros(b, h, t, d, dtype=torch.float64)
    q, k, v = query.double(), keys.double(), values.double()
    first_end = whole_calls[0][1] if whole_calls else 0
    for i in range(t):
        start = next((s for s, e in whole_calls if s <= i < e), None)
        if tail is not None and i < first_end:
            start = 0 if i >= first_end - tail else None
        lo = i - window + 1 if start is None else start - window
        kept = middle if i >= first_end else ()
        strided = stride and tail is not None and i < first_end and start is None
        keep = [j for j in range(i + 1) if j < sink or j >= lo or j in kept
                or (strided and (j - sink) % stride == stride - 1)]
        dropped = [j for j in range(i + 1) if j not in keep]
        logits = torch.einsum("bhd,bhkd->bhk", q[:, :, i], k[:, :, keep]) * scaling
        vals = v[:, :, keep]
        if compensate and dropped:
            k_hat, v_hat = k[:, :, dropped].mean(2), v[:, :, dropped].mean(2)
            extra = torch.einsum("bhd,bhd->bh", q[:, :, i], k_hat) * scaling + math.log(len(dropped))
            logits = torch.cat([logits, extra[..., None]], -1)
            vals = torch.cat([vals, v_hat[:, :, None]], 2)
        out[:, :, i] = torch.einsum("bhk,bhkd->bhd", torch.softmax(logits, -1), vals)
    return out


# --- CompressKV's token vote ------------------------------------------------------------------
def naive_srh_votes(q: Tensor, k: Tensor, scaling: float, kernel: int, heads: list[int]) -> Tensor:
    """Each selected query head's softmax over its KV head, summed over the window queries and pooled, then
    averaged over the heads: one loop per query and key. q [1, hq, w, d] (the last w queries), k [1, kv, t, d];
    votes for the t - w tokens before the window."""
    _, hq, w, _ = q.shape
    t, group = k.shape[2], hq // k.shape[1]
    total = torch.zeros(t - w, dtype=torch.float64)
    for h in heads:
        votes = torch.zeros(t - w, dtype=torch.float64)
        for i in range(w):
            pos = t - w + i
            logits = torch.stack([q[0, h, i].double() @ k[0, h // group, j].double() * scaling
                                  for j in range(pos + 1)])
            votes += torch.softmax(logits, 0)[:t - w]
        total += F.avg_pool1d(votes[None, None], kernel, padding=kernel // 2, stride=1,
                              count_include_pad=False)[0, 0] / len(heads)
    return total


def naive_srh_select(q: Tensor, k: Tensor, scaling: float, keep: int, kernel: int, heads: list[int]) -> list[int]:
    """The `keep` positions kept: the window itself plus the top keep - w by naive_srh_votes, sorted."""
    t, w = k.shape[2], q.shape[2]
    top = naive_srh_votes(q, k, scaling, kernel, heads).topk(keep - w).indices.tolist()
    return sorted(top + list(range(t - w, t)))
