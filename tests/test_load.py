"""Loading: every kind of spec, offline, and one-line errors for every kind of bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import headwise
from headwise.errors import HeadwiseError


def test_load_hf_directory(model_dir):
    m = headwise.load(str(model_dir))
    assert m.info.kind == "hf-dir" and m.geometry.n_kv_heads == 2
    assert len(m.info.weights_sha256) == 64 and len(m.info.config_sha256) == 64
    assert m.model.config._attn_implementation == "headwise"


def test_load_in_another_dtype_records_it(tiny_dir):
    import torch

    m = headwise.load(str(tiny_dir), dtype="bfloat16")
    assert {p.dtype for p in m.model.parameters()} == {torch.bfloat16}
    assert m.info.to_dict()["dtype"] == "bfloat16" and m.dtype_bytes == 2
    assert headwise.load(str(tiny_dir)).info.to_dict()["dtype"] == "float32"
    assert headwise.load(str(tiny_dir), dtype=torch.float16).dtype_bytes == 2
    for bad in ("int8", torch.int8, "fp8"):
        with pytest.raises(HeadwiseError, match="not one headwise loads a model in; use one of float32, bfloat16"):
            headwise.load(str(tiny_dir), dtype=bad)


def test_load_hub_id_from_local_cache_only(model_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in model_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    m = headwise.load("someone/tiny")
    assert m.info.kind == "hf-cache"
    with pytest.raises(HeadwiseError, match="not in the local Hugging Face cache"):
        headwise.load("someone/absent")


def test_pickled_weights_are_never_loaded(model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    with pytest.raises(HeadwiseError, match="pickled"):
        headwise.load(str(model_dir))


@pytest.mark.parametrize("spec,message", [
    ("no-such-model", "unknown model 'no-such-model'"),
    ("/definitely/missing.gguf", "no such file or directory"),
])
def test_bad_specs(spec, message):
    with pytest.raises(HeadwiseError, match=message):
        headwise.load(spec)


def test_directory_without_config(tmp_path):
    with pytest.raises(HeadwiseError, match="no config.json"):
        headwise.load(str(tmp_path))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(HeadwiseError, match="not a valid GGUF file"):
        headwise.load(str(bad))


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "notanarch")
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(HeadwiseError, match="'notanarch' is not supported"):
        headwise.load(str(path))


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    with pytest.raises(HeadwiseError, match="not a .gguf"):
        headwise.load(str(f))


def test_cli_prints_one_line_not_a_traceback():
    r = subprocess.run([sys.executable, "-m", "headwise.cli", "profile", "--model", "no-such-model"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("headwise: error: unknown model")


@pytest.mark.slow
def test_default_model_loads_with_its_geometry(smollm2):
    g = smollm2.geometry
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim) == (30, 9, 3, 64)
    assert set(g.layer_types) == {"full"} and smollm2.info.kind == "bundled"


@pytest.mark.slow
def test_truncated_copy_of_the_default_gguf(tmp_path):
    from headwise.load import _smollm2_gguf

    src = _smollm2_gguf()
    cut = tmp_path / "cut.gguf"
    with src.open("rb") as f:
        cut.write_bytes(f.read(5_000_000))
    with pytest.raises(HeadwiseError, match="not a valid GGUF file"):
        headwise.load(str(cut))


@pytest.mark.slow
def test_gemma3_bundled_model_geometry():
    m = headwise.load("gemma3-270m")
    g = m.geometry
    assert (g.n_layers, g.n_heads, g.n_kv_heads) == (18, 4, 1)
    assert g.layer_types.count("sliding") == 15 and g.sliding_window[0] == 512 and g.sliding_window[5] is None
    assert g.windowed.count(True) == 15 and not g.windowed[5]  # every 6th layer is global
    from headwise.load import _cache_root

    cached = json.loads((_cache_root() / "sha256-index.json").read_text())
    assert cached  # hashes are memoised so warm loads do not re-read the file


# ---- image models ---------------------------------------------------------------------------
@pytest.fixture
def vit_dir(tmp_path):
    """A tiny ViT classifier saved as a Hugging Face directory (safetensors + config, no processor file)."""
    from tests.conftest import tiny_vision_model

    d = tmp_path / "tiny-vit"
    tiny_vision_model("vit").save_pretrained(d, safe_serialization=True)
    return d


def test_load_image_classifier_directory_with_a_default_processor(vit_dir):
    m = headwise.load(str(vit_dir))
    assert m.geometry.modality == "image" and m.geometry.patch_grid == (4, 4) and m.tokenizer is None
    assert m.preprocessor is m.processor and m.processor.size == {"height": 12, "width": 12}
    assert type(m.model).__name__ == "ViTForImageClassification"


def test_load_image_model_uses_its_own_processor(vit_dir):
    from transformers import ViTImageProcessorPil

    ViTImageProcessorPil(size={"height": 12, "width": 12}, image_mean=[0.1] * 3, image_std=[0.2] * 3) \
        .save_pretrained(vit_dir)
    assert list(headwise.load(str(vit_dir)).processor.image_mean) == [0.1] * 3


def test_load_vision_encoder_without_classifier(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    d = tmp_path / "dino"
    Dinov2Model(Dinov2Config(image_size=12, patch_size=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             mlp_ratio=2)).save_pretrained(d, safe_serialization=True)
    m = headwise.load(str(d))
    assert type(m.model).__name__ == "Dinov2Model" and m.geometry.prefix_tokens == 1


def test_corrupt_processor_file_is_one_line(vit_dir):
    (vit_dir / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(HeadwiseError, match="preprocessor_config.json could not be read") as e:
        headwise.load(str(vit_dir))
    assert "\n" not in str(e.value)


def test_patch_grid_is_measured_at_the_processors_size(tmp_path):
    """DINOv2 checkpoints say 518 px but their processors crop to 224: the grid must follow the processor."""
    from transformers import Dinov2Config, Dinov2ForImageClassification, ViTImageProcessorPil

    d = tmp_path / "dino"
    Dinov2ForImageClassification(Dinov2Config(image_size=12, patch_size=3, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, mlp_ratio=2, num_labels=10)).save_pretrained(d)
    ViTImageProcessorPil(size={"height": 24, "width": 24}).save_pretrained(d)
    g = headwise.load(str(d)).geometry
    assert g.patch_grid == (8, 8) and g.n_tokens == 65


def test_encoder_checkpoint_without_architectures_gets_no_random_classifier(tmp_path):
    from transformers import ViTConfig, ViTModel

    d = tmp_path / "vit-bare"
    ViTModel(ViTConfig(image_size=12, patch_size=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64)).save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    config.pop("architectures", None)
    (d / "config.json").write_text(json.dumps(config))
    m = headwise.load(str(d))
    assert type(m.model).__name__ == "ViTModel"
    with pytest.raises(HeadwiseError, match="has no image classifier"):
        headwise.profile(m, ["importance_accuracy"])


def test_two_tower_models_are_refused_and_clip_classifiers_use_the_vision_config(tmp_path):
    from transformers import CLIPConfig, CLIPForImageClassification, CLIPModel

    vision = dict(image_size=12, patch_size=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64)
    text = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    config = CLIPConfig(vision_config=vision, text_config=text)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    with pytest.raises(HeadwiseError, match="two-tower") as e:
        headwise.load(str(tmp_path / "clip"))
    assert "\n" not in str(e.value)
    g = headwise.from_model(CLIPForImageClassification(CLIPConfig(vision_config=vision, text_config=text,
                                                                  num_labels=3)), name="clip-cls").geometry
    assert (g.n_layers, g.patch_grid, g.prefix_tokens) == (2, (4, 4), 1)
