"""`headwise report`, `headwise plot` and `headwise profile --no-report` from the command line."""

from __future__ import annotations

import shutil

import pytest

from headwise.cli import main


def test_report_and_plot_commands(hostile_atlas_dir, tmp_path, capsys):
    d = tmp_path / "atlas"
    shutil.copytree(hostile_atlas_dir, d)
    (d / "report.html").unlink(missing_ok=True)
    assert main(["report", str(d)]) == 0
    assert "report written to" in capsys.readouterr().out and (d / "report.html").is_file()
    pytest.importorskip("matplotlib")
    assert main(["plot", str(d), "--out", str(tmp_path / "figs")]) == 0
    assert capsys.readouterr().out.count("figure written to") == 3


def test_report_of_a_missing_atlas_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("headwise: error: no atlas") and err.count("\n") == 1



def test_profile_writes_the_report_unless_told_not_to(model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"t{(i * 7) % 90}" for i in range(3000)))
    common = ["--model", str(model_dir), "--context", "200", "--text", str(text), "--text-sequences", "1",
              "--scores", "previous_token,sink,mean_distance"]
    assert main(["profile", *common, "--out", str(tmp_path / "a"), "--no-report"]) == 0
    assert not (tmp_path / "a" / "report.html").exists() and not (tmp_path / "a" / "attention_samples.json").exists()
    assert main(["profile", *common, "--out", str(tmp_path / "b")]) == 0
    assert "report written to" in capsys.readouterr().out
    assert (tmp_path / "b" / "report.html").is_file() and (tmp_path / "b" / "attention_samples.safetensors").is_file()
    # Samples collected later with --model give the same file.
    first = (tmp_path / "b" / "attention_samples.safetensors").read_bytes()
    assert main(["report", str(tmp_path / "a"), "--model", str(model_dir)]) == 0
    assert (tmp_path / "a" / "attention_samples.safetensors").read_bytes() == first


def test_the_space_check_counts_the_default_battery(model_dir, tmp_path, monkeypatch):
    """Without --scores, profile runs headwise.scores.default_scores(), not every registered score."""
    import headwise.report
    from headwise.errors import HeadwiseError
    from headwise.scores import all_score_names, default_scores

    counted = []

    def unit_bytes(geometry, n_scores, context, with_report):
        counted.append(n_scores)
        raise HeadwiseError("stop here")

    monkeypatch.setattr(headwise.report, "unit_bytes", unit_bytes)
    assert main(["profile", "--model", str(model_dir), "--out", str(tmp_path / "a")]) == 2
    assert counted == [len(default_scores())] and len(default_scores()) < len(all_score_names())
