"""Export smollm2-135m, exactly as headwise loads it (de-quantized GGUF), to an HF safetensors directory
that the TransformerLens venv can boot offline. Run once in the main venv:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/peers/transformerlens/export_model.py

Writes bench/peers/models/smollm2-135m-tl/ and, beside the weights, export.json with the sha256 of
every file and the GGUF's sha256, so the comparison can prove both tools ran the same numbers.
"""

from __future__ import annotations

import argparse
import json
from importlib.metadata import version
from pathlib import Path

import headwise
from headwise.load import file_sha256

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_OUT = ROOT / "bench" / "peers" / "models" / "smollm2-135m-tl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    lm = headwise.load(args.model)
    # headwise routes attention through its own registered function; the exported config must name a
    # stock implementation or the other venv (which has no such registration) cannot load it.
    lm.model.config._attn_implementation = "eager"
    args.out.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(args.out, safe_serialization=True)
    lm.tokenizer.save_pretrained(args.out)
    files = {p.name: file_sha256(p) for p in sorted(args.out.iterdir()) if p.is_file() and p.name != "export.json"}
    record = {"model": args.model, "headwise_model_info": lm.info.to_dict(), "files_sha256": files,
              "weights_sha256": files["model.safetensors"], "headwise_version": version("headwise")}
    (args.out / "export.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({"out": str(args.out), "weights_sha256": record["weights_sha256"]}))


if __name__ == "__main__":
    main()
