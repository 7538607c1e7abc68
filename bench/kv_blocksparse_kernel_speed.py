"""Speed of headwise's block-sparse prefill kernels for streaming heads (`+blocksK`,
src/headwise/kv/block_sparse.py) against SDPA's causal one, on random tensors shaped like one smollm2 layer's
streaming heads at 8K: the fused CPU kernel (block_sparse_cpu.cpp, the default) and the PyTorch path (SDPA's
flash kernel per query block, the fallback), side by side.

    python bench/kv_blocksparse_kernel_speed.py --dtype bfloat16 \
        --out bench/results/kv_blocksparse_kernel_speed_bf16.json

Reported: median CPU seconds of each over --repeats calls (interleaved), the ratio to the causal SDPA, and the
largest difference from kv_prefill_blocks_probe.py's dense masked attention (the same pattern as a mask on a
dense SDPA, in float32) on 2,048 tokens, over the query blocks the pattern makes sparse. The prefill-level
figure is bench/kv_prefill_speed.py's.
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
from _kv_setup import use_threads_from_env
from kv_prefill_blocks_probe import block_sparse_prefill

from headwise.atlas import versions
from headwise.kv.block_sparse import BLOCK, block_sparse_prefill_attention, candidate_blocks


def dense_check(sink: int, window: int, blocks: int, seed: int, dtype: torch.dtype, path: str, n: int = 2048) -> float:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 6, n, 64, generator=gen)
    st = SimpleNamespace(keys=torch.randn(1, 2, n, 64, generator=gen), values=torch.randn(1, 2, n, 64, generator=gen))
    low = SimpleNamespace(keys=st.keys.to(dtype), values=st.values.to(dtype))
    out = block_sparse_prefill_attention(q.to(dtype), low, 0.125, sink, window, blocks, path=path).float()
    ref = block_sparse_prefill(q, st, 0.125, sink, window, blocks)
    first = int((candidate_blocks(n // BLOCK, sink, window).sum(1) > blocks).nonzero()[0]) * BLOCK
    return float((out[:, :, first:] - ref[:, :, first:]).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--query-heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--blocks", default="8,16")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    use_threads_from_env()
    torch.manual_seed(args.seed)
    n, d, dtype = args.context, 64, getattr(torch, args.dtype)
    q = torch.randn(1, args.query_heads, n, d).to(dtype)
    st = SimpleNamespace(keys=torch.randn(1, args.kv_heads, n, d).to(dtype),
                         values=torch.randn(1, args.kv_heads, n, d).to(dtype))
    runs = {"causal_sdpa": lambda: F.scaled_dot_product_attention(q, st.keys, st.values, is_causal=True,
                                                                   scale=d ** -0.5, enable_gqa=True)}
    paths = ("fused", "flash")
    for blocks in (int(x) for x in args.blocks.split(",")):
        for path in paths:
            runs[f"blocks{blocks}_{path}"] = lambda b=blocks, p=path: block_sparse_prefill_attention(
                q, st, d ** -0.5, args.sink, args.window, b, path=p)
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(args.repeats):  # interleaved, so drift hits every kernel alike
        for name, run in runs.items():
            c = time.process_time()
            run()
            cpu[name].append(time.process_time() - c)
    base = statistics.median(cpu["causal_sdpa"])
    check = {f"blocks{b}_{p}": dense_check(args.sink, args.window, int(b), args.seed, dtype, p)
             for b in args.blocks.split(",") for p in paths}
    out = {"args": vars(args), "versions": versions(), "threads": torch.get_num_threads(),
           "max_abs_diff_vs_dense_masked": check,
           "kernels": {name: {"cpu_s": [round(x, 4) for x in xs], "cpu_s_median": round(statistics.median(xs), 4),
                              "vs_causal_sdpa": round(statistics.median(xs) / base, 3)} for name, xs in cpu.items()}}
    for name, row in out["kernels"].items():
        print(name, row["cpu_s_median"], f"{row['vs_causal_sdpa']:.2f} of causal SDPA")
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
