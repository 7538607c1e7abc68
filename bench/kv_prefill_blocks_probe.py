"""Development probe of MInference-style block-sparse attention for the streaming heads (Jiang et al., arXiv
2407.02490, its block-sparse pattern), checked for accuracy only; headwise's own kernel for it is `+blocksK`
(src/headwise/kv/block_sparse.py), written after this probe.

    python bench/kv_prefill_blocks_probe.py --atlas bench/results/atlas-smollm2-duo4k.json --prompts 97:0.9,99:0.5 \
        --blocks 4,8,16 --out bench/results/kv_prefill_blocks_dev.json

Each streaming-head prompt query at t sees its sinks, its window and the K key blocks (64 tokens each) that its
query block picks: the blocks whole before the block's first window whose mean key has the largest dot product
with the block's mean query, per query head. Every other prompt query of the full heads reads the whole prompt.
The mask is applied to a dense SDPA (so its CPU time says nothing about the mode's speed): this only asks whether
the pattern keeps the first reply token. It runs kv_prefill_probe.py with that attention in place of +strideK's.
With `--per-kv-head mean` each KV head's blocks are chosen once from its group's pooled mean query (cheaper to
gather; it lost a development prompt); `--per-kv-head rank` takes the blocks best ranked by any of its query heads.

With `--eval ARGS...` it runs `headwise eval ARGS` instead, with the same attention in place of +strideK's, so
held-out passkey prompts can be answered greedily under the pattern (`+strideK` in a policy there means K blocks;
the output's specs are renamed `+blocksK(dense check)`):

    python bench/kv_prefill_blocks_probe.py --eval --model smollm2-135m --atlas A \
        --policies full,headwise:duo@kv0.1667+stride16+mid64 --tasks passkey --contexts 8176 ... --out OUT
"""

from __future__ import annotations

import argparse
import functools
import json
import runpy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from headwise.kv.block_sparse import BLOCK, candidate_blocks


def block_sparse_prefill(query, st, scaling, sink, window, blocks, per_kv_head=None):
    """`per_kv_head`: one choice per KV head instead of one per query head: "mean" from the group's pooled
    mean query; "rank" the blocks best ranked by any of the group's query heads (each head's first choice, then
    each head's second, ...; ties by the pooled query's ranking)."""
    b, hq, m, d = query.shape
    keys, values = st.keys.to(query.dtype), st.values.to(query.dtype)
    n, kv = keys.shape[2], keys.shape[1]
    g, nb = hq // kv, (n + BLOCK - 1) // BLOCK
    k_mean = F.pad(keys, (0, 0, 0, nb * BLOCK - n)).reshape(b, kv, nb, BLOCK, d).mean(3)
    q_mean = F.pad(query, (0, 0, 0, nb * BLOCK - m)).reshape(b, hq, nb, BLOCK, d).mean(3)
    candidate = candidate_blocks(nb, sink, window)

    def fit(q):  # [b, h, nbq, nbk], non-candidates -inf
        return torch.matmul(q, k_mean.repeat_interleave(q.shape[1] // kv, 1).transpose(-1, -2)).masked_fill(
            ~candidate, float("-inf"))

    def ranks(x):  # 0 = best
        return x.argsort(-1, descending=True).argsort(-1)

    pooled = q_mean.reshape(b, kv, g, nb, d).mean(2)
    if per_kv_head == "mean":
        scores = fit(pooled).repeat_interleave(g, 1)
    elif per_kv_head == "rank":
        best = ranks(fit(q_mean)).reshape(b, kv, g, nb, nb).amin(2)
        scores = (-(best * nb + ranks(fit(pooled))).float()).masked_fill(~candidate, float("-inf"))
        scores = scores.repeat_interleave(g, 1)
    else:
        scores = fit(q_mean)
    top = scores.topk(min(blocks, nb), -1)
    chosen = torch.zeros(b, hq, nb, nb, dtype=torch.bool).scatter_(-1, top.indices, torch.isfinite(top.values))
    out, j = torch.empty_like(query), torch.arange(n)
    for a in range(0, m, 512):
        e = min(m, a + 512)
        t = torch.arange(a, e)[:, None]
        causal = j[None] <= t
        band = causal & ((j[None] < sink) | (j[None] > t - window))
        mask = band[None, None] | (chosen[:, :, t[:, 0] // BLOCK][..., j // BLOCK] & causal[None, None])
        out[:, :, a:e] = F.scaled_dot_product_attention(query[:, :, a:e], keys, values, attn_mask=mask,
                                                         scale=scaling, enable_gqa=hq != kv)
    return out


def _eval(argv: list[str]) -> None:
    import headwise.kv.mixed as mixed
    from headwise.cli import main as cli_main

    mixed.strided_prefill_attention = block_sparse_prefill
    code = cli_main(["eval", *argv])
    out = Path(argv[argv.index("--out") + 1])
    out.write_text(out.read_text(encoding="utf-8").replace("+stride", "+blocks(dense check)"), encoding="utf-8")
    raise SystemExit(code)


def main() -> None:
    if sys.argv[1:2] == ["--eval"]:
        _eval(sys.argv[2:])
    ap = argparse.ArgumentParser()
    ap.add_argument("--atlas", required=True)
    ap.add_argument("--prompts", required=True, help="SEED:DEPTH,... (development seeds only)")
    ap.add_argument("--budget", default="kv0.3333")
    ap.add_argument("--blocks", default="4,8,16")
    ap.add_argument("--per-kv-head", choices=("mean", "rank"),
                    help="one block choice per KV head: from the pooled query, or by the group's best ranks")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import headwise.kv.mixed as mixed

    # the +strideK path, K read as blocks
    mixed.strided_prefill_attention = functools.partial(block_sparse_prefill, per_kv_head=args.per_kv_head)
    specs = ["full"] + [f"headwise:duo@{args.budget}+stride{k}+mid64" for k in args.blocks.split(",")]
    sys.argv = ["kv_prefill_probe.py", "--atlas", args.atlas, "--prompts", args.prompts, "--specs", ",".join(specs),
                "--out", args.out]
    runpy.run_path(str(Path(__file__).with_name("kv_prefill_probe.py")), run_name="__main__")
    out = json.loads(Path(args.out).read_text(encoding="utf-8"))
    for row in out["rows"]:  # say what ran: block-sparse, not a stride
        per_kv = f", per KV head by {args.per_kv_head})" if args.per_kv_head else ")"
        row["spec"] = row["spec"].replace("+stride", "+blocks(dense check" + per_kv)
    out["note"] = "development prompts; first reply token only; block-sparse streaming prefill, dense masked compute"
    out["blocks_args"] = vars(args)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
