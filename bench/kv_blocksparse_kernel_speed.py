"""Speed of a block-sparse attention kernel for streaming heads against SDPA's causal one, on random tensors shaped
like one smollm2 layer's streaming heads at 8K (an experiment: headwise has no block-sparse prefill mode).

    python bench/kv_blocksparse_kernel_speed.py --out bench/results/kv_blocksparse_kernel_speed.json

The kernel: one choice of K key blocks (64 tokens) per KV head and query block, by pooled mean query . mean key;
each query block reads sinks + its K blocks + its local band through one SDPA call per chunk of blocks, with one
[64, keys] mask shared by every block (no per-head masks); query blocks with fewer than K candidate blocks read
the prefix causally. Reported: median CPU seconds of each over --repeats calls, the ratio to the causal SDPA, and
the largest difference from kv_prefill_blocks_probe.py's dense masked attention with the same choice (2,048 tokens).
The prefill-level consequence is arithmetic on bench/kv_prefill_speed.py's split (see RESULTS).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from kv_prefill_blocks_probe import BLOCK, block_sparse_prefill, candidate_blocks


def _first_sparse_block(candidate: torch.Tensor, blocks: int) -> int:
    """The first query block with `blocks` candidates; earlier ones read their prefix causally."""
    return int((candidate.sum(1) >= blocks).nonzero()[0])


def block_sparse_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, sink: int,
                           window: int, blocks: int, chunk: int = 32) -> torch.Tensor:
    """[b, hq, n, d] queries over [b, kv, n, d] keys at positions 0 .. n - 1 (n a multiple of 64)."""
    b, hq, n, d = query.shape
    kv = keys.shape[1]
    g, nb = hq // kv, n // BLOCK
    k_mean = keys.reshape(b, kv, nb, BLOCK, d).mean(3)
    q_mean = query.reshape(b, kv, g, nb, BLOCK, d).mean(4).mean(2)  # pooled over the group: one choice per KV head
    candidate = candidate_blocks(nb, sink, window)
    first = _first_sparse_block(candidate, blocks)
    top = (q_mean @ k_mean.transpose(-1, -2)).masked_fill(~candidate, float("-inf")).topk(blocks, -1).indices
    out = torch.empty_like(query)
    e0 = first * BLOCK
    out[:, :, :e0] = F.scaled_dot_product_attention(query[:, :, :e0], keys[:, :, :e0], values[:, :, :e0],
                                                    is_causal=True, scale=scaling, enable_gqa=True)
    kb, vb = keys.reshape(b, kv, nb, BLOCK, d), values.reshape(b, kv, nb, BLOCK, d)
    span = window + BLOCK  # the local band of a query block: its window before it and itself
    t, j = torch.arange(BLOCK)[:, None] + window, torch.arange(span)[None]
    mask = torch.cat([torch.ones(BLOCK, sink + blocks * BLOCK, dtype=torch.bool), (j <= t) & (j > t - window)], 1)
    for c0 in range(first, nb, chunk):
        c1 = min(nb, c0 + chunk)
        c = c1 - c0
        pick = top[:, :, c0:c1].reshape(b, kv, -1, 1, 1).expand(-1, -1, -1, BLOCK, d)
        local = torch.arange(c0, c1)[:, None] * BLOCK - window + torch.arange(span)[None]  # [c, span]
        kk, vv = (torch.cat([x[:, :, None, :sink].expand(-1, -1, c, -1, -1),
                             xb.gather(2, pick).reshape(b, kv, c, blocks * BLOCK, d), x[:, :, local]], 3)
                  for x, xb in ((keys, kb), (values, vb)))
        qq = query[:, :, c0 * BLOCK:c1 * BLOCK].reshape(b, kv, g, c, BLOCK, d).transpose(2, 3)
        o = F.scaled_dot_product_attention(qq.reshape(b * kv * c, g, BLOCK, d),
                                           kk.reshape(b * kv * c, 1, -1, d).expand(-1, g, -1, -1),
                                           vv.reshape(b * kv * c, 1, -1, d).expand(-1, g, -1, -1),
                                           attn_mask=mask, scale=scaling)
        out[:, :, c0 * BLOCK:c1 * BLOCK] = o.reshape(b, kv, c, g, BLOCK, d).transpose(2, 3).reshape(b, hq, c * BLOCK, d)
    return out


def dense_check(sink: int, window: int, blocks: int, seed: int, n: int = 2048) -> float:
    """Largest difference from the probe's dense masked attention with the same per-KV-head choice, on the query
    blocks that read `blocks` key blocks (the earlier ones read their prefix causally here)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 6, n, 64, generator=gen)
    k, v = torch.randn(1, 2, n, 64, generator=gen), torch.randn(1, 2, n, 64, generator=gen)
    out = block_sparse_attention(q, k, v, 0.125, sink, window, blocks)
    ref = block_sparse_prefill(q, SimpleNamespace(keys=k, values=v), 0.125, sink, window, blocks, per_kv_head=True)
    first = _first_sparse_block(candidate_blocks(n // BLOCK, sink, window), blocks) * BLOCK
    return float((out[:, :, first:] - ref[:, :, first:]).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=8192, help="a multiple of 64")
    ap.add_argument("--query-heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--blocks", default="8,16")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    n, d = args.context, 64
    q = torch.randn(1, args.query_heads, n, d)
    k, v = torch.randn(1, args.kv_heads, n, d), torch.randn(1, args.kv_heads, n, d)
    runs = {"causal_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d ** -0.5,
                                                                   enable_gqa=True)}
    for blocks in (int(x) for x in args.blocks.split(",")):
        runs[f"blocks{blocks}"] = lambda b=blocks: block_sparse_attention(q, k, v, d ** -0.5, args.sink, args.window, b)
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(args.repeats):  # interleaved, so drift hits every kernel alike
        for name, run in runs.items():
            c = time.process_time()
            run()
            cpu[name].append(time.process_time() - c)
    base = statistics.median(cpu["causal_sdpa"])
    check = {f"blocks{b}": dense_check(args.sink, args.window, int(b), args.seed) for b in args.blocks.split(",")}
    out = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "max_abs_diff_vs_dense_masked": check,
           "kernels": {name: {"cpu_s": [round(x, 4) for x in xs], "cpu_s_median": round(statistics.median(xs), 4),
                              "vs_causal_sdpa": round(statistics.median(xs) / base, 3)} for name, xs in cpu.items()}}
    for name, row in out["kernels"].items():
        print(name, row["cpu_s_median"], f"{row['vs_causal_sdpa']:.2f} of causal SDPA")
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
