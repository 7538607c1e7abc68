"""ACT: the calibration of a row matches a hand computation, the steered model matches a naive reference,
strength 0 is exact, only chosen heads change, the batched head filtering measures what calibrating one
head alone does, fitting is seeded, and a saved steering loads back identically."""

from __future__ import annotations

import json
import math

import pytest
import torch

import headwise
from headwise.decode import greedy
from headwise.errors import HeadwiseError
from headwise.instrument import HeadEdits, Session
from headwise.steer.act import ACT, _score, calibrate, calibration_set
from headwise.steer.files import load_steering, save_steering
from headwise.tasks import load_task
from tests.conftest import tiny_model, tiny_tokenizer

IDS = torch.tensor([[1, 5, 9, 14, 22, 5, 9, 30, 41, 7]])
FIT = dict(skip_first=0, skip_last=0, calibration=8)  # a 3-layer model: every head is a candidate


@pytest.fixture
def task(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"t{i} t{i + 1}" + " t9" * (i % 3), "target": f"t{i + 2}"}) + "\n"
                            for i in range(3, 40)))
    return load_task(str(path))


def _llama(seed=0):
    return headwise.from_model(tiny_model("llama-gqa", seed=seed), tiny_tokenizer(), name=f"tiny-llama-{seed}")


def _logits(loaded, ids, edits=None):
    with torch.no_grad(), Session(loaded.geometry, edits=edits):
        return loaded.model(input_ids=ids).logits


def test_calibration_of_one_row_matches_hand_computation():
    probs = torch.tensor([0.5, 0.05, 0.3, 0.1, 0.05]).reshape(1, 1, 1, 5)
    out = calibrate(probs.clone(), torch.tensor([4]), 0, beta=0.4, threshold=0.1)[0, 0, 0]
    # Key 2 is the only sink (0.1 is not above the threshold; key 0 is the first token, never a sink).
    moved = 0.3 * 0.6
    rest = torch.tensor([0.5, 0.05, 0.0, 0.1, 0.05])
    expected = rest + moved * rest / rest.sum()
    expected[2] = 0.3 * 0.4
    assert torch.allclose(out, expected, atol=1e-7)
    assert math.isclose(out.sum().item(), 1.0, abs_tol=1e-6)
    # Beta 1 and a threshold no key exceeds leave the row as it is; the first token counts once it is not first.
    assert torch.equal(calibrate(probs.clone(), torch.tensor([4]), 0, beta=1.0, threshold=0.1), probs)
    assert torch.equal(calibrate(probs.clone(), torch.tensor([4]), 0, beta=0.4, threshold=0.9), probs)
    shifted = calibrate(probs.clone(), torch.tensor([4]), 3, beta=0.4, threshold=0.4)[0, 0, 0]
    assert torch.allclose(shifted[0], torch.tensor(0.2)) and math.isclose(shifted.sum().item(), 1.0, abs_tol=1e-6)


def test_sinks_are_keys_whose_mean_attention_over_the_queries_that_see_them_is_high():
    # Queries at key indices 1 and 2: key 2 is seen by the second only, so its mean is 0.3, not 0.15.
    probs = torch.tensor([[0.6, 0.4, 0.0], [0.6, 0.1, 0.3]]).reshape(1, 1, 2, 3)
    out = calibrate(probs.clone(), torch.tensor([1, 2]), 0, beta=0.5, threshold=0.26)[0, 0]
    assert torch.allclose(out[0], torch.tensor([0.6, 0.4, 0.0]))  # key 1 (mean 0.25) is no sink
    assert torch.allclose(out[1], torch.tensor([0.6 + 0.15 * 6 / 7, 0.1 + 0.15 / 7, 0.15]))
    alpha = calibrate(probs.clone(), torch.tensor([1, 2]), 0, beta=0.5, threshold=1.0, alpha=0.78)  # 0.78 / 3
    assert torch.allclose(alpha[0, 0, 1], out[1])


def test_strength_zero_leaves_logits_unchanged(tiny):
    g = tiny.geometry
    steering = ACT(g, [(0, 0), (g.n_layers - 1, g.n_heads - 1)], settings={"beta": 0.0, "threshold": 0.05})
    base = _logits(tiny, IDS)
    assert torch.equal(_logits(tiny, IDS, steering.with_strength(0.0).edits()), base)
    assert not torch.allclose(_logits(tiny, IDS, steering.edits()), base, atol=1e-4)


def _naive_attention(q, k, v, scaling, beta, threshold):
    """One head, written out row by row: softmax, ACT calibration, weighted sum."""
    n = q.shape[0]
    weights = [torch.softmax(torch.stack([q[i] @ k[j] * scaling for j in range(i + 1)]), 0) for i in range(n)]
    sinks = [j for j in range(1, n) if sum(weights[i][j] for i in range(j, n)) / (n - j) > threshold]
    out = []
    for i, w in enumerate(weights):
        w = w.clone()
        moved = sum(w[j] for j in sinks if j <= i) * (1 - beta)
        others = sum(w[j] for j in range(i + 1) if j not in sinks)
        w = torch.stack([w[j] * beta if j in sinks else w[j] + moved * w[j] / others for j in range(i + 1)])
        out.append(sum(w[j] * v[j] for j in range(i + 1)))
    return torch.stack(out)


