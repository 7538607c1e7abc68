"""vit-digits: the offline default image model, a small ViT that headwise trains itself.

Profiling image heads needs a real trained vision transformer, but headwise never reaches a model hub.
So it trains one, once, on scikit-learn's bundled handwritten digits and caches it as an ordinary
Hugging Face directory that plain transformers loads. The digits are 8x8 pixels, so the patch size is 1:
every pixel is a token, the grid is 8x8 = 64 patch tokens plus CLS, and an attention map reads directly
as "which pixels this head looks at". Everything that determines the weights is in RECIPE, whose hash
names the cache directory; the same seed gives bit-identical weights on the same machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._progress import note
from ._progress import progress as progress_bar
from .digits import digits_split
from .errors import HeadwiseError

if TYPE_CHECKING:
    from transformers import ViTForImageClassification

RECIPE: dict[str, Any] = {
    "config": {
        "image_size": 8, "patch_size": 1, "num_channels": 1,
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "qkv_bias": True,
        "num_labels": 10,
        "initializer_range": 0.1,  # the default 0.02 learns several times slower on 1,347 images
    },
    "optimizer": {"name": "AdamW", "lr": 2e-3, "betas": [0.9, 0.999], "weight_decay": 0.05},
    "schedule": {"name": "linear-warmup-cosine", "warmup_epochs": 2},
    "epochs": 20,
    "batch_size": 64,
    "label_smoothing": 0.1,
    # No augmentation: random 1-pixel shifts cost accuracy within this budget (0.93 vs 0.97 validation).
    "normalize": {"mean": 0.5, "std": 0.5},  # on the [0, 1] pixels: the model sees [-1, 1]
    "threads": 1,  # float sums depend on the thread count; one thread gives the same weights on any machine
}

KIND = "vit-digits"


def _config(recipe: dict):
    from transformers import ViTConfig

    labels = {i: str(i) for i in range(recipe["config"]["num_labels"])}
    return ViTConfig(**recipe["config"], id2label=labels, label2id={v: k for k, v in labels.items()},
                     attn_implementation="sdpa")


def _pixels(x: np.ndarray | torch.Tensor, recipe: dict) -> torch.Tensor:
    """[N, 8, 8] pixels in [0, 1] -> normalised pixel_values [N, 1, 8, 8]."""
    norm = recipe["normalize"]
    return ((torch.as_tensor(x, dtype=torch.float32) - norm["mean"]) / norm["std"]).unsqueeze(1)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def _evaluate(model, x: np.ndarray, y: np.ndarray, recipe: dict) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on (x, y)."""
    model.eval()
    logits = torch.cat([model(pixel_values=_pixels(x[i:i + 256], recipe)).logits for i in range(0, len(x), 256)])
    labels = torch.as_tensor(y)
    return (logits.argmax(-1) == labels).float().mean().item(), torch.nn.functional.cross_entropy(logits, labels).item()


def _fit(x: np.ndarray, y: np.ndarray, recipe: dict, seed: int, show: bool = True) -> ViTForImageClassification:
    """Train a fresh model on (x, y) by the recipe; deterministic given the seed."""
    from transformers import ViTForImageClassification

    torch.manual_seed(seed)
    model = ViTForImageClassification(_config(recipe))
    opt = recipe["optimizer"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt["lr"], betas=tuple(opt["betas"]),
                                  weight_decay=opt["weight_decay"])
    batch, epochs = recipe["batch_size"], recipe["epochs"]
    steps_per_epoch = math.ceil(len(x) / batch)
    total, warmup = epochs * steps_per_epoch, recipe["schedule"]["warmup_epochs"] * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total, warmup))
    gen = torch.Generator().manual_seed(seed)

    def batches():
        for _ in range(epochs):
            yield from torch.randperm(len(x), generator=gen).split(batch)

    images, labels = torch.as_tensor(x), torch.as_tensor(y)
    model.train()
    for idx in progress_bar(batches(), desc="training vit-digits", total=total, unit="step") if show else batches():
        logits = model(pixel_values=_pixels(images[idx], recipe)).logits
        loss = torch.nn.functional.cross_entropy(logits, labels[idx], label_smoothing=recipe["label_smoothing"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model.eval()


def train_vit_digits(seed: int = 0, progress: bool = True) -> tuple[ViTForImageClassification, dict]:
    """Train vit-digits by RECIPE; return the model (eval mode) and its provenance."""
    import sklearn
    import transformers

    recipe = RECIPE
    data = digits_split()
    x_train, y_train = data["train"]
    if recipe.get("train_subset"):  # only tests shorten training this way
        x_train, y_train = x_train[:recipe["train_subset"]], y_train[:recipe["train_subset"]]
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(recipe["threads"])
    torch.use_deterministic_algorithms(True)
    try:
        start = time.perf_counter()
        model = _fit(x_train, y_train, recipe, seed, show=progress)
        seconds = time.perf_counter() - start
        accuracy, loss = _evaluate(model, *data["test"], recipe)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return model, {
        "recipe": recipe, "seed": seed,
        "train_size": len(x_train), "test_size": len(data["test"][1]),
        "test_accuracy": round(accuracy, 4), "test_loss": round(loss, 4), "train_seconds": round(seconds, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sklearn": sklearn.__version__},
    }


def _processor(recipe: dict):
    try:  # the PIL backend is what ViTImageProcessor falls back to without torchvision; naming it skips a warning
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor
    size = recipe["config"]["image_size"]
    norm = recipe["normalize"]
    # A PIL 'L' image of the digit at 0..255 maps to the same [-1, 1] pixels the training saw (an 8 x 8 image is
    # left as it is by the resize); images of other sizes (--images DIR) are resized to the model's 8 x 8.
    return Processor(do_resize=True, size={"height": size, "width": size}, do_rescale=True,
                     rescale_factor=1 / 255, do_normalize=True, image_mean=[norm["mean"]], image_std=[norm["std"]])


def _save(model: ViTForImageClassification, directory: Path) -> None:
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a bar for writing one small file is noise
    try:
        model.save_pretrained(directory, safe_serialization=True)
        _processor(RECIPE).save_pretrained(directory)
    finally:
        if bars:
            logging.enable_progress_bar()


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:16]


def vit_digits_dir(cache_root: Path) -> Path:
    """The Hugging Face directory of vit-digits under cache_root, trained into place the first time."""
    target = Path(cache_root) / "models" / f"{KIND}-{recipe_hash()}"
    if (target / "headwise-source.json").is_file():
        return target
    minutes = max(1, round(RECIPE["epochs"] * 3 / 60))  # about 3 s an epoch on one core
    note(f"training {KIND} once into {target} (about {minutes} min; later loads take a second)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=target.parent))
    except OSError as e:
        raise HeadwiseError(f"cannot write the {KIND} model under {target.parent} ({e.strerror}); "
                            f"point the cache at a writable directory") from None
    try:
        model, source = train_vit_digits(seed=0)
        _save(model, tmp)
        (tmp / "headwise-source.json").write_text(json.dumps({"kind": KIND, **source}, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same training first
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


__all__ = ["RECIPE", "train_vit_digits", "vit_digits_dir", "recipe_hash"]
