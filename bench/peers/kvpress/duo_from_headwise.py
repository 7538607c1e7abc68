"""kvpress's DuoAttentionPress running a DuoAttention pattern that headwise exported.

Runs in bench/peers/kvpress/.venv; never imports headwise.

    bench/peers/kvpress/.venv/bin/python bench/peers/kvpress/duo_from_headwise.py \
        --pattern bench/peers/models/duo-smollm2-duo4k --out bench/results/kvpress_duo_from_headwise.json

kvpress 0.5.5 fetches patterns from GitHub for six hub models only
(DuoAttentionPress.load_attention_pattern: requests.get of config.json and
full_attention_heads.tsv). The loader is a staticmethod memoised by cachetools in the module's
LRUCache `kvpress.presses.duo_attention_press.cache`, keyed by `model.config.name_or_path`. A
local pattern goes in by storing, under that key, the tuple the loader would return:

    sink, recent, scores = load_duo_pattern(DIR)     # np.loadtxt(TSV, delimiter="\\t") clipped, config.json
    duo_attention_press.cache[model.config.name_or_path] = (sink, recent, scores)
    press = DuoAttentionPress(head_compression_ratio=h)   # post_init_from_model now finds it

This script proves it: requests.get is replaced by a function that raises, so any network
access fails the run; it then checks that the heads kvpress made streaming are exactly the
round(h x heads) lowest gates of the exported TSV, and answers a passkey prompt with them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import PEERS, _versions, answer, install_duo_pattern, load_duo_pattern, passkey_correct, read_prompts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(PEERS / "models" / "smollm2-135m"))
    p.add_argument("--pattern", default=str(PEERS / "models" / "duo-smollm2-duo4k"))
    p.add_argument("--prompts", default=str(PEERS / "models" / "prompts" / "passkey-1024.jsonl"))
    p.add_argument("--head-ratios", default="0.5,0.75", help="DuoAttentionPress head_compression_ratio values")
    p.add_argument("--out", default="bench/results/kvpress_duo_from_headwise.json")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from kvpress import DuoAttentionPress
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa",
                                                 local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    pattern = Path(args.pattern)
    sink, recent = install_duo_pattern(model, pattern)
    gates = load_duo_pattern(pattern)[2]
    _, prompts = read_prompts(Path(args.prompts))
    prompt = prompts[0]
    runs = []
    for h in (float(x) for x in args.head_ratios.split(",")):
        press = DuoAttentionPress(head_compression_ratio=h)
        press.post_init_from_model(model)  # what `with press(model)` calls first
        streaming = press.streaming_mask.cpu().numpy()
        n = round(gates.size * h)
        # The reference: the n lowest gates of the TSV; `tie_at_cut` flags when equal gates straddle the cut
        # (kvpress's unstable argsort may then pick another of them).
        lowest = np.zeros(gates.shape, dtype=bool)
        lowest[np.unravel_index(np.argsort(gates, axis=None, kind="stable")[:n], gates.shape)] = True
        same = bool((streaming == lowest).all())
        tied = bool(n and n < gates.size and np.sort(gates, axis=None)[n - 1] == np.sort(gates, axis=None)[n])
        row = answer(model, tokenizer, press, prompt["input_ids"], prompt["question_start"], prompt["max_new_tokens"])
        row.update({"head_compression_ratio": h, "streaming_heads": int(streaming.sum()),
                    "streaming_heads_equal_lowest_gates": same, "tie_at_cut": tied,
                    "streaming_heads_list": [[int(i), int(j)] for i, j in zip(*np.nonzero(streaming))],
                    "prompt": prompt["id"], "answers": prompt["answers"],
                    "correct": passkey_correct(row["reply"], prompt["answers"])})
        runs.append(row)
        print(f"head_compression_ratio {h}: {row['streaming_heads']} streaming heads (the lowest gates: {same}); "
              f"kvpress compression_ratio_ {row['kvpress_compression_ratio']:.3f}, effective KV share "
              f"{row['kv_share_effective']:.3f}, stored {row['kv_share_stored']:.3f}; reply {row['reply'][:40]!r} "
              f"({'correct' if row['correct'] else 'wrong'})")
    result = {"kind": "headwise-peer-kvpress-duo", "versions": _versions(), "pattern": str(pattern),
              "pattern_config": json.loads((pattern / "config.json").read_text()),
              "pattern_provenance": json.loads((pattern / "headwise-provenance.json").read_text()),
              "how": "duo_attention_press.cache[model.config.name_or_path] = (sink_size, recent_size, gates); "
                     "requests.get replaced by a function that raises",
              "sink_size": sink, "recent_size": recent, "model": args.model, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
