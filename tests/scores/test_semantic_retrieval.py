"""semantic_retrieval and srh_eviction_error (CompressKV) against loops written from the authors' code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import headwise
from headwise.geometry import Geometry
from headwise.probes.needle import bundled_needles
from headwise.profile import ProfileSettings, profile
from headwise.scores import retrieval as rt
from headwise.scores import semantic_retrieval as sr
from tests.conftest import tiny_model, tiny_tokenizer
from tests.reference import eager_attentions, naive_srh_select, naive_srh_votes
from tests.scores.test_retrieval import greedy_reference, random_case, toy_model


def naive_semantic(model, case, generated):
    """The authors' retrieval_calculate: at a step whose token is in the needle, + the mass on the needle span."""
    prompt = case.input_ids[0].tolist()
    atts = eager_attentions(model, torch.tensor([prompt + generated[:-1]]))
    s, e = case.needle_spans[case.target]
    out = np.zeros((len(atts), atts[0].shape[1]))
    for t, token in enumerate(generated):
        if token in prompt[s:e]:
            q = len(prompt) - 1 + t
            for layer in range(len(atts)):
                for head in range(atts[0].shape[1]):
                    out[layer, head] += sum(atts[layer][0, head, q, j] for j in range(s, e))
    return out


def test_semantic_trial_matches_the_authors_loop_on_a_copying_model():
    m = toy_model()
    g = torch.Generator().manual_seed(5)
    block = (torch.randperm(93, generator=g)[:20] + 3).tolist()
    case = random_case()
    case.input_ids = torch.tensor([[1] + block + block[:4]])
    case.needle_spans = [(1, 21)]
    score, recall, _ = sr.semantic_trial(m, case)
    generated = greedy_reference(m.model, case, case.reply_budget)
    want = naive_semantic(m.model, case, generated)
    assert want.sum() > 1  # the toy model copies the needle, so steps count
    np.testing.assert_allclose(score, want, atol=1e-5)


def test_semantic_trial_on_a_random_model(tiny):
    case = random_case(seed=3)
    score, _, _ = sr.semantic_trial(tiny, case)
    generated = greedy_reference(tiny.model, case, case.reply_budget)
    np.testing.assert_allclose(score, naive_semantic(tiny.model, case, generated), atol=1e-5)


def test_votes_average_the_selected_heads_only():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 4, 8, generator=gen) * 2
    k = torch.randn(1, 2, 25, 8, generator=gen) * 2
    for heads in ([4], [1, 3], [0, 1, 2, 3, 4, 5]):
        got = sr.srh_votes(q, k, 8 ** -0.5, 3, heads)[0].double()
        torch.testing.assert_close(got, naive_srh_votes(q, k, 8 ** -0.5, 3, heads), atol=1e-5, rtol=1e-5)
    one, other = sr.srh_votes(q, k, 8 ** -0.5, 3, [0]), sr.srh_votes(q, k, 8 ** -0.5, 3, [5])
    assert not torch.allclose(one, other)  # the choice of heads matters
    keep = sr.srh_select(q, k, 8 ** -0.5, 10, 3, [1, 3])[0].tolist()
    assert keep == naive_srh_select(q, k, 8 ** -0.5, 10, 3, [1, 3])


def test_top_heads_per_layer():
    s = np.array([[0.1, 0.9, 0.5], [np.nan, 0.2, 0.2]])
    assert sr.top_heads(s, 2) == [[1, 2], [1, 2]]
    assert sr.top_heads(s, 1) == [[1], [1]]


