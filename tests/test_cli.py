"""`headwise profile` end to end on a tiny model directory."""


from headwise import Atlas
from headwise.cli import main


def test_profile_writes_atlas_and_prints_summary(model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"t{(i * 7) % 90}" for i in range(4000)))
    code = main(["profile", "--model", str(model_dir), "--out", str(tmp_path / "out"), "--context", "600",
                 "--text", str(text), "--text-sequences", "1", "--seed", "4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "top:" in out and "roles:" in out and "atlas written to" in out
    atlas = Atlas.load(tmp_path / "out")
    assert set(atlas.score_names) == {"previous_token", "duplicate_token", "induction", "echo", "razor_induction",
                                      "sink", "streamable_mass", "mean_distance", "entropy"}
    assert atlas.data["settings"]["seed"] == 4 and atlas.data["settings"]["context"] == 600
    assert "distance" in atlas.data["profiles"]


def test_bad_arguments_are_one_line_errors(model_dir, capsys):
    assert main(["profile", "--model", str(model_dir), "--scores", "bogus"]) == 2
    assert "unknown score 'bogus'" in capsys.readouterr().err
    assert main(["profile", "--model", str(model_dir), "--context", "0"]) == 2
    assert "--context must be a positive integer" in capsys.readouterr().err


def test_version_and_threads(model_dir, tmp_path, capsys):
    import pytest
    import torch

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("headwise ")
    before = torch.get_num_threads()
    try:
        out = tmp_path / "one-thread"
        assert main(["--threads", "1", "profile", "--model", str(model_dir), "--scores", "previous_token",
                     "--out", str(out), "--block-len", "8", "--repeated-sequences", "1", "--no-report"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["--threads", "0", "profile", "--model", str(model_dir)]) == 2
        assert "--threads must be a positive integer" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_dtype_is_recorded_and_an_atlas_serves_every_dtype(model_dir, tmp_path):
    import headwise

    out = tmp_path / "bf16"
    assert main(["--dtype", "bfloat16", "profile", "--model", str(model_dir), "--scores", "previous_token",
                 "--out", str(out), "--block-len", "8", "--repeated-sequences", "1", "--no-report"]) == 0
    atlas = Atlas.load(out)
    assert atlas.model["dtype"] == "bfloat16"
    float32 = headwise.load(str(model_dir))
    atlas.check_model(float32.info, float32.geometry)  # the same weights: the dtype is a setting, not a model
    from headwise.cli import DTYPE_NAMES
    from headwise.load import DTYPES

    assert DTYPE_NAMES == tuple(DTYPES)  # the CLI's choices are what load() takes


def test_image_model_end_to_end_profile_validate_report_plot(tmp_path, capsys):
    """An image classifier directory and a directory of images through every command that reads an atlas."""
    import numpy as np
    from PIL import Image

    from tests.conftest import tiny_vision_model

    model = tmp_path / "vit"
    tiny_vision_model("deit").save_pretrained(model, safe_serialization=True)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(images / f"im{i:02d}.png")
    out = tmp_path / "atlas"
    assert main(["profile", "--model", str(model), "--images", str(images), "--image-count", "6",
                 "--pattern-epochs", "2", "--out", str(out)]) in (0, None)
    printed = capsys.readouterr().out
    atlas = Atlas.load(out)
    assert atlas.geometry.prefix_tokens == 2 and "attention_distance" in printed
    assert {"importance_accuracy", "attention_distance", "pattern_ae_error"} <= set(atlas.score_names)
    assert atlas.data["settings"]["probes"]["importance_images"]["labels"] == "the model's clean predictions"
    assert main(["validate", "--atlas", str(out), "--model", str(model), "--role", "important", "--k", "2"]) \
        in (0, None)
    assert "important@k2" in Atlas.load(out).data["validation"]
    assert main(["report", str(out)]) in (0, None)
    assert "patch_grid" in (out / "report.html").read_text()
    assert main(["plot", str(out)]) in (0, None)
    assert (out / "figures").is_dir()
    # A language-model score on an image model is one line naming the scores that fit.
    assert main(["profile", "--model", str(model), "--scores", "induction", "--out", str(tmp_path / "x")]) == 2
    assert "cannot measure image models" in capsys.readouterr().err
