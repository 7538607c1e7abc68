"""What every KV bench script does first: run offline and quiet, honour HEADWISE_THREADS, load
the model and an atlas checked against it."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HEADWISE_QUIET", "1")


def use_threads_from_env() -> None:
    """torch's thread count from HEADWISE_THREADS, when set (two single-thread runs side by side on the 2 cores)."""
    threads = os.environ.get("HEADWISE_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def load_model_and_atlas(model: str, atlas_path: str, dtype: str = "float32") -> tuple[Any, Any]:
    import headwise

    use_threads_from_env()
    loaded = headwise.load(model, dtype=dtype)
    atlas = headwise.Atlas.load(atlas_path)
    atlas.check_model(loaded.info, loaded.geometry)
    return loaded, atlas


def seed_range(text: str) -> range:
    """"FIRST-LAST" (or one seed) -> the seeds, inclusive."""
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)
