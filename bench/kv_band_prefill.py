"""Streaming-head prefill: SDPA with the sink + window band as its mask vs an explicit float32 softmax.

    python bench/kv_band_prefill.py --out bench/results/kv_band_prefill.json

One chunk of 1024 queries of smollm2-135m's shape (2 KV heads x 3 query heads, head dim 64)
at position 7000, sinks 64 + window 256, through kv.streaming.streaming_heads_attention; the
baseline is the same band computed as matmul + masked softmax + matmul (what headwise did before
the SDPA path). Both are timed alternately in one process; the ratio of medians is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from headwise.atlas import versions
    from headwise.instrument import sink_window_mask
    from headwise.kv.streaming import StreamingKeys, streaming_heads_attention

    torch.set_num_threads(args.threads)
    b, n_kv, g, d, m, sink, window, q0 = 1, 2, 3, 64, 1024, 64, 256, 7000
    gen = torch.Generator().manual_seed(0)
    positions = torch.cat([torch.arange(sink), torch.arange(q0 - window, q0 + m)])
    st = StreamingKeys(torch.randn(b, n_kv, len(positions), d, generator=gen),
                       torch.randn(b, n_kv, len(positions), d, generator=gen), positions, None, None, 0)
    query = torch.randn(b, n_kv * g, m, d, generator=gen)
    scaling = d ** -0.5

    def explicit() -> torch.Tensor:
        allowed = sink_window_mask(torch.arange(q0, q0 + m), positions, sink, window)
        scores = torch.matmul(query.reshape(b, n_kv, g, m, d), st.keys[:, :, None].transpose(-1, -2)) * scaling
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        return torch.matmul(probs, st.values[:, :, None]).reshape(b, n_kv * g, m, d)

    def sdpa() -> torch.Tensor:
        return streaming_heads_attention(query, st, scaling, q0, sink, window, compensate=False)

    times = {"explicit": [], "sdpa": []}
    for _ in range(args.rounds):
        for name, fn in (("explicit", explicit), ("sdpa", sdpa)):
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            if name == "explicit":
                ref = out
    max_diff = float((out - ref).abs().max())
    result = {"versions": versions(), "args": vars(args), "shape": {"queries": m, "kv_heads": n_kv, "group": g,
                                                                    "head_dim": d, "sink": sink, "window": window,
                                                                    "query_start": q0},
              "seconds": times, "median_ms": {k: statistics.median(v) * 1000 for k, v in times.items()},
              "speedup_median": statistics.median(times["explicit"]) / statistics.median(times["sdpa"]),
              "max_abs_difference": max_diff}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("median_ms", "speedup_median", "max_abs_difference")}))


if __name__ == "__main__":
    main()
