"""Why the block-sparse prefill gains nothing in bfloat16 on CPU: the cost per query-key pair of PyTorch's CPU
attention kernels by call shape and dtype, on random tensors shaped like smollm2's heads (d = 64).

    HEADWISE_THREADS=1 python bench/kv_cpu_attention_kernels.py --out bench/results/kv_cpu_attention_kernels.json

Measured (best of --repeats, CPU seconds, one thread unless HEADWISE_THREADS says otherwise):
- SDPA's flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`, what block_sparse.py calls) on a
  fixed number of query-key pairs cut into calls of 64 to 8192 queries, in float32 and bfloat16;
- the causal 8K call of 9 query heads over 3 KV heads (the full cache's prefill of one layer);
- flex_attention (torch.compile) on the same shape with MInference's block-sparse mask (64-token blocks:
  sinks, window and 16 random earlier blocks per query block and head), the fused alternative.
ns per pair = seconds / query-key pairs computed (for the causal and block-sparse calls: the pairs the mask keeps).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _kv_setup import use_threads_from_env


def best(f, repeats: int) -> float:
    f()
    out = []
    for _ in range(repeats):
        c = time.process_time()
        f()
        out.append(time.process_time() - c)
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    use_threads_from_env()
    from headwise.atlas import versions

    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for calls, queries in ((1152, 64), (576, 128), (384, 192), (144, 512), (72, 1024)):
            qs = torch.randn(calls, 1, queries, 64, generator=gen).to(dtype)
            ks = torch.randn(calls, 1, 1024, 64, generator=gen).to(dtype)
            s = best(lambda qs=qs, ks=ks: flash(qs, ks, ks, scale=0.125), args.repeats)
            pairs = calls * queries * 1024
            rows.append({"kernel": "flash_for_cpu", "dtype": str(dtype)[6:], "calls": calls, "queries": queries,
                         "keys": 1024, "cpu_s": round(s, 4), "ns_per_pair": round(s / pairs * 1e9, 3)})
    n, hq, kv, block = 8192, 9, 3, 64
    q, k, v = (torch.randn(1, h, n, 64, generator=gen).to(torch.bfloat16) for h in (hq, kv, kv))
    s = best(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), args.repeats)
    pairs = hq * n * (n + 1) // 2
    rows.append({"kernel": "sdpa_causal", "dtype": "bfloat16", "queries": n, "heads": hq, "cpu_s": round(s, 4),
                 "ns_per_pair": round(s / pairs * 1e9, 3)})
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    nb = n // block
    picked = torch.zeros(hq, nb, nb, dtype=torch.bool)
    for h in range(hq):
        for qb in range(nb):
            cand = torch.arange(1, max(1, qb - 4))  # past the sink block, before the window's 4 blocks
            picked[h, qb, cand[torch.randperm(len(cand), generator=gen)[:16]]] = True

    def keep(b, h, qi, ki):
        return (qi >= ki) & ((ki < 64) | (qi - ki < 256) | picked[h, qi // block, ki // block])

    mask = create_block_mask(keep, 1, hq, n, n, device="cpu", BLOCK_SIZE=block)
    dense = torch.ones(n, n, dtype=torch.bool).tril()
    kept = sum(int((dense & ((torch.arange(n)[None] < 64) | (torch.arange(n)[:, None] - torch.arange(n)[None] < 256)
                             | picked[h].repeat_interleave(block, 0).repeat_interleave(block, 1))).sum())
               for h in range(hq))
    compiled = torch.compile(flex_attention)
    s = best(lambda: compiled(q, k, v, block_mask=mask, enable_gqa=True), args.repeats)
    rows.append({"kernel": "flex_attention_block_sparse", "dtype": "bfloat16", "queries": n, "heads": hq,
                 "block": block, "picked_blocks": 16, "cpu_s": round(s, 4), "ns_per_pair": round(s / kept * 1e9, 3),
                 "kept_pairs_share_of_causal": round(kept / pairs, 4)})
    for r in rows:
        print(r)
    Path(args.out).write_text(json.dumps({"versions": versions(), "torch_threads": torch.get_num_threads(),
                                          "args": vars(args), "rows": rows}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
