"""Important heads' job in an image classifier: classification accuracy on held-out images.

The images are those the atlas's scores never saw: for the bundled digits, the next images of
the same seeded order of the test split after the atlas's image probe; for --images DIR, the
files after the probe's (sorted by name). Unlabelled images are scored against the unablated
model's own predictions, so the metric is then agreement with the intact model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..ablation import class_logits
from ..atlas import Atlas
from ..errors import HeadwiseError
from ..instrument import Session
from ..probes import image_probe
from .base import TaskOutcome, ValidationTask


class ImageAccuracyTask(ValidationTask):
    """Top-1 accuracy on `count` held-out images under each ablation."""

    name = "image_accuracy"
    metric = "top-1 accuracy on held-out images"
    higher_is_better = True
    modality = "image"

    def __init__(self, count: int = 256, rows_per_pass: int = 256):
        self.count, self.rows_per_pass = count, rows_per_pass
        self.source: dict[str, Any] = {"images": None, "seed": 0, "offset": 64}

    def check_atlas(self, atlas: Atlas, role: str) -> None:
        """Take the images after the ones the atlas was scored on (its image settings)."""
        if atlas.geometry.modality != "image":
            raise HeadwiseError(f"role '{role}' is validated on images, but this atlas is of a language model")
        settings = atlas.data.get("settings", {})
        # The images the importance scores were computed on, as the probe recorded them: the directory's
        # absolute path and the number of images it really held (which may be below --image-count).
        probe = settings.get("probes", {}).get("importance_images", {})
        source = probe.get("directory") if "directory" in probe else settings.get("images")
        self.source = {"images": None if source in (None, "bundled") else str(source),
                       "seed": int(settings.get("seed", 0)),
                       "offset": int(probe.get("count", settings.get("image_count", 64)))}

    def settings(self) -> dict[str, Any]:
        return {"count": self.count, **self.source, "source": self.source["images"] or "digits (test split)",
                "held_out": f"images after the first {self.source['offset']} the atlas was scored on"}

    def evaluate(self, loaded: Any, scales: Tensor) -> TaskOutcome:
        try:
            probe = image_probe(loaded.preprocessor, loaded.geometry, count=self.count, seed=self.source["seed"],
                                images=self.source["images"], offset=self.source["offset"], name="held_out_images")
        except HeadwiseError as e:
            if "after the first" not in str(e):
                raise
            where = self.source["images"] or "the digits' test split"
            raise HeadwiseError(f"the atlas was scored on all {self.source['offset']} images of {where}; validation "
                                f"needs held-out images after them: add images, or profile with a smaller "
                                f"--image-count") from None
        pixels, device = probe.pixel_values, loaded.device
        c, n = scales.shape[0], pixels.shape[0]
        right = torch.zeros(c, n, dtype=torch.float64)
        with torch.inference_mode():
            labels = probe.labels if probe.labels is not None else \
                class_logits(loaded.model, pixels.to(device), self.rows_per_pass).argmax(-1).cpu()
            rows = [(cond, i) for cond in range(c) for i in range(n)]
            for start in range(0, len(rows), self.rows_per_pass):
                chunk = rows[start:start + self.rows_per_pass]
                cond, img = torch.tensor([r[0] for r in chunk]), torch.tensor([r[1] for r in chunk])
                with Session(loaded.geometry, head_scale=scales[cond].to(device)):
                    predicted = class_logits(loaded.model, pixels[img].to(device)).argmax(-1).cpu()
                right[cond, img] = (predicted == labels[img]).double()
        return TaskOutcome(values=[float(v) for v in right.mean(1)],
                           details=[{"correct": int(row.sum()), "images": n} for row in right])


__all__ = ["ImageAccuracyTask"]
