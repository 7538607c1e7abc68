"""kv.block_sparse (+blocksK) against an explicit per-query loop of the pattern it defines."""

from __future__ import annotations

import math

import pytest
import torch

from headwise.kv.block_sparse import block_sparse_prefill_attention
from headwise.kv.streaming import StreamingKeys

BLOCK = 64


def _pattern_reference(query, keys, values, scaling, sink, window, blocks):
    """Each query head's query block reads its whole prefix if at most `blocks` key blocks lie wholly past the
    sinks and wholly before its first query's window; else sinks + the `blocks` of those blocks whose mean key
    best matches the block's mean query + each query's window. float64."""
    b, hq, m, d = query.shape
    g, n = hq // keys.shape[1], keys.shape[2]
    q, k, v = query.double(), keys.double(), values.double()
    out = torch.zeros(b, hq, m, d, dtype=torch.float64)
    for row in range(b):
        for h in range(hq):
            kh = h // g
            for qb in range(math.ceil(m / BLOCK)):
                t0, t1 = qb * BLOCK, min(m, qb * BLOCK + BLOCK)
                cands = [kj for kj in range(n // BLOCK)
                         if kj * BLOCK >= sink and (kj + 1) * BLOCK - 1 <= t0 - window]
                base = None  # the keys every query of the block reads besides its window (None: its prefix)
                if len(cands) > blocks:
                    q_mean = q[row, h, t0:t1].mean(0)
                    fit = {kj: float(q_mean @ k[row, kh, kj * BLOCK:(kj + 1) * BLOCK].mean(0)) for kj in cands}
                    chosen = sorted(cands, key=fit.__getitem__)[-blocks:]
                    picked = [j for kj in chosen for j in range(kj * BLOCK, (kj + 1) * BLOCK)]
                    base = torch.tensor([*range(sink), *picked])
                for t in range(t0, t1):
                    band = torch.arange(t - window + 1, t + 1)
                    seen = torch.arange(t + 1) if base is None else torch.cat([base, band])
                    w = torch.softmax(k[row, kh, seen] @ q[row, h, t] * scaling, 0)
                    out[row, h, t] = w @ v[row, kh, seen]
    return out


def _call(seed, m, n, g=2, n_kv=2, d=8, batch=1):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, n_kv * g, m, d, generator=gen)
    keys, values = torch.randn(batch, n_kv, n, d, generator=gen), torch.randn(batch, n_kv, n, d, generator=gen)
    return query, keys, values, StreamingKeys(keys, values, torch.arange(n), None, None, 0)


@pytest.mark.parametrize("path", ["fused", "flash", "portable"])  # the CPU's two kernels, other devices' path
@pytest.mark.parametrize(("m", "n", "sink", "window", "blocks"), [
    (450, 450, 5, 30, 2),  # ragged last block, several sparse blocks
    (400, 450, 0, 30, 2),  # a tail cut off (queries fewer than keys), no sinks
    (700, 700, 64, 100, 3),  # sinks a whole block; the window spans blocks
    (300, 300, 4, 256, 1),  # nothing sparse: every block reads its prefix
])
def test_block_sparse_prefill_matches_the_pattern(path, m, n, sink, window, blocks):
    query, keys, values, st = _call(seed=m + n + window, m=m, n=n, batch=2 if m == 450 else 1)
    out = block_sparse_prefill_attention(query, st, 0.3, sink, window, blocks, path=path)
    ref = _pattern_reference(query, keys, values, 0.3, sink, window, blocks)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


def test_block_sparse_prefill_differs_from_causal_and_from_the_band():
    """The sparse blocks are really dropped and really read (so the test above can fail)."""
    query, keys, values, st = _call(seed=3, m=450, n=450)
    out = block_sparse_prefill_attention(query, st, 0.3, 5, 30, 2).double()
    causal = torch.nn.functional.scaled_dot_product_attention(query, keys.repeat_interleave(2, 1),
                                                              values.repeat_interleave(2, 1), is_causal=True,
                                                              scale=0.3).double()
    everything = block_sparse_prefill_attention(query, st, 0.3, 5, 30, 100).double()
    torch.testing.assert_close(everything, causal, atol=1e-5, rtol=1e-5)
    assert (out[:, :, 320:] - causal[:, :, 320:]).abs().max() > 1e-2
    assert (out[:, :, 320:] - block_sparse_prefill_attention(query, st, 0.3, 5, 30, 1)[:, :, 320:]).abs().max() > 1e-2


@pytest.mark.parametrize("path", ["fused", "flash", "portable"])
def test_some_heads_of_a_strided_query_are_written_in_place(path):
    """As a mixed layer calls it: the model's [b, m, h, d] queries seen as [b, h, m, d], the streaming heads
    only (KV heads 0 and 2 of 3), written into the layer's output; the other heads' rows stay as they were."""
    gen = torch.Generator().manual_seed(5)
    m, n, g, d = 450, 450, 2, 8
    query = torch.randn(1, m, 3 * g, d, generator=gen).transpose(1, 2)  # not contiguous
    keys, values = torch.randn(1, 2, n, d, generator=gen), torch.randn(1, 2, n, d, generator=gen)
    heads = torch.tensor([0, 1, 4, 5])
    out = torch.full((1, 3 * g, m, d), 7.0)
    returned = block_sparse_prefill_attention(query, StreamingKeys(keys, values, torch.arange(n), None, None, 0), 0.3,
                                              5, 30, 2, heads=heads, out=out, path=path)
    assert returned is out
    ref = _pattern_reference(query[:, heads].contiguous(), keys, values, 0.3, 5, 30, 2)
    torch.testing.assert_close(out[:, heads].double(), ref, atol=2e-5, rtol=1e-5)
    assert (out[:, [2, 3]] == 7.0).all()

