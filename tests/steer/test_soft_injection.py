"""Soft injection of task embeddings on tiny random models: exactness at strength 0, the edit itself,
determinism, and saving/loading."""

from __future__ import annotations

import json

import pytest
import torch

import headwise
from headwise.errors import HeadwiseError
from headwise.instrument import HeadEdits, Session
from headwise.steer.files import load_steering, save_steering
from headwise.steer.soft_injection import SoftInjection, head_outputs_at_last, mix
from headwise.tasks import load_task
from tests.conftest import tiny_model, tiny_tokenizer

torch.set_num_threads(1)
FAST = dict(shots=3, prompts=4, steps=6)


@pytest.fixture
def task(tmp_path, monkeypatch):
    # t{i} -> t{i + 40}: 30 pairs, about 9 held out by the prompt hash. (No bundled task is needed.)
    monkeypatch.setattr("headwise.tasks.bundled_tasks", lambda: ())
    path = tmp_path / "shift.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"t{i}", "target": f"t{i + 40}"}) + "\n" for i in range(3, 33)))
    return load_task(str(path))


def llama(seed: int = 0):
    return headwise.from_model(tiny_model("llama-gqa", seed=seed), tiny_tokenizer(), name=f"tiny-llama-{seed}")


def logits(loaded, ids, edits=None):
    with torch.inference_mode(), Session(loaded.geometry, edits=edits):
        return loaded.model(input_ids=torch.tensor([ids]), use_cache=False).logits


def test_strength_zero_is_exact_and_one_changes(tiny, task):
    steering = SoftInjection.fit(tiny, task, **FAST)
    ids = tiny.tokenizer("Q : t7 A :").input_ids
    plain = logits(tiny, ids)
    assert torch.equal(logits(tiny, ids, steering.with_strength(0.0).edits()), plain)
    assert not torch.equal(logits(tiny, ids, steering.edits()), plain)


def test_fit_is_deterministic_and_recorded(task):
    loaded = llama()
    a, b = SoftInjection.fit(loaded, task, seed=3, **FAST), SoftInjection.fit(loaded, task, seed=3, **FAST)
    for name, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[name]), name
    assert a.heads == b.heads
    assert a.tensors()["task_embedding"].shape == (3, 4, 16) and a.tensors()["selection"].shape == (3, 4)
    assert a.trained_parameters() == 12 and a.settings["steps"] == 6 and a.settings["loss"] == "first"
    assert a.settings["batch"] == 4 and a.settings["prompts"] == 4 and a.settings["shots"] == 3
    assert a.heads == sorted(tuple(map(int, i)) for i in torch.nonzero(a.selection > 0.5))
    full = SoftInjection.fit(loaded, task, loss="all", **FAST)
    assert torch.isfinite(full.selection).all() and full.settings["loss"] == "all"
    with pytest.raises(HeadwiseError, match="no option"):
        SoftInjection.fit(loaded, task, layers=3)


def test_given_heads_train_only_those(task):
    loaded = llama()
    chosen = [(0, 1), (2, 3)]
    steering = SoftInjection.fit(loaded, task, heads=chosen, **FAST)
    assert steering.heads == chosen and steering.trained_parameters() == 2
    off = torch.ones(3, 4, dtype=torch.bool)
    off[0, 1] = off[2, 3] = False
    assert (steering.selection[off] == 0).all() and (steering.selection[~off] > 0).all()


def test_embedding_is_the_mean_last_token_head_output(task):
    loaded = llama()
    steering = SoftInjection.fit(loaded, task, **{**FAST, "prompts": 1, "steps": 1})
    # one prompt: the embedding is that prompt's last-token head outputs, recorded the same way again
    import numpy as np

    from headwise.tasks import encode, few_shot_prompt

    rng = np.random.default_rng(0)
    pair = task.train[int(rng.integers(len(task.train)))]
    ids = encode(loaded.tokenizer, few_shot_prompt(task, pair.prompt, 3, rng))
    assert torch.equal(steering.embedding, head_outputs_at_last(loaded, [ids])[0])
    # prompts of unequal length, padded on the right in one batch, give what each gives alone
    short = ids[:-4]
    both = head_outputs_at_last(loaded, [short, ids])
    assert torch.allclose(both[0], head_outputs_at_last(loaded, [short])[0], atol=1e-5)
    assert torch.allclose(both[1], steering.embedding, atol=1e-5)


