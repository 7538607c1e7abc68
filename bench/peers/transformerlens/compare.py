"""headwise vs TransformerLens: previous_token, duplicate_token and induction scores of every head of
smollm2-135m on the same probe ids; wall time, peak RSS and agreement.

    make peers-tl
    HF_HUB_OFFLINE=1 .venv/bin/python bench/peers/transformerlens/export_model.py   # once
    HF_HUB_OFFLINE=1 .venv/bin/python bench/peers/transformerlens/compare.py [--repeats 3]

Compare score_cpu_s more than score_s: on a shared machine the wall time of a single-threaded child
waits for a core. Each measurement is its own single-threaded subprocess (headwise in the main venv, TransformerLens in
bench/peers/transformerlens/.venv), in alternating order per repeat; its peak RSS comes from
os.wait4 on that child alone. Writes bench/results/peers_transformerlens.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
MAIN_PY = ROOT / ".venv" / "bin" / "python"
TL_PY = HERE / ".venv" / "bin" / "python"
MODEL_DIR = ROOT / "bench" / "peers" / "models" / "smollm2-135m-tl"
OUT = ROOT / "bench" / "results" / "peers_transformerlens.json"
SCORES = ("previous_token", "duplicate_token", "induction")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "HEADWISE_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}


def run(cmd: list[str]) -> dict:
    """Run one child; wall time and that child's own peak RSS (wait4, not the children's running max)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{stderr.decode()[-2000:]}")
    return {"process_wall_s": wall, "process_cpu_s": usage.ru_utime + usage.ru_stime,
            "process_peak_rss_mib": usage.ru_maxrss / 1024}


def measure(cmd: list[str], out: Path) -> dict:
    proc = run([*cmd, "--out", str(out)])
    return {**json.loads(out.read_text()), **proc}


def agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> dict:
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    top_a, top_b = set(np.argsort(-a)[:k]), set(np.argsort(-b)[:k])
    diff = np.abs(a - b)
    # headwise's atlas keeps 6 significant digits: round TL's values the same way to see what is left.
    rounded = np.array([float(f"{x:.6g}") for x in b])
    return {"heads": int(a.size), "pearson": float(pearsonr(a, b)[0]), "spearman": float(spearmanr(a, b)[0]),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            f"top{k}_overlap": len(top_a & top_b),
            "heads_equal_after_6_digit_rounding": int((rounded == a).sum()),
            "max_abs_diff_after_rounding": float(np.abs(rounded - a).max())}


def summary(runs: list[dict]) -> dict:
    out = {}
    for key in ("score_s", "score_cpu_s", "load_s", "process_wall_s", "process_cpu_s", "process_peak_rss_mib",
                "peak_rss_after_load_mib"):
        vals = [r[key] for r in runs]
        out[key] = {"median": float(np.median(vals)), "min": float(min(vals)), "max": float(max(vals)),
                    "all": vals}
    splits = [r["split"] for r in runs if r.get("split")]
    if splits:  # TransformerLens shared-cache mode: forward passes vs detect_head proper
        out["split_median_s"] = {k: float(np.median([sp[k] for sp in splits])) for k in splits[0]}
    return out


