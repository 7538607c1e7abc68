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
