"""The steering framework: a method defined outside src fits, saves, loads back, applies through
`headwise generate --steer` under any KV policy, and is refused for another model."""

from __future__ import annotations

import json

import pytest
import torch

import headwise
from headwise.cli import main
from headwise.errors import HeadwiseError
from headwise.instrument import HeadEdits, Session
from headwise.steer import METHODS, Steering, load_steering, random_heads, register_method, save_steering
from headwise.steer.evaluate import steering_rows
from headwise.tasks import load_task
from tests.conftest import tiny_model, tiny_tokenizer


class Shift(Steering):
    """Adds a seeded random vector to the output of head (last layer, 0): a method in one test file."""

    method = "test_shift"

    @classmethod
    def fit(cls, loaded, task, *, heads=None, seed=0, **options):
        g = loaded.geometry
        heads = list(heads) if heads is not None else [(g.n_layers - 1, 0)]
        gen = torch.Generator().manual_seed(seed)
        shift = torch.randn(len(heads), g.head_dim, generator=gen) * 5
        return cls.from_saved(g, heads, {"shift": shift}, {"seed": seed, "train": len(task.train)})

    @classmethod
    def from_saved(cls, geometry, heads, tensors, settings, strength=1.0):
        s = cls(geometry, heads, strength, settings)
        if tensors["shift"].shape != (len(heads), geometry.head_dim):
            raise HeadwiseError("test_shift: shift has the wrong shape")
        s.shift = tensors["shift"]
        return s

    def tensors(self):
        return {"shift": self.shift}

    def edits(self):
        if self.strength == 0:
            return HeadEdits()

        def output(layer, out):
            for i, (lay, head) in enumerate(self.heads):
                if lay == layer:
                    out = out.clone()
                    out[:, :, head] += self.strength * self.shift[i].to(out.dtype)
            return out
        return HeadEdits(output=output)


@pytest.fixture(autouse=True)
def _registered():
    register_method(Shift)
    yield
    METHODS.pop("test_shift", None)


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"t{i} t{i + 1}", "target": f"t{i + 2}"}) + "\n"
                            for i in range(3, 60)))
    return path


def _logits(loaded, ids, edits=None):
    with torch.no_grad(), Session(loaded.geometry, edits=edits):
        return loaded.model(input_ids=ids).logits


def test_fit_save_load_round_trip_and_zero_strength(tiny, task_file, tmp_path):
    task = load_task(str(task_file))
    steering = headwise.steer.fit(tiny, task, "test_shift", seed=3)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    clean, steered = _logits(tiny, ids), _logits(tiny, ids, steering.edits())
    assert not torch.allclose(clean, steered)
    assert torch.equal(_logits(tiny, ids, steering.with_strength(0.0).edits()), clean)
    save_steering(steering, tmp_path / "s", tiny.info.to_dict(), task=task.record())
    back = load_steering(tmp_path / "s", tiny)
    assert back.heads == steering.heads and back.settings == steering.settings
    assert torch.equal(_logits(tiny, ids, back.edits()), steered)
    assert torch.equal(_logits(tiny, ids, load_steering(tmp_path / "s", tiny, strength=0).edits()), clean)
    record = json.loads((tmp_path / "s" / "steering.json").read_text())
    assert record["model"]["weights_sha256"] == tiny.info.weights_sha256 and record["task"]["digest"] == task.digest


def test_a_steering_for_another_model_is_refused(task_file, tmp_path):
    a = headwise.from_model(tiny_model("llama-gqa", seed=0), tiny_tokenizer(), name="a")
    b = headwise.from_model(tiny_model("llama-gqa", seed=1), tiny_tokenizer(), name="b")
    save_steering(headwise.steer.fit(a, load_task(str(task_file)), "test_shift"), tmp_path / "s", a.info.to_dict())
    with pytest.raises(HeadwiseError, match="fitted on model 'a'") as err:
        load_steering(tmp_path / "s", b)
    assert "\n" not in str(err.value)


def test_a_damaged_steering_is_refused(tiny, task_file, tmp_path):
    save_steering(headwise.steer.fit(tiny, load_task(str(task_file)), "test_shift"), tmp_path / "s",
                  tiny.info.to_dict())
    (tmp_path / "s" / "steering.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(HeadwiseError, match="changed after headwise wrote it"):
        load_steering(tmp_path / "s", tiny)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "steering.json").write_text('{"schema": "headwise.steering/1", "method": "nope"}')
    with pytest.raises(HeadwiseError, match="no valid 'strength'"):
        load_steering(tmp_path / "t", tiny)
    with pytest.raises(HeadwiseError, match="not a directory"):
        load_steering(tmp_path / "missing", tiny)


