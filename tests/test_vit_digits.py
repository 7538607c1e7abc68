"""The bundled digits split and vit-digits: deterministic training, the cache directory, plain-transformers loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from headwise import vit_digits
from headwise.digits import digits, digits_split

# One epoch of a smaller model on a slice of the training set: seconds, not a minute.
SHORT = {**vit_digits.RECIPE, "epochs": 1, "train_subset": 256,
         "config": {**vit_digits.RECIPE["config"], "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64}}


@pytest.fixture
def short_recipe(monkeypatch):
    monkeypatch.setattr(vit_digits, "RECIPE", SHORT)


def _rows(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(len(x), -1)
    return flat[np.lexsort(flat.T[::-1])]


def test_digits_are_scaled_images_and_labels():
    x, y = digits()
    assert x.shape == (1797, 8, 8) and x.dtype == np.float32 and y.shape == (1797,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0 and set(y.tolist()) == set(range(10))


def test_split_is_a_fixed_stratified_partition():
    split, again = digits_split(), digits_split()
    (x_train, y_train), (x_test, y_test) = split["train"], split["test"]
    for part in ("train", "test"):
        for a, b in zip(split[part], again[part]):
            np.testing.assert_array_equal(a, b)
    assert len(y_train) + len(y_test) == 1797 and len(y_test) == 450
    # Together the two parts are exactly the data set, each image once.
    x_all, _ = digits()
    np.testing.assert_array_equal(_rows(np.concatenate([x_train, x_test])), _rows(x_all))
    _, y_all = digits()
    expected = np.bincount(y_all) * 0.25
    assert np.all(np.abs(np.bincount(y_test, minlength=10) - expected) <= 1)


def test_same_seed_gives_identical_weights(short_recipe):
    threads = torch.get_num_threads()
    first, source = vit_digits.train_vit_digits(seed=0, progress=False)
    second, _ = vit_digits.train_vit_digits(seed=0, progress=False)
    other, _ = vit_digits.train_vit_digits(seed=1, progress=False)
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not first.training and torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()
    assert source["seed"] == 0 and source["train_size"] == 256 and source["test_size"] == 450
    assert 0 <= source["test_accuracy"] <= 1 and set(source["versions"]) == {"torch", "transformers", "sklearn"}


def test_cache_dir_is_a_plain_transformers_model_trained_once(short_recipe, tmp_path, monkeypatch):
    from PIL import Image
    from transformers import AutoImageProcessor, ViTForImageClassification

    path = vit_digits.vit_digits_dir(tmp_path)
    assert path.parent == tmp_path / "models" and path.name == f"vit-digits-{vit_digits.recipe_hash()}"
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "config.json", "preprocessor_config.json",
                                                "headwise-source.json"}
    source = json.loads((path / "headwise-source.json").read_text())
    assert source["kind"] == "vit-digits" and source["recipe"] == json.loads(json.dumps(SHORT))

    model = ViTForImageClassification.from_pretrained(path, local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    x, y = digits_split()["test"]
    # A PIL greyscale image at 0..255 becomes the tensor the training saw, up to half a grey level of rounding.
    images = [Image.fromarray(np.round(img * 255).astype(np.uint8), "L") for img in x]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    expected = (torch.as_tensor(x) - 0.5).div(0.5).unsqueeze(1)
    assert pixels.shape == (450, 1, 8, 8) and torch.allclose(pixels, expected, atol=1.01 / 255)
    with torch.no_grad():
        accuracy = (model(pixel_values=expected).logits.argmax(-1).numpy() == y).mean()
    assert round(float(accuracy), 4) == source["test_accuracy"]

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(vit_digits, "train_vit_digits", no_training)
    assert vit_digits.vit_digits_dir(tmp_path) == path
    assert not [p for p in (tmp_path / "models").iterdir() if p != path]  # no temp dir left behind


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_recipe_reads_digits():
    """The bundled model as users get it (trained once into the headwise cache, which the findings tests
    share): its recorded test accuracy, and the same accuracy recomputed from the saved files."""
    import headwise
    from headwise.ablation import class_logits

    loaded = headwise.load("vit-digits")
    source = json.loads((Path(loaded.info.path) / "headwise-source.json").read_text())
    assert source["test_accuracy"] > 0.9 and source["train_size"] == 1347
    from PIL import Image

    x, y = digits_split()["test"]
    norm = source["recipe"]["normalize"]
    exact = torch.tensor((x - norm["mean"]) / norm["std"], dtype=torch.float32)[:, None]  # the recipe's inputs
    images = [Image.fromarray(np.round(im * 255).astype(np.uint8), mode="L") for im in x]
    pixels = loaded.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        accuracy = float((class_logits(loaded.model, exact).argmax(-1).numpy() == y).mean())
        as_images = float((class_logits(loaded.model, pixels).argmax(-1).numpy() == y).mean())
    assert accuracy == pytest.approx(source["test_accuracy"], abs=1e-4)
    # 8-bit images move each pixel by up to 1/510 (the digits are multiples of 1/16): a prediction near its
    # decision boundary may flip, so the image path agrees within 2 of the 450 test images.
    assert abs(as_images - accuracy) <= 2 / len(y) + 1e-9
