"""Findings on a model whose heads we know: a 2-layer attention-only Llama trained on repeated
random blocks (tests/data/make_toy_induction.py). Its ground truth, measured from eager attention
and ablations when it was built, is in tests/data/toy_induction/heads.json: L0.H1 is the
previous-token head; every layer-1 head attends at the induction offset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_tokenizer

TOY = Path(__file__).parent / "data" / "toy_induction"


@pytest.fixture(scope="module")
def toy_atlas():
    from transformers import LlamaForCausalLM

    import headwise
    from headwise.profile import ProfileSettings, profile

    model = LlamaForCausalLM.from_pretrained(TOY).eval()
    loaded = headwise.from_model(model, tiny_tokenizer(), name="toy-induction")
    settings = ProfileSettings(block_len=32, repeated_sequences=8, razor_sequences=4)
    return profile(loaded, ["previous_token", "induction", "razor_induction"], settings)


def test_previous_token_head_ranks_first(toy_atlas):
    truth = json.loads((TOY / "heads.json").read_text())
    (layer, head), = truth["roles"]["previous_token_heads"]
    top_layer, top_head, value = toy_atlas.top("previous_token", 1)[0]
    assert (top_layer, top_head) == (layer, head)
    assert "previous-token" in toy_atlas.roles(layer, head)


@pytest.mark.parametrize("score", ["induction", "razor_induction"])
def test_induction_heads_rank_first(toy_atlas, score):
    truth = json.loads((TOY / "heads.json").read_text())
    offset_attention = np.array(truth["attention_induction_offset"])
    expected = {(int(layer), int(head)) for layer, head in zip(*np.nonzero(offset_attention > 0.5))}
    ranked = toy_atlas.top(score, len(expected))
    assert {(layer, head) for layer, head, _ in ranked} == expected
    # and every other head scores far lower than the weakest induction head
    values = np.array(toy_atlas.score(score))
    others = [values[layer, head] for layer in range(values.shape[0]) for head in range(values.shape[1])
              if (layer, head) not in expected]
    assert max(others) < 0.5 * min(value for _, _, value in ranked)
