"""Wall time and peak memory of the image battery (`headwise profile` without --scores on an image
model): on vit-digits and on a random-weight ViT-Base geometry (12 layers x 12 heads, 224 px in
16 px patches: 196 patches + CLS = 197 tokens), each family timed on its own.

    python bench/vision_battery.py [--images 4] [--digits-images 64]

Each model runs in its own child process, so its peak RSS (ru_maxrss) is its own. Writes
bench/results/vision_battery.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "vision_battery.json"


def child(model: str, images: int) -> dict:
    import torch

    import headwise
    from headwise.profile import ProfileSettings
    from headwise.scores import default_scores, family_of

    torch.manual_seed(0)
    if model == "vit-base-random":
        from transformers import ViTConfig, ViTForImageClassification

        loaded = headwise.from_model(ViTForImageClassification(ViTConfig(num_labels=10)), name="vit-base-random")
    else:
        loaded = headwise.load(model)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    settings = ProfileSettings(image_count=images)
    names = default_scores("image")
    families: dict[str, list[str]] = {}
    for name in names:
        families.setdefault(family_of(name).family, []).append(name)
    seconds = {}
    for family, wanted in families.items():
        t = time.perf_counter()
        headwise.profile(loaded, wanted, settings)
        seconds[family] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    headwise.profile(loaded, names, settings)  # the whole battery in one call, as `headwise profile` runs it
    whole = round(time.perf_counter() - t, 2)
    return {"model": loaded.info.to_dict(), "geometry": loaded.geometry.to_dict(), "images": images,
            "scores": names, "family_seconds": seconds, "battery_seconds": whole,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_after_load_mb": round(rss_loaded, 1), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4, help="images of the ViT-Base run")
    ap.add_argument("--digits-images", type=int, default=64, help="images of the vit-digits run (the default)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "IMAGES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ["HEADWISE_QUIET"] = "1"
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    runs = []
    load = os.getloadavg()[0]
    for model, images in (("vit-digits", args.digits_images), ("vit-base-random", args.images)):
        out = subprocess.run([sys.executable, __file__, "--child", model, str(images)], capture_output=True,
                             text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import torch
    import transformers

    result = {"benchmark": "vision_battery", "runs": runs, "command": "python bench/vision_battery.py "
              f"--images {args.images} --digits-images {args.digits_images}",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "transformers": transformers.__version__},
              "loadavg_1m": {"start": round(load, 2), "end": round(os.getloadavg()[0], 2)}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for r in runs:
        print(f"{r['model']['spec']}: battery {r['battery_seconds']} s at {r['images']} images, peak RSS "
              f"{r['peak_rss_mb']} MB; per family {r['family_seconds']}")


if __name__ == "__main__":
    main()
