"""scikit-learn's bundled handwritten digits: the offline image data set behind vit-digits.

1,797 greyscale 8x8 images (values 0..16, labels 0..9) ship inside scikit-learn, so training and
probing an image model never needs a download. The split is fixed so every run sees the same test set.
"""

from __future__ import annotations

import numpy as np

DIGITS_SPLIT_SEED = 0
TEST_FRACTION = 0.25


def digits() -> tuple[np.ndarray, np.ndarray]:
    """All images as float32 [1797, 8, 8] in [0, 1], and their labels as int64 [1797]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The fixed stratified train/test split: {"train": (x, y), "test": (x, y)}."""
    from sklearn.model_selection import train_test_split

    x, y = digits()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=y)
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


__all__ = ["DIGITS_SPLIT_SEED", "TEST_FRACTION", "digits", "digits_split"]
