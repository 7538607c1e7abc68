"""LoFiT: the offset edit is an exact shift of the output projection's input, strength 0 is exact,
fitting is seeded, given heads are the only ones trained, and a saved steering loads back identically."""

from __future__ import annotations

import json

import pytest
import torch

import headwise
from headwise.errors import HeadwiseError
from headwise.instrument import Session
from headwise.parts import attention_modules, output_projection
from headwise.steer.files import load_steering, save_steering
from headwise.steer.lofit import LoFiT, _examples
from headwise.tasks import load_task
from tests.conftest import tiny_model, tiny_tokenizer

FAST = dict(epochs=1, batch=4, max_pairs=12)  # a few optimizer steps: enough to move every vector


@pytest.fixture
def task(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"t{i} t{i + 1}", "target": f"t{i + 2}"}) + "\n"
                            for i in range(3, 40)))
    return load_task(str(path))


def _llama():
    return headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer(), name="tiny-llama-gqa")


def _logits(loaded, ids, edits=None):
    with torch.no_grad(), Session(loaded.geometry, edits=edits):
        return loaded.model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 9, 14, 22, 5, 9, 30, 41, 7]])


def test_offset_edit_is_a_shift_of_the_output_projection_input(tiny):
    g = tiny.geometry
    heads = [(0, 1), (g.n_layers - 1, 0), (g.n_layers - 1, g.n_heads - 1)]
    offsets = torch.randn(len(heads), g.head_dim, generator=torch.Generator().manual_seed(0))
    steering = LoFiT(g, heads, offsets, strength=0.7)
    attention = attention_modules(tiny.model, g)
    handles = []
    for (layer, head), v in zip(heads, offsets):
        def shift(module, args, head=head, v=v):  # the naive reference: the head's slice of o_proj's input
            x = args[0].clone()
            x[..., head * g.head_dim:(head + 1) * g.head_dim] += 0.7 * v
            return (x, *args[1:])
        handles.append(output_projection(attention[layer]).register_forward_pre_hook(shift))
    try:
        reference = _logits(tiny, IDS)
    finally:
        for h in handles:
            h.remove()
    steered = _logits(tiny, IDS, steering.edits())
    assert torch.equal(steered, reference)
    assert not torch.allclose(steered, _logits(tiny, IDS), atol=1e-3)


def test_strength_zero_leaves_logits_unchanged(tiny, task):
    steering = LoFiT.fit(tiny, task, seed=0, **FAST)
    base = _logits(tiny, IDS)
    assert torch.equal(_logits(tiny, IDS, steering.with_strength(0.0).edits()), base)
    assert not torch.equal(_logits(tiny, IDS, steering.edits()), base)


def test_selection_keeps_three_percent_of_heads_and_records_it(task):
    loaded = _llama()
    g = loaded.geometry
    steering = LoFiT.fit(loaded, task, seed=0, **FAST)
    s = steering.settings
    assert len(steering.heads) == s["k"] == 1  # 3% of 12 heads rounds to 0: at least one
    assert s["selection"] == "learned" and s["selection_parameters"] == g.n_layers * g.n_heads * g.head_dim
    norms = torch.tensor(s["selection_norms"])
    assert norms.shape == (g.n_layers, g.n_heads)
    layer, head = steering.heads[0]
    assert norms[layer, head] == norms.max()  # the head whose scaling grew most
    assert steering.trained_parameters() == g.head_dim
    assert len(LoFiT.fit(loaded, task, seed=0, k=5, **FAST).heads) == 5
    json.dumps(s, allow_nan=False)
    with pytest.raises(HeadwiseError, match="no option"):
        LoFiT.fit(loaded, task, lr=1.0)


def test_fit_is_deterministic_given_the_seed(task):
    loaded = _llama()
    a, b = (LoFiT.fit(loaded, task, seed=4, k=2, **FAST) for _ in range(2))
    assert a.heads == b.heads and torch.equal(a.offsets, b.offsets)
    assert a.settings["selection_norms"] == b.settings["selection_norms"]
    c = LoFiT.fit(loaded, task, seed=5, k=2, **FAST)
    assert not torch.equal(a.offsets, c.offsets)


def test_given_heads_are_the_only_ones_trained(task):
    loaded = _llama()
    g = loaded.geometry
    weights = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    given = [(2, 3), (0, 1)]
    steering = LoFiT.fit(loaded, task, heads=given, seed=0, **FAST)
    assert steering.heads == sorted(given) and steering.settings["selection"] == "given"
    assert "selection_norms" not in steering.settings
    assert steering.offsets.shape == (2, g.head_dim)
    # the edit touches exactly the given heads and nothing else
    edits = steering.edits()
    for layer in range(g.n_layers):
        moved = edits.output(layer, torch.zeros(1, 3, g.n_heads, g.head_dim)).abs().sum(dim=(0, 1, 3))
        assert [(layer, h) for h in range(g.n_heads) if moved[h] > 0] == [h for h in sorted(given) if h[0] == layer]
    # the model is left as it was: weights and their requires_grad flags
    for n, p in loaded.model.named_parameters():
        assert torch.equal(p, weights[n]) and p.requires_grad
    with pytest.raises(HeadwiseError, match="each once"):
        LoFiT.fit(loaded, task, heads=[(0, 1), (0, 1)], **FAST)
    with pytest.raises(HeadwiseError, match="outside"):
        LoFiT.fit(loaded, task, heads=[(9, 0)], **FAST)


def test_offsets_lower_the_answer_loss(task):
    loaded = _llama()
    steering = LoFiT.fit(loaded, task, heads=[(1, 0), (2, 2)], seed=0, offset_lr=0.1, epochs=3, batch=4)

    def answer_loss(edits):
        losses = []
        for ids, n in _examples(loaded, task.train):
            logits = _logits(loaded, torch.tensor([ids]), edits)[0, n - 1:-1]
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[n:])))
        return float(torch.stack(losses).mean())

    assert answer_loss(steering.edits()) < answer_loss(None) - 0.1


def test_save_load_round_trip_and_refusals(task, tmp_path):
    loaded = _llama()
    steering = LoFiT.fit(loaded, task, seed=0, k=3, **FAST)
    path = save_steering(steering, tmp_path / "lofit", loaded.info.to_dict(), task.record())
    back = load_steering(path, loaded)
    assert isinstance(back, LoFiT) and back.heads == steering.heads and back.settings == steering.settings
    assert torch.equal(_logits(loaded, IDS, back.edits()), _logits(loaded, IDS, steering.edits()))
    assert torch.equal(_logits(loaded, IDS, load_steering(path, loaded, strength=0.0).edits()), _logits(loaded, IDS))
    other = headwise.from_model(tiny_model("llama-gqa", seed=1), tiny_tokenizer(), name="other")
    with pytest.raises(HeadwiseError, match="fitted on model") as refused:
        load_steering(path, other)
    assert "\n" not in str(refused.value)
    bad = {"offsets": torch.zeros(2, loaded.geometry.head_dim)}
    with pytest.raises(HeadwiseError, match="offsets") as refused:
        LoFiT.from_saved(loaded.geometry, steering.heads, bad, {})
    assert "\n" not in str(refused.value)
