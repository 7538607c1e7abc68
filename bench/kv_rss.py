"""Peak RSS, KV bytes and speed of `headwise generate` under several KV policies, one process each.

    python bench/kv_rss.py --atlas bench/results/atlas-smollm2-retrieval.json \
        --policies full,headwise:retrieval@0.25 --out bench/results/kv_rss_smollm2.json

The prompt is the start of a bundled text, about --chars characters (29,000 ~ 7,600 SmolLM2 tokens),
fed in chunks of --prefill-chunk tokens so that prefill activations do not set the peak.
--repeats N runs the policies N times, interleaved, and reports each one's median. Peak RSS
also depends on the allocator: glibc serves a large block from its heap once a block that large
was freed (its dynamic mmap threshold), and keeps freed heap memory, so where transient tensors
land moves the peak by a hundred MiB and more between runs. --mmap-threshold BYTES fixes the
threshold (MALLOC_MMAP_THRESHOLD_) so that large tensors are mapped and unmapped, and RSS
follows the live tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PATTERNS = {
    "prefill": r"prefill: (\d+) tokens in ([\d.]+) s",
    "decode": r"decode: (\d+) tokens, ([\d.]+) tok/s",
    "kv": r"KV cache: ([\d.]+) MiB \(([\d.]+)% of the full cache's ([\d.]+) MiB\); peak RSS (\d+) MiB",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--atlas", required=True)
    ap.add_argument("--policies", default="full,headwise:retrieval@0.25")
    ap.add_argument("--text", default="doyle_adventures_of_sherlock_holmes.txt")
    ap.add_argument("--chars", type=int, default=29000)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--mmap-threshold", type=int, default=None, help="set MALLOC_MMAP_THRESHOLD_ for the runs")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from headwise.probes.text import bundled_text_files

    source = next(p for p in bundled_text_files() if p.name == a.text)
    prompt = Path(tempfile.mkdtemp()) / "prompt.txt"
    prompt.write_text(source.read_text(encoding="utf-8")[:a.chars], encoding="utf-8")
    headwise = Path(sys.executable).with_name("headwise")
    env = {**os.environ, "HEADWISE_QUIET": "1"}
    if a.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
    policies = a.policies.split(",")
    runs: dict[str, list[dict]] = {policy: [] for policy in policies}
    for _ in range(a.repeats):
        for policy in policies:
            cmd = [str(headwise), "generate", "--model", a.model, "--atlas", a.atlas, "--policy", policy,
                   "--prompt-file", str(prompt), "--max-new-tokens", str(a.new_tokens),
                   "--prefill-chunk", str(a.prefill_chunk)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"{policy} failed: {out.stderr[-2000:]}")
            found = {k: re.search(p, out.stdout).groups() for k, p in PATTERNS.items()}
            runs[policy].append({"prompt_tokens": int(found["prefill"][0]), "prefill_s": float(found["prefill"][1]),
                                 "decode_tok_s": float(found["decode"][1]), "kv_mib": float(found["kv"][0]),
                                 "kv_share": float(found["kv"][1]) / 100, "peak_rss_mib": int(found["kv"][3])})
            print(policy, runs[policy][-1], flush=True)
    rows = []
    for policy, rs in runs.items():
        row = {"policy": policy, **rs[0]}
        for key in ("prefill_s", "decode_tok_s", "peak_rss_mib"):
            row[key] = statistics.median(r[key] for r in rs)
        row["peak_rss_mib_runs"] = [r["peak_rss_mib"] for r in rs]
        rows.append(row)
    base = rows[0]
    for r in rows:
        r["decode_speedup_vs_first"] = round(r["decode_tok_s"] / base["decode_tok_s"], 3)
        r["rss_saved_mib"] = round(base["peak_rss_mib"] - r["peak_rss_mib"], 1)
        r["kv_saved_mib"] = round(base["kv_mib"] - r["kv_mib"], 2)
    result = {"benchmark": "kv_rss", "args": vars(a), "loadavg_1m_end": os.getloadavg()[0], "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
