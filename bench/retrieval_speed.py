"""Cost of retrieval scoring on smollm2-135m: observed needle trials vs plain greedy decoding.

For each context length of the default grid, decode the same needle prompts twice, side by
side in one process: (a) `decode_trial` (prefill + greedy decode with every decode step's
attention observed, retrieval and retrieval_mass bookkeeping) and (b) plain greedy decoding of
the same number of tokens with the model's own SDPA attention. The ratio b/a is the cost of
the instrumentation. With --grid, also time the whole default grid through `profile`.
Writes bench/results/retrieval_speed.json.

    python bench/retrieval_speed.py [--threads 1] [--grid]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "retrieval_speed.json"
MODEL = "smollm2-135m"


def plain_greedy(loaded, case, n_tokens: int) -> float:
    """The same number of greedy tokens through SDPA, nothing observed."""
    from headwise.decode import greedy

    t = time.perf_counter()
    greedy(loaded, case.input_ids, n_tokens, until="budget")
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--grid", action="store_true", help="also time the whole default grid (minutes)")
    p.add_argument("--text", default=None, help="filler text file (default: the bundled prose)")
    a = p.parse_args()
    os.environ["HEADWISE_QUIET"] = "1"
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import headwise
    from headwise.probes.needle import needle_case
    from headwise.scores.retrieval import GRIDS, decode_trial

    m = headwise.load(MODEL)
    load_before = os.getloadavg()
    rows = []
    for context in GRIDS["default"]["contexts"]:
        for needle in (0, 6):
            case = needle_case(m.tokenizer, context=context, depth=0.5, needle=needle, seed=needle, text=a.text)
            t = time.perf_counter()
            trial = decode_trial(m, case)
            observed = time.perf_counter() - t
            plain = plain_greedy(m, case, len(trial.generated))
            rows.append({"context": context, "needle": needle, "decode_steps": len(trial.generated),
                         "observed_s": round(observed, 2), "plain_greedy_s": round(plain, 2),
                         "overhead_ratio": round(observed / plain, 2), "needle_recall": round(trial.recall, 2)})
            print(rows[-1], flush=True)
    result = {
        "benchmark": "retrieval_speed", "model": MODEL,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "text": a.text or "bundled",
        # Other processes on the machine inflate wall times; the load average says how busy it was.
        "loadavg_1m": {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)},
        "trials": rows,
        "median_overhead_ratio": sorted(r["overhead_ratio"] for r in rows)[len(rows) // 2],
    }
    if a.grid:
        from headwise.profile import ProfileSettings, profile

        t = time.perf_counter()
        atlas = profile(m, ["retrieval", "retrieval_mass"], ProfileSettings(text=a.text))
        settings = atlas.data["settings"]["probes"]["needle_retrieval"]
        result["default_grid"] = {"seconds": round(time.perf_counter() - t, 1), "trials": settings["trials"],
                                  "kept_retrieval": settings["kept_retrieval"], "kept_mass": settings["kept_mass"],
                                  "heads_above_0.1": int((atlas.score("retrieval") > 0.1).sum()),
                                  "loadavg_1m_end": round(os.getloadavg()[0], 2)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "trials"}, indent=1))


if __name__ == "__main__":
    main()
