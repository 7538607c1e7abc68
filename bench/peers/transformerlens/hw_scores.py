"""headwise side of the TransformerLens comparison (main venv): the three pattern scores of every head.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/peers/transformerlens/hw_scores.py --out hw.json [--probe-out ids.json]

--probe-out writes the token ids of headwise's repeated-random-tokens probe (the one PatternScores
builds from the default settings) so the TransformerLens side scores the very same sequences.
The timed span is headwise.profile() on an already loaded model, as `headwise profile` runs it.
Scores are the atlas's, which keeps 6 significant digits (so differences below ~5e-7 are rounding).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

import headwise
from headwise.profile import ProfileSettings, profile
from headwise.scores.patterns import PatternScores

SCORES = ("previous_token", "duplicate_token", "induction")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--probe-out", type=Path)
    parser.add_argument("--exclude-bos", action="store_true")
    parser.add_argument("--exclude-current-token", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    lm = headwise.load(args.model)
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mib()
    settings = ProfileSettings(exclude_bos=args.exclude_bos, exclude_current_token=args.exclude_current_token)
    if args.probe_out:
        probe = PatternScores().make_probe(lm.preprocessor, lm.geometry, settings)
        args.probe_out.write_text(json.dumps({"input_ids": probe.input_ids.tolist(), "settings": probe.settings,
                                              "model": lm.info.to_dict()}))
    t0, c0 = time.perf_counter(), time.process_time()
    atlas = profile(lm, list(SCORES), settings)
    score_s, score_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    args.out.write_text(json.dumps({
        "tool": "headwise", "load_s": load_s, "score_s": score_s, "score_cpu_s": score_cpu_s,
        "peak_rss_after_load_mib": rss_loaded, "peak_rss_mib": peak_rss_mib(),
        "scores": {name: atlas.data["scores"][name]["heads"] for name in SCORES},
        "settings": {k: atlas.data["settings"].get(k) for k in ("block_len", "repeated_sequences", "seed",
                                                                 "exclude_bos", "exclude_current_token")},
        "model": lm.info.to_dict(), "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
