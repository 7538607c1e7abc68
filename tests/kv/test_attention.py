"""kv.attention's chunked band attention against the explicit per-query reference."""

from __future__ import annotations

import pytest
import torch

from headwise.kv.streaming import StreamingKeys, streaming_heads_attention
from tests.reference import naive_sink_window_attention


@pytest.mark.parametrize("compensate", [False, True])
@pytest.mark.parametrize("chunk_bytes", [1, 4000, 1 << 30])  # one query per chunk, a few chunks, one chunk
def test_prefill_band_attention_in_query_chunks_matches_reference(compensate, chunk_bytes):
    gen = torch.Generator().manual_seed(0)
    b, n_kv, g, t, d, sink, window = 1, 2, 3, 40, 8, 3, 7
    query = torch.randn(b, n_kv * g, t, d, generator=gen)
    keys = torch.randn(b, n_kv, t, d, generator=gen)
    values = torch.randn(b, n_kv, t, d, generator=gen)
    st = StreamingKeys(keys, values, torch.arange(t), None, None, 0)
    out = streaming_heads_attention(query, st, 0.35, query_start=0, sink=sink, window=window, compensate=compensate,
                                    chunk_bytes=chunk_bytes)
    ref = naive_sink_window_attention(query, keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1), 0.35,
                                      sink, window, compensate)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
