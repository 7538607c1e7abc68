"""DuoAttention gates: the gated blend is exact at its ends, and training moves only the gates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import headwise
from headwise import Session
from headwise.kv import HeadPolicy, HeadwiseCache
from headwise.profile import ProfileSettings
from headwise.scores.duo import gated_mix, train_gates
from tests.conftest import tiny_model, tiny_tokenizer


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_gate_ends_are_full_attention_and_the_streaming_cache(tiny, value):
    g, model = tiny.geometry, tiny.model
    ids = _ids(40, seed=1)
    gates = torch.full((g.n_layers, g.n_kv_heads), value)
    with torch.no_grad(), Session(g, mix=gated_mix(g, gates, sink=3, window=6)):
        mixed = model(input_ids=ids, use_cache=False).logits
    policy = HeadPolicy.full_cache(g) if value == 1.0 else HeadPolicy.streaming(g, sink=3, window=6, prefill="bounded")
    with torch.no_grad():
        ref = model(input_ids=ids, cache=HeadwiseCache(policy), use_cache=True).logits
    torch.testing.assert_close(mixed, ref, atol=2e-4, rtol=2e-4)
    if value == 0.0:  # the blend really changes something, so the comparison above can fail
        with torch.no_grad():
            plain = model(input_ids=ids, use_cache=False).logits
        assert (plain - mixed).abs().max() > 1e-3


def test_training_moves_gates_deterministically_and_leaves_the_model(word_file):
    for arch in ("llama-gqa", "gemma3-sliding"):
        lm = headwise.from_model(tiny_model(arch), tiny_tokenizer())
        before = {k: v.clone() for k, v in lm.model.state_dict().items()}
        settings = ProfileSettings(text=str(word_file)).replace(duo_steps=3, duo_haystack=60,
                                       duo_passkeys=2, duo_passkey_words=4, duo_sink=2, duo_window=8)
        gates, history = train_gates(lm, settings)
        again, _ = train_gates(lm, settings)
        g = lm.geometry
        sliding = np.array([t == "sliding" for t in g.layer_types])
        assert gates.shape == (g.n_layers, g.n_kv_heads) and np.isnan(gates[sliding]).all()
        trained = gates[~sliding]
        assert ((trained >= 0) & (trained <= 1)).all() and (trained < 1).any()
        np.testing.assert_array_equal(gates, again)
        assert len(history) == 3 and history[0]["distill"] == 0.0  # gates start at 1: the full model itself
        assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())
        assert all(p.requires_grad for p in lm.model.parameters())


@pytest.mark.slow
def test_multi_passkey_sample_labels_the_recall_part(smollm2):
    from headwise.probes.passkeys import MultiPasskeySamples

    tok = smollm2.tokenizer
    s = MultiPasskeySamples(tok, haystack=300, n_passkeys=3, passkey_words=5, seed=4).sample()
    ids = s.input_ids[0]
    context, recall = tok.decode(ids[~s.label_mask]), tok.decode(ids[s.label_mask])
    assert s.label_mask.any() and not s.label_mask[0] and s.label_mask[-1]
    assert context.count("passkey to the vault:") == 3 and context.rstrip().endswith("</book>.")
    assert recall.startswith("Based on the content of the book, what is the first passkey")
    keys = [line.split("Passkey: ")[1] for line in recall.split("\n") if line.startswith("Passkey: ")]
    assert len(keys) == 3 and all(len(k.split()) == 5 and k in context for k in keys)