def test_random_heads_are_seeded_and_distinct(tiny):
    g = tiny.geometry
    a = random_heads(g, 5, 1)
    assert a == random_heads(g, 5, 1) and len(set(a)) == 5 and a != random_heads(g, 5, 2)
    with pytest.raises(HeadwiseError, match="cannot draw"):
        random_heads(g, g.n_layers * g.n_heads + 1, 0)


def test_steering_rows_score_every_condition(tiny, task_file):
    task = load_task(str(task_file))
    rows = steering_rows(tiny, task, ["test_shift"], shots=(0, 5), limit=4, control_seeds=(0, 1))
    assert list(rows) == ["0-shot", "5-shot", "test_shift", "test_shift@random0", "test_shift@random1"]
    assert rows["5-shot"]["tokens_vs_5_shot"] == 1.0 and rows["0-shot"]["tokens_vs_5_shot"] < 1.0
    assert rows["test_shift"]["trained_parameters"] == tiny.geometry.head_dim
    assert all(r["n"] == 4 for r in rows.values())


def test_generate_applies_a_steering_under_any_policy(model_dir, task_file, tmp_path, capsys):
    loaded = headwise.load(str(model_dir))
    save_steering(headwise.steer.fit(loaded, load_task(str(task_file)), "test_shift"), tmp_path / "s",
                  loaded.info.to_dict())
    prompt = tmp_path / "p.txt"
    prompt.write_text(" ".join(f"t{i % 40}" for i in range(60)))
    texts = {}
    for policy in ("full", "streaming@16"):
        for strength in ("0", "1"):
            args = ["generate", "--model", str(model_dir), "--prompt-file", str(prompt), "--max-new-tokens", "6",
                    "--policy", policy, "--steer", str(tmp_path / "s"), "--strength", strength]
            assert main(args) == 0
            texts[policy, strength] = capsys.readouterr().out.split("\n--- ")[0]
        assert main(["generate", "--model", str(model_dir), "--prompt-file", str(prompt), "--max-new-tokens", "6",
                     "--policy", policy]) == 0
        assert capsys.readouterr().out.split("\n--- ")[0] == texts[policy, "0"]
    assert texts["full", "1"] != texts["full", "0"]


@pytest.mark.parametrize("extra, message", [
    (["--strength", "1"], "--strength needs --steer"),
    (["--steer", "missing-dir"], "not a directory"),
    (["--steer", "S", "--strength", "nan"], "finite"),
])
def test_generate_steer_bad_input_is_one_line(extra, message, model_dir, tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("t1 t2 t3")
    extra = [str(tmp_path / "missing-dir") if x == "missing-dir" else x for x in extra]
    extra = [str(tmp_path) if x == "S" else x for x in extra]
    assert main(["generate", "--model", str(model_dir), "--prompt-file", str(prompt), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_weight_edits_are_refused_under_a_cache_view(model_dir):
    from headwise.kv.generate import generate
    from headwise.kv.spec import parse_policy

    loaded = headwise.load(str(model_dir))
    ids = torch.tensor([[1] + [5 + i % 30 for i in range(40)]])
    edits = HeadEdits(weights=lambda layer, probs, q, off: probs)
    assert generate(loaded, ids, parse_policy("full", loaded.geometry), max_new_tokens=3, edits=edits).tokens
    with pytest.raises(HeadwiseError, match="full KV cache only"):
        generate(loaded, ids, parse_policy("streaming@16", loaded.geometry, sink=4, window=8), max_new_tokens=3,
                 edits=edits)


def test_steer_cli_fits_saves_and_scores(model_dir, task_file, tmp_path, capsys):
    out = tmp_path / "steer"
    assert main(["steer", "--model", str(model_dir), "--task", str(task_file), "--method", "test_shift", "--out",
                 str(out), "--limit", "3"]) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy (3 pairs)" in printed and (out / "steering.safetensors").is_file()
    assert main(["steer", "--model", str(model_dir), "--task", str(task_file), "--method", "nope", "--out",
                 str(tmp_path / "x")]) == 2
    assert "unknown steering method 'nope'" in capsys.readouterr().err
