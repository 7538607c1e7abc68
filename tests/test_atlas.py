"""The atlas file: provenance, determinism, validation of damaged or mismatched files."""

import json

import numpy as np
import pytest

import headwise
from headwise import Atlas, ProfileSettings, profile
from headwise.errors import HeadwiseError
from headwise.scores import role_rules
from tests.conftest import tiny_model, tiny_tokenizer

SCORES = ["previous_token", "induction", "echo"]
SETTINGS = ProfileSettings(block_len=10, repeated_sequences=2, razor_sequences=2)


@pytest.fixture
def llama():
    return headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer(), name="tiny-llama")


@pytest.fixture
def saved(llama, tmp_path):
    return profile(llama, SCORES, SETTINGS).save(tmp_path / "a")


def test_round_trip_and_provenance(saved, llama):
    atlas = Atlas.load(saved.parent)
    data = atlas.data
    assert data["schema"] == "headwise.atlas/1"
    assert data["model"]["weights_sha256"] == llama.info.weights_sha256
    assert set(data["versions"]) >= {"headwise", "torch", "transformers", "python"}
    assert data["settings"]["seed"] == 0 and data["settings"]["probes"]["repeated"]["block_len"] == 10
    assert atlas.score_names == SCORES and atlas.score("induction").shape == (3, 4)
    assert atlas.score("induction", "kv_max").shape == (3, 2)
    atlas.check_model(llama.info, llama.geometry)


def test_same_seed_same_bytes_other_seed_other_scores(llama, tmp_path):
    a = profile(llama, SCORES, SETTINGS).save(tmp_path / "a")
    b = profile(llama, SCORES, SETTINGS).save(tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    c = profile(llama, SCORES, ProfileSettings(block_len=10, repeated_sequences=2, razor_sequences=2, seed=1))
    assert not np.allclose(c.score("induction"), Atlas.load(a).score("induction"))


def test_roles_follow_the_rules_written_in_the_atlas(saved):
    atlas = Atlas.load(saved)
    rules = {r["role"]: r for r in atlas.data["roles"]["rules"]}
    assert set(rules) == {"previous-token", "induction"}
    for rule in role_rules():
        if rule.role in rules:
            expected = {(int(a), int(b)) for a, b in zip(*np.nonzero(rule.applies(atlas.score(rule.score))))}
            assert set(atlas.heads_with_role(rule.role)) == expected


def test_truncated_file(saved):
    saved.write_text(saved.read_text()[:500])
    with pytest.raises(HeadwiseError, match="corrupt or truncated"):
        Atlas.load(saved)


def test_wrong_schema_and_bad_matrix(saved):
    data = json.loads(saved.read_text())
    data["scores"]["induction"]["heads"] = data["scores"]["induction"]["heads"][:-1]
    saved.write_text(json.dumps(data))
    with pytest.raises(HeadwiseError, match="not a 3 x 4 matrix"):
        Atlas.load(saved)
    saved.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(HeadwiseError, match="schema"):
        Atlas.load(saved)


def test_binary_and_missing_files(tmp_path):
    (tmp_path / "atlas.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(HeadwiseError):
        Atlas.load(tmp_path)
    with pytest.raises(HeadwiseError, match="no atlas"):
        Atlas.load(tmp_path / "nowhere")


def test_atlas_of_another_model_is_refused(saved):
    other = headwise.from_model(tiny_model("llama-gqa", seed=1), tiny_tokenizer(), name="other")
    with pytest.raises(HeadwiseError, match="profile this model first"):
        Atlas.load(saved).check_model(other.info, other.geometry)
    gpt2 = headwise.from_model(tiny_model("gpt2"), tiny_tokenizer())
    with pytest.raises(HeadwiseError, match="does not match"):
        Atlas.load(saved).check_model(gpt2.info, gpt2.geometry)


def test_unknown_score_is_refused(llama):
    with pytest.raises(HeadwiseError, match="unknown score"):
        profile(llama, ["nonsense"], SETTINGS)
    with pytest.raises(HeadwiseError, match="has no score"):
        profile(llama, ["echo"], SETTINGS).score("induction")


def test_context_longer_than_the_model_allows(llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"t{i % 90}" for i in range(5000)))
    with pytest.raises(HeadwiseError, match="longer than this model allows"):
        profile(llama, ["sink"], ProfileSettings(context=2048, text=str(text)))


@pytest.mark.parametrize("name, is_dir, lone, file", [
    ("a", False, False, "a/atlas.json"), ("a", True, False, "a/atlas.json"),
    ("a/atlas.json", False, False, "a/atlas.json"), ("a/validated.json", False, True, "a/validated.json"),
    ("a.json", True, False, "a.json/atlas.json"),  # a directory whose name ends in .json
])
def test_lone_atlas_files_and_atlas_directories(tmp_path, name, is_dir, lone, file):
    from headwise.atlas import atlas_file, is_lone_file

    if is_dir:
        (tmp_path / name).mkdir(parents=True)
    assert is_lone_file(tmp_path / name) is lone and atlas_file(tmp_path / name) == tmp_path / file


def test_save_into_a_directory_keeps_only_samples_of_this_atlas(llama, tmp_path, capsys):
    """Atlas.save follows write_unit's rule for a new atlas: bound samples stay, a report and figures of
    the old atlas go, samples of another model go (with a note)."""
    from headwise import _io
    from headwise.report import collect_samples, write_report

    d = tmp_path / "a"
    atlas = profile(llama, SCORES, SETTINGS)
    atlas.save(d)
    collect_samples(llama, SETTINGS, d)
    write_report(d)
    with _io.staged_outputs(d, what="the figures") as stage:
        stage.write_bytes("figures/grid.png", b"png")
        stage.keep_others()
    samples = {n: (d / n).read_bytes() for n in ("attention_samples.safetensors", "attention_samples.json")}
    atlas.set_validation("note", {"verdict": "x"})
    assert atlas.save(d) == d / "atlas.json"
    assert sorted(p.name for p in d.iterdir()) == sorted([*samples, "atlas.json", _io.MANIFEST_FILE])
    assert all((d / n).read_bytes() == b for n, b in samples.items())
    _io.verify_unit(d, ["atlas.json", *samples])
    capsys.readouterr()
    other = headwise.from_model(tiny_model("llama-gqa", seed=1), tiny_tokenizer(), name="other")
    profile(other, SCORES, SETTINGS).save(d / "atlas.json")
    assert sorted(p.name for p in d.iterdir()) == ["atlas.json", _io.MANIFEST_FILE]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the attention samples in" in err and "another model" in err
