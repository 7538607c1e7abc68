"""SnapKV: selection against an explicit loop, real eviction, same framework as the head policies."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import headwise
from headwise.kv import HeadwiseCache, SnapKVPolicy
from headwise.kv.generate import generate
from headwise.kv.snapkv import snapkv_select
from tests.conftest import tiny_model, tiny_tokenizer


def _reference(query_obs, keys, scaling, keep, window, kernel):
    b, hq, w, d = query_obs.shape
    n_kv, t = keys.shape[1], keys.shape[2]
    g = hq // n_kv
    out = torch.zeros(b, n_kv, keep, dtype=torch.long)
    for bi in range(b):
        for kv in range(n_kv):
            votes = torch.zeros(t - w, dtype=torch.float64)
            for h in range(kv * g, (kv + 1) * g):
                for i in range(w):
                    pos = t - w + i
                    logits = torch.stack([query_obs[bi, h, i].double() @ keys[bi, kv, j].double() * scaling
                                          for j in range(pos + 1)])
                    votes += torch.softmax(logits, 0)[:t - w] / g
            pooled = F.avg_pool1d(votes[None, None].float(), kernel, padding=kernel // 2, stride=1,
                                  count_include_pad=False)[0, 0]
            top = sorted(pooled.topk(keep - w).indices.tolist() + list(range(t - w, t)))
            out[bi, kv] = torch.tensor(top)
    return out


def test_selection_matches_explicit_loop():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, 8, generator=gen) * 2
    k = torch.randn(1, 2, 30, 8, generator=gen) * 2
    got = snapkv_select(q, k, 8 ** -0.5, keep=12, window=5, kernel=3)
    assert torch.equal(got, _reference(q, k, 8 ** -0.5, 12, 5, 3))


def test_snapkv_cache_evicts_for_real():
    lm = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer())
    g = lm.geometry
    policy = SnapKVPolicy(g, budget=0.25, observation=4, kernel=3)
    ids = torch.randint(3, 96, (1, 64), generator=torch.Generator().manual_seed(1))
    res = generate(lm, ids, policy, max_new_tokens=4, until="budget", answer_ids=[5, 7, 9])
    assert len(res.answer_logprobs) == 3  # the teacher-forced answer goes in token by token, on a copy
    per_token = 2 * g.head_dim * 4 * g.n_kv_heads * g.n_layers
    assert res.kv_bytes == per_token * (16 + 4)  # 16 kept prompt tokens + room for the 4 new ones (3 stored)
    cache = HeadwiseCache(policy)
    with torch.no_grad():
        lm.model(input_ids=ids, cache=cache, use_cache=True)
    assert cache.layers[0].store.k.shape[2] == 16 and cache.get_seq_length() == 64
