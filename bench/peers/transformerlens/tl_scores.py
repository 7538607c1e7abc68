"""TransformerLens side of the comparison (TL venv): transformer_lens.head_detector.detect_head on the
exact token ids of headwise's pattern probe.

    HF_HUB_OFFLINE=1 bench/peers/transformerlens/.venv/bin/python bench/peers/transformerlens/tl_scores.py \
        --model-dir bench/peers/models/smollm2-135m-tl --probe ids.json --out tl.json [--mode shared-cache|list]

TransformerLens 4 removed HookedTransformer; a local Llama-architecture directory boots offline with
TransformerBridge.boot_transformers(dir) (the architecture adapter is picked from config.json, so no
official-name lookup and no hub call). SmolLM2 is not in TL's official name list, which 4.x no longer
needs for HF-format checkpoints.

detect_head takes text and tokenizes it with model.to_tokens, which would prepend a BOS and re-tokenize
decoded random ids into other ids. So each probe sequence gets a string key, and the bridge's
to_tokens is replaced on this instance by a lookup of the key's exact ids; everything else, from the
detection patterns to the per-sequence mean, is detect_head's own code.

Modes: "shared-cache" runs each sequence once and passes its cache to detect_head for the three head
kinds (cache= is detect_head's documented way to reuse a run); "list" calls detect_head(model, [seqs],
name) once per head kind, TL's list form, which re-runs every sequence for every kind (3x the passes).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from importlib.metadata import version
from pathlib import Path

import torch
import transformer_lens.head_detector
from transformer_lens.head_detector import detect_head
from transformer_lens.model_bridge import TransformerBridge

KINDS = {"previous_token": "previous_token_head", "duplicate_token": "duplicate_token_head",
         "induction": "induction_head"}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def exact_tokens(ids_by_key: dict[str, torch.Tensor]):
    def to_tokens(seq, *args, **kwargs):
        if isinstance(seq, list):
            return torch.stack([ids_by_key[s] for s in seq])
        return ids_by_key[seq][None]
    return to_tokens


def score(model, keys: list[str], mode: str, split: dict[str, float], **options: bool) -> dict[str, list]:
    """The three scores; `split` gets the seconds spent in forward passes and in detect_head proper."""
    if mode == "list":
        return {name: detect_head(model, keys, kind, **options).tolist() for name, kind in KINDS.items()}
    per_seq = {name: [] for name in KINDS}
    for key in keys:
        t0 = time.perf_counter()
        _, cache = model.run_with_cache(model.to_tokens(key), remove_batch_dim=True)
        t1 = time.perf_counter()
        for name, kind in KINDS.items():
            per_seq[name].append(detect_head(model, key, kind, cache=cache, **options))
        split["forward_s"] += t1 - t0
        split["detect_s"] += time.perf_counter() - t1
        del cache
    return {name: torch.stack(s).mean(0).tolist() for name, s in per_seq.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--probe", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", choices=("shared-cache", "list"), default="shared-cache")
    parser.add_argument("--exclude-bos", action="store_true")
    parser.add_argument("--exclude-current-token", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    model = TransformerBridge.boot_transformers(str(args.model_dir), device="cpu", dtype=torch.float32)
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mib()
    ids = json.loads(args.probe.read_text())["input_ids"]
    ids_by_key = {f"probe-{i}": torch.tensor(row, dtype=torch.long) for i, row in enumerate(ids)}
    model.to_tokens = exact_tokens(ids_by_key)
    # TransformerLens's tutorials turn autograd off for analysis; detect_head does not do it itself.
    split = {"forward_s": 0.0, "detect_s": 0.0}
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        scores = score(model, list(ids_by_key), args.mode, split, exclude_bos=args.exclude_bos,
                       exclude_current_token=args.exclude_current_token)
    score_s, score_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    args.out.write_text(json.dumps({
        "tool": "transformer_lens", "mode": args.mode, "load_s": load_s, "score_s": score_s, "score_cpu_s": score_cpu_s,
        "split": split if args.mode == "shared-cache" else None,
        "peak_rss_after_load_mib": rss_loaded, "peak_rss_mib": peak_rss_mib(), "scores": scores,
        "versions": {"transformer_lens": version("transformer_lens"), "transformers": version("transformers"),
                     "torch": torch.__version__},
        "detect_head_source": transformer_lens.head_detector.__file__, "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
