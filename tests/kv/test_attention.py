"""kv.attention's chunked band attention against the explicit per-query reference."""

from __future__ import annotations

import pytest
import torch

from headwise.kv.streaming import StreamingKeys, streaming_heads_attention, strided_prefill_attention
from tests.reference import naive_sink_window_attention


def _prompt_call(seed: int, g: int, n_kv: int = 2, t: int = 40, d: int = 8):
    """A prompt's first call: random queries [1, n_kv * g, t, d] and the keys/values it stores."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(1, n_kv * g, t, d, generator=gen)
    keys = torch.randn(1, n_kv, t, d, generator=gen)
    values = torch.randn(1, n_kv, t, d, generator=gen)
    return query, keys, values, StreamingKeys(keys, values, torch.arange(t), None, None, 0)


@pytest.mark.parametrize("compensate", [False, True])
@pytest.mark.parametrize("chunk_bytes", [1, 4000, 1 << 30])  # one query per chunk, a few chunks, one chunk
def test_prefill_band_attention_in_query_chunks_matches_reference(compensate, chunk_bytes):
    g, sink, window = 3, 3, 7
    query, keys, values, st = _prompt_call(seed=0, g=g)
    out = streaming_heads_attention(query, st, 0.35, query_start=0, sink=sink, window=window, compensate=compensate,
                                    chunk_bytes=chunk_bytes)
    ref = naive_sink_window_attention(query, keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1), 0.35,
                                      sink, window, compensate)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_bytes", [1, 4000, 1 << 30])
@pytest.mark.parametrize("stride", [1, 4, 100])  # every token (causal), a stride, none past the window (bounded)
def test_strided_prefill_in_query_chunks_matches_reference(chunk_bytes, stride):
    """Chunks that end inside the sinks, chunk seams and both ends of the stride, against the per-query loop."""
    g, sink, window = 3, 5, 6
    query, keys, values, st = _prompt_call(seed=1, g=g)
    out = strided_prefill_attention(query, st, 0.35, sink=sink, window=window, stride=stride, chunk_bytes=chunk_bytes)
    ref = naive_sink_window_attention(query, keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1), 0.35,
                                      sink, window, whole_calls=[(0, query.shape[2])], tail=0, stride=stride)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