def pip_freeze(python: Path, names: tuple[str, ...]) -> dict:
    lines = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                           env=ENV, check=True).stdout
    return {p["name"]: p["version"] for p in json.loads(lines) if p["name"].lower() in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if not TL_PY.exists():
        sys.exit("no TransformerLens venv: run `make peers-tl` first")
    if not (MODEL_DIR / "export.json").exists():
        sys.exit(f"no exported model at {MODEL_DIR}: run {MAIN_PY} {HERE / 'export_model.py'} first")

    tmp = Path(tempfile.mkdtemp(prefix="peers-tl-"))
    probe = tmp / "probe_ids.json"
    hw_cmd = [str(MAIN_PY), str(HERE / "hw_scores.py")]
    tl_cmd = [str(TL_PY), str(HERE / "tl_scores.py"), "--model-dir", str(MODEL_DIR), "--probe", str(probe)]
    # Untimed: writes the probe ids and warms the page cache for both models.
    run([*hw_cmd, "--out", str(tmp / "warm.json"), "--probe-out", str(probe)])
    runs: dict[str, list[dict]] = {"headwise": [], "tl_shared_cache": [], "tl_list": []}
    jobs = {"headwise": hw_cmd, "tl_shared_cache": [*tl_cmd, "--mode", "shared-cache"],
            "tl_list": [*tl_cmd, "--mode", "list"]}
    load_before = os.getloadavg()
    for r in range(args.repeats):
        order = list(jobs) if r % 2 == 0 else list(reversed(jobs))
        for name in order:
            runs[name].append(measure(jobs[name], tmp / f"{name}-{r}.json"))
            print(f"repeat {r} {name}: score {runs[name][-1]['score_s']:.2f} s, "
                  f"peak RSS {runs[name][-1]['process_peak_rss_mib']:.0f} MiB", flush=True)
    load_after = os.getloadavg()

    # The CLI the README documents, once, to show its atlas holds the same numbers as the API run.
    atlas_dir = tmp / "atlas"
    cli = [str(ROOT / ".venv" / "bin" / "headwise"), "profile", "--model", "smollm2-135m", "--scores",
           ",".join(SCORES), "--no-report", "--out", str(atlas_dir)]
    cli_proc = run(cli)
    cli_scores = json.loads((atlas_dir / "atlas.json").read_text())["scores"]

    # The detector options, once each side (no timing): checks the exclude_bos/exclude_current_token paths.
    opts = ["--exclude-bos", "--exclude-current-token"]
    hw_opt = measure([*hw_cmd, *opts], tmp / "hw-opts.json")
    tl_opt = measure([*jobs["tl_shared_cache"], *opts], tmp / "tl-opts.json")

    hw = runs["headwise"][0]["scores"]
    result = {
        "what": "previous_token, duplicate_token, induction of all 270 heads of smollm2-135m: headwise "
                "(src/headwise/scores/patterns.py) vs transformer_lens.head_detector.detect_head ('mul'), "
                "same probe token ids (headwise's repeated random tokens: 8 sequences of a 64-token block "
                "twice, seed 0, no BOS)",
        "commands": {"setup": "make peers-tl",
                     "export": "HF_HUB_OFFLINE=1 .venv/bin/python bench/peers/transformerlens/export_model.py",
                     "compare": f"HF_HUB_OFFLINE=1 .venv/bin/python bench/peers/transformerlens/compare.py "
                                f"--repeats {args.repeats}",
                     "headwise_cli": "headwise " + " ".join(cli[1:]).replace(str(atlas_dir), "<tmp>"),
                     "children": {k: " ".join(v).replace(str(ROOT) + "/", "").replace(str(tmp), "<tmp>")
                                  for k, v in jobs.items()}},
        "model": json.loads((MODEL_DIR / "export.json").read_text()),
        "probe": json.loads(probe.read_text())["settings"],
        "probe_input_ids": json.loads(probe.read_text())["input_ids"],
        "versions": {"main_venv": pip_freeze(MAIN_PY, ("torch", "transformers", "headwise", "numpy")),
                     "tl_venv": pip_freeze(TL_PY, ("torch", "transformers", "transformer-lens", "numpy"))},
        "threads": 1, "repeats": args.repeats, "loadavg_before": load_before, "loadavg_after": load_after,
        "timing_and_memory": {name: summary(rs) for name, rs in runs.items()},
        "agreement": {
            "tl_shared_cache_vs_headwise": {s: agreement(hw[s], runs["tl_shared_cache"][0]["scores"][s])
                                            for s in SCORES},
            "tl_list_vs_headwise": {s: agreement(hw[s], runs["tl_list"][0]["scores"][s]) for s in SCORES},
            "headwise_cli_vs_api_max_abs_diff": {s: float(np.abs(np.array(cli_scores[s]["heads"]) -
                                                                 np.array(hw[s])).max()) for s in SCORES},
            "with_exclude_bos_and_current_token": {s: agreement(hw_opt["scores"][s], tl_opt["scores"][s])
                                                   for s in SCORES},
            "repeat_spread_max_abs": {name: max(float(np.abs(np.array(r["scores"][s]) -
                                                             np.array(rs[0]["scores"][s])).max())
                                                for r in rs for s in SCORES) for name, rs in runs.items()},
        },
        "headwise_cli_run": cli_proc,
        "scores": {"headwise": hw, "transformer_lens": runs["tl_shared_cache"][0]["scores"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({k: result[k] for k in ("timing_and_memory", "agreement")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