def test_injection_touches_only_the_last_prompt_token_of_mixed_heads():
    torch.manual_seed(0)
    out = torch.randn(2, 5, 4, 16)
    embedding = torch.randn(4, 16)
    mixing = torch.tensor([0.0, 0.25, 1.0, 0.0])
    edited = mix(out, mixing, embedding, -1)
    assert torch.equal(edited[:, :-1], out[:, :-1])  # earlier positions untouched
    assert torch.equal(edited[:, -1, [0, 3]], out[:, -1, [0, 3]])  # heads with a = 0 untouched
    assert torch.allclose(edited[:, -1, 1], 0.75 * out[:, -1, 1] + 0.25 * embedding[1])
    assert torch.equal(edited[:, -1, 2], embedding[2].expand(2, 16))
    per_row = mix(out, mixing, embedding, torch.tensor([1, 3]))  # right-padded training rows end apart
    changed = (per_row != out).any(-1).any(-1)
    assert changed.tolist() == [[False, True, False, False, False], [False, False, False, True, False]]

    geometry = llama().geometry
    selection = torch.zeros(3, 4)
    selection[1] = mixing
    steering = SoftInjection(geometry, [(1, 2)], torch.randn(3, 4, 16), selection)
    edit = steering.edits().output
    assert edit(0, out) is out  # a layer with no mixed head
    assert torch.equal(edit(1, out), mix(out, mixing, steering.embedding[1], -1))
    step = out[:, -1:]
    assert edit(1, step) is step  # a decode step (one query) is not injected
    assert torch.equal(steering.with_strength(0.5).edits().output(1, out), mix(out, mixing * 0.5,
                                                                             steering.embedding[1], -1))


def test_injection_inside_the_model_matches_a_hand_computed_layer():
    loaded = llama()
    selection = torch.zeros(3, 4)
    selection[1, 2] = 0.6
    steering = SoftInjection(loaded.geometry, [(1, 2)], torch.randn(3, 4, 16), selection)
    ids = loaded.tokenizer("t3 t4 t5 t6").input_ids
    seen: dict[str, torch.Tensor] = {}
    inject = steering.edits().output

    def watch(layer, out):
        if layer == 1:
            seen["before"] = out.clone()
        out = inject(layer, out)
        if layer == 1:
            seen["after"] = out.clone()
        return out

    logits(loaded, ids, HeadEdits(output=watch))
    before, after = seen["before"], seen["after"]
    expected = before.clone()
    expected[0, -1, 2] = 0.4 * before[0, -1, 2] + 0.6 * steering.embedding[1, 2]
    assert torch.allclose(after, expected) and torch.equal(after[0, :-1], before[0, :-1])
    assert torch.equal(logits(loaded, ids, HeadEdits(output=watch)), logits(loaded, ids, steering.edits()))


def test_save_load_round_trip_and_refusals(tmp_path, task):
    loaded = llama()
    steering = SoftInjection.fit(loaded, task, **FAST)
    path = save_steering(steering, tmp_path / "si", loaded.info.to_dict(), task.record())
    back = load_steering(path, loaded)
    ids = loaded.tokenizer("Q : t9 A :").input_ids
    assert back.heads == steering.heads and back.settings == steering.settings
    assert torch.equal(logits(loaded, ids, back.edits()), logits(loaded, ids, steering.edits()))
    with pytest.raises(HeadwiseError) as refused:
        load_steering(path, llama(seed=1))
    assert "fitted on model" in str(refused.value) and "\n" not in str(refused.value)
    bad = {**steering.tensors(), "selection": torch.zeros(3, 5)}
    with pytest.raises(HeadwiseError, match="shape") as wrong:
        SoftInjection.from_saved(loaded.geometry, steering.heads, bad, steering.settings)
    assert "\n" not in str(wrong.value)