def test_steered_model_matches_a_naive_reference():
    loaded = _llama()
    g = loaded.geometry
    heads = [(1, 0), (1, 3), (2, 2)]
    beta, threshold = 0.3, 0.15
    steering = ACT(g, heads, strength=0.5, settings={"beta": beta, "threshold": threshold})
    effective = 1 - 0.5 * (1 - beta)

    def mix(module, layer, query, key, value, scaling, out):  # out from SDPA; chosen heads recomputed by hand
        groups = g.n_heads // g.n_kv_heads
        out = out.clone()
        for lh, h in heads:
            if lh == layer:
                q, k, v = query[0, h].float(), key[0, h // groups].float(), value[0, h // groups].float()
                out[0, :, h] = _naive_attention(q, k, v, scaling, effective, threshold).to(out.dtype)
        return out

    with torch.no_grad(), Session(g, mix=mix):
        reference = loaded.model(input_ids=IDS).logits
    steered = _logits(loaded, IDS, steering.edits())
    assert torch.allclose(steered, reference, atol=1e-5)
    assert not torch.allclose(steered, _logits(loaded, IDS), atol=1e-3)


def test_only_chosen_heads_change():
    loaded = _llama()
    captured = {}

    def capture(tag):
        def output(layer, out):
            captured[tag, layer] = out.clone()
            return out
        return output

    identity = HeadEdits(weights=lambda layer, p, q, k: p, output=capture("base"))
    steered = HeadEdits(weights=ACT(loaded.geometry, [(1, 2)], settings={"beta": 0.0}).edits().weights,
                        output=capture("act"))
    _logits(loaded, IDS, identity), _logits(loaded, IDS, steered)
    assert torch.equal(captured["act", 0], captured["base", 0])
    changed = (captured["act", 1] != captured["base", 1]).any(dim=(0, 1, 3))
    assert changed.tolist() == [False, False, True, False]


def test_fit_is_seeded_and_its_batched_gain_is_what_one_head_alone_does(task):
    loaded = _llama()
    first = ACT.fit(loaded, task, seed=0, **FIT)
    again = ACT.fit(loaded, task, seed=0, **FIT)
    assert first.heads == again.heads and torch.equal(first.gain, again.gain)
    assert first.heads == [(layer, h) for layer in range(3) for h in range(4) if first.gain[layer, h] > 0]
    assert first.trained_parameters() == 0 and first.settings["candidates"] == 12
    groups = calibration_set(loaded, task, 8, 0, 0)
    assert len(groups) > 1  # prompts of several lengths
    for head in [(0, 1), (2, 3)]:  # the gain of calibrating one head alone, measured directly
        only = ACT(loaded.geometry, [head], settings=first.settings).edits()
        identity = HeadEdits(weights=lambda layer, p, q, k: p)
        total = 0.0
        for group in groups:
            ids, answers = torch.tensor([x[0] for x in group]), torch.tensor([x[1] for x in group])
            total += (_score(loaded, ids, answers, "logprob", only) - _score(loaded, ids, answers, "logprob",
                                                                            identity)).sum().item()
        assert math.isclose(first.gain[head].item(), total / 8, abs_tol=1e-5)
    other = ACT.fit(loaded, task, seed=1, **FIT)
    assert not torch.equal(other.gain, first.gain)
    given = ACT.fit(loaded, task, heads=[(0, 3), (2, 1)])
    assert given.heads == [(0, 3), (2, 1)] and given.settings["selection"] == "given"
    assert ACT.fit(loaded, task, calibration=4).heads == []  # layers 0, 1 and the last are never candidates


def test_steering_decodes_with_the_full_cache():
    loaded = _llama()
    steering = ACT(loaded.geometry, [(1, 1), (2, 0)], settings={"beta": 0.0})
    steered = greedy(loaded, IDS, 4, until="budget", edits=steering.edits())
    plain = greedy(loaded, IDS, 4, until="budget", edits=steering.with_strength(0.0).edits())
    assert len(steered.tokens[0]) == len(plain.tokens[0]) == 4


def test_save_and_load_round_trip(tmp_path, task):
    loaded = _llama()
    steering = ACT.fit(loaded, task, seed=0, **FIT).with_strength(0.8)
    assert steering.heads
    path = save_steering(steering, tmp_path / "act", loaded.info.to_dict(), task.record())
    back = load_steering(path, loaded)
    assert back.heads == steering.heads and back.strength == 0.8 and torch.equal(back.gain, steering.gain)
    assert torch.equal(_logits(loaded, IDS, back.edits()), _logits(loaded, IDS, steering.edits()))
    with pytest.raises(HeadwiseError, match="fitted on model"):
        load_steering(path, _llama(seed=1))
    tensors = steering.tensors()
    with pytest.raises(HeadwiseError, match="must be"):
        ACT.from_saved(loaded.geometry, steering.heads, {**tensors, "head_mask": torch.ones(2, 4)}, steering.settings)
    with pytest.raises(HeadwiseError, match="does not match"):
        ACT.from_saved(loaded.geometry, steering.heads[1:], tensors, steering.settings)
