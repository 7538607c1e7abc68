"""torch intra-op threads for decoding: one retrieval trial (decode-heavy) and the default battery's
text probe (prefill-heavy) timed with 1 and with 2 threads, interleaved in one process.

    python bench/threads_speed.py [--rounds 3] [--context 1024]

Writes bench/results/threads_speed.json. On 2 cores the decode steps of a 135M model are tiny ops,
so a second thread can cost more in synchronisation than it gives; `headwise --threads N` sets it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "threads_speed.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--context", type=int, default=1024)
    args = ap.parse_args()
    os.environ["HEADWISE_QUIET"] = "1"
    import torch

    import headwise
    from headwise.probes.needle import needle_case
    from headwise.scores.retrieval import decode_trial

    m = headwise.load(args.model)
    case = needle_case(m.tokenizer, context=args.context, depth=0.5, needle=0, seed=0)
    text = torch.randint(100, 20000, (2, 2048), generator=torch.Generator().manual_seed(0))
    times: dict[str, dict[int, list[float]]] = {"retrieval_trial": {1: [], 2: []}, "prefill_2x2048": {1: [], 2: []}}
    steps = None
    load = os.getloadavg()[0]
    for r in range(args.rounds):
        for threads in ((1, 2) if r % 2 == 0 else (2, 1)):  # alternate which goes first
            torch.set_num_threads(threads)
            t = time.perf_counter()
            steps = len(decode_trial(m, case).generated)
            times["retrieval_trial"][threads].append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.inference_mode():
                m.model(input_ids=text, use_cache=False, logits_to_keep=1)
            times["prefill_2x2048"][threads].append(time.perf_counter() - t)
    result = {"benchmark": "threads_speed", "model": m.info.to_dict(), "context": case.length, "decode_steps": steps,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "loadavg_1m": {"start": round(load, 2), "end": round(os.getloadavg()[0], 2)}, "seconds": {}}
    for what, by in times.items():
        medians = {t: statistics.median(v) for t, v in by.items()}
        result["seconds"][what] = {"1_thread": [round(x, 2) for x in by[1]], "2_threads": [round(x, 2) for x in by[2]],
                                   "median_ratio_2_over_1": round(medians[2] / medians[1], 3)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result["seconds"], indent=1))


if __name__ == "__main__":
    main()