class _Attn(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        torch.manual_seed(0)
        self.o_proj = torch.nn.Linear(dim, dim, bias=False)


def test_eviction_error_mix_is_the_relative_output_error_of_the_kept_tokens():
    g = Geometry(model_type="llama", n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, layer_types=("full",),
                 sliding_window=(None,), max_positions=4096, vocab_size=100)
    gen = torch.Generator().manual_seed(1)
    t, d = 40, 8
    q = torch.randn(1, 4, t, d, generator=gen)
    k = torch.randn(1, 2, t + 2, d, generator=gen) * 2
    v = torch.randn(1, 2, t + 2, d, generator=gen)
    module, scale = _Attn(4 * d), d ** -0.5
    mix = sr._EvictionError(g, [[0, 3]], budget=16)
    prompt_out = torch.zeros(1, t, 4, d)
    assert mix(module, 0, q, k[:, :, :t], v[:, :, :t], scale, prompt_out) is prompt_out
    kept = sr.srh_select(q[:, :, -sr.WINDOW:], k[:, :, :t], scale, 16, sr.KERNEL, [0, 3])[0]
    total = 0.0
    torch.set_grad_enabled(False)
    for step in (t, t + 1):  # two decode steps over the prompt + the decoded keys
        qs = torch.randn(1, 4, 1, d, generator=gen)
        keys = torch.arange(step + 1)
        rows = []
        for idx in (keys, torch.cat([kept, torch.arange(t, step + 1)])):
            heads = []
            for h in range(4):
                w = torch.softmax((qs[0, h, 0] @ k[0, h // 2, idx].T) * scale, -1)
                heads.append(w @ v[0, h // 2, idx])
            rows.append(module.o_proj(torch.cat(heads)))
        full, evicted = rows
        total += float(torch.linalg.norm(evicted - full) / (torch.linalg.norm(full) + 1e-5))
        out = torch.stack([torch.softmax((qs[0, h, 0] @ k[0, h // 2, :step + 1].T) * scale, -1)
                           @ v[0, h // 2, :step + 1] for h in range(4)])[None, None]
        mix(module, 0, qs, k[:, :, :step + 1], v[:, :, :step + 1], scale, out)
    torch.set_grad_enabled(True)
    assert total > 0.01
    assert mix.error[0] == pytest.approx(total, rel=1e-4)


def _small_grid(monkeypatch, tmp_path):
    monkeypatch.setitem(rt.GRIDS, "default", {"contexts": (96,), "depths": (0.2, 0.8)})
    monkeypatch.setattr(sr, "bundled_needles", lambda: bundled_needles()[5:6])
    text = tmp_path / "filler.txt"
    text.write_text(" ".join(f"t{i % 40}." for i in range(600)))
    return str(text)


def test_profile_is_deterministic_and_layer_shares_sum_to_one(tmp_path, monkeypatch):
    tiny = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer(), name="tiny")
    text = _small_grid(monkeypatch, tmp_path)
    monkeypatch.setattr(sr, "MIN_RECALL", -1.0)  # a random model recalls nothing; keep its trials anyway
    names = ["semantic_retrieval", "srh_eviction_error"]
    a = profile(tiny, names, ProfileSettings(text=str(text), srh_heads=2, eviction_budget=24))
    b = profile(tiny, names, ProfileSettings(text=str(text), srh_heads=2, eviction_budget=24))
    err = a.score("srh_eviction_error")
    np.testing.assert_array_equal(err, b.score("srh_eviction_error"))
    np.testing.assert_array_equal(a.score("semantic_retrieval"), b.score("semantic_retrieval"))
    assert err[:, 0].sum() == pytest.approx(1.0) and (err == err[:, :1]).all() and (err > 0).all()
    probe = a.data["settings"]["probes"]["needle_semantic_retrieval"]
    assert probe["srh_per_layer"] == sr.top_heads(a.score("semantic_retrieval"), 2) and probe["trials"] == 2
    c = profile(tiny, names, ProfileSettings(text=str(text), srh_heads=2, eviction_budget=24, seed=7))
    assert not np.array_equal(c.score("srh_eviction_error"), err)  # other calibration prompts


def test_too_many_srh_heads_is_refused():
    g = Geometry(model_type="llama", n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, layer_types=("full",),
                 sliding_window=(None,), max_positions=4096, vocab_size=100)
    with pytest.raises(headwise.HeadwiseError, match="more than the model's 4"):
        sr.SemanticRetrievalScores().check(g, ProfileSettings(srh_heads=5))
