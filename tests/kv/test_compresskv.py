"""CompressKV: the SRH vote against a hand-written loop, SnapKV exactly when every head votes on one KV
head, the authors' budget allocation, honest bytes, refusals, files and specs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import headwise
from headwise.atlas import Atlas
from headwise.errors import HeadwiseError
from headwise.geometry import Geometry
from headwise.kv import CachePolicy, HeadwiseCache, SnapKVPolicy, parse_policy
from headwise.kv.compresskv import CompressKVPolicy, allocate
from headwise.kv.generate import generate
from headwise.kv.snapkv import snapkv_select
from headwise.scores.semantic_retrieval import srh_select
from tests.conftest import VOCAB, tiny_model, tiny_tokenizer
from tests.reference import naive_srh_select

G = Geometry(model_type="llama", n_layers=4, n_heads=6, n_kv_heads=2, head_dim=8, layer_types=("full",) * 4,
             sliding_window=(None,) * 4, max_positions=4096, vocab_size=100)


def test_selection_matches_a_loop_over_the_selected_heads_only():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 5, 8, generator=gen) * 2
    k = torch.randn(1, 2, 40, 8, generator=gen) * 2
    for heads in ([2], [0, 5], [1, 2, 3]):
        got = srh_select(q, k, 8 ** -0.5, 14, 3, heads)[0].tolist()
        assert got == naive_srh_select(q, k, 8 ** -0.5, 14, 3, heads)
    assert srh_select(q, k, 8 ** -0.5, 14, 3, [0])[0].tolist() != srh_select(q, k, 8 ** -0.5, 14, 3, [5])[0].tolist()


def test_every_head_voting_on_one_kv_head_is_snapkv():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 6, 8, generator=gen) * 2
    k = torch.randn(1, 1, 50, 8, generator=gen) * 2
    got = srh_select(q, k, 8 ** -0.5, 20, 5, [0, 1, 2, 3])
    assert torch.equal(got, snapkv_select(q, k, 8 ** -0.5, 20, 6, 5)[:, 0])


def _mqa_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return headwise.from_model(model, tiny_tokenizer(), name="mqa")


def test_all_heads_and_uniform_budgets_is_snapkv_in_the_cache():
    lm = _mqa_model()
    g = lm.geometry
    every = [list(range(g.n_heads))] * g.n_layers
    ours = CompressKVPolicy(g, 0.25, heads=every, observation=4, kernel=3)
    snap = SnapKVPolicy(g, budget=0.25, observation=4, kernel=3)
    ids = torch.randint(3, 96, (1, 64), generator=torch.Generator().manual_seed(2))
    a, b = HeadwiseCache(ours), HeadwiseCache(snap)
    with torch.no_grad():
        lm.model(input_ids=ids, cache=a, use_cache=True)
        lm.model(input_ids=ids, cache=b, use_cache=True)
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.store.keys, lb.store.keys) and torch.equal(la.store.values, lb.store.values)
    ra = generate(lm, ids, ours, max_new_tokens=6, until="budget")
    rb = generate(lm, ids, snap, max_new_tokens=6, until="budget")
    assert ra.tokens == rb.tokens and ra.kv_bytes == rb.kv_bytes


def authors_allocation(layer_ratio, total_budget, min_tokens, max_tokens):
    """longbench/pred_compresskv.py error_aware_layer_budget_allocation, transcribed."""
    importance = np.array(layer_ratio)
    base = np.full_like(importance, min_tokens, dtype=float)
    extra = np.round(importance * (total_budget - base.sum()))
    budget = np.clip(base + extra, min_tokens, max_tokens)
    diff = int(total_budget - budget.sum())
    while diff != 0:
        if diff > 0:
            cand = np.where(budget < max_tokens)[0]
            for i in cand[np.argsort(-importance[cand], kind="stable")]:
                if budget[i] < max_tokens:
                    budget[i] += 1
                    diff -= 1
                    if diff == 0:
                        break
        else:
            cand = np.where(budget > min_tokens)[0]
            for i in cand[np.argsort(importance[cand], kind="stable")]:
                if budget[i] > min_tokens:
                    budget[i] -= 1
                    diff += 1
                    if diff == 0:
                        break
    return budget.astype(int).tolist()


def test_allocation_is_the_authors_and_sums_to_the_total():
    rng = np.random.default_rng(0)
    for n, avg in ((4, 128), (30, 1365), (7, 40), (30, 33)):
        for _ in range(5):
            share = rng.dirichlet(np.ones(n) * 0.5)
            got = allocate(share, avg * n, min(32, avg), 3 * avg)
            assert got.tolist() == authors_allocation(share, avg * n, min(32, avg), 3 * avg)
            assert got.sum() == avg * n and got.min() >= min(32, avg) and got.max() <= 3 * avg


def _srh_atlas(geometry=G, error=None, srh_heads=2):
    atlas = Atlas.new({"spec": "fake", "weights_sha256": "0" * 64}, geometry, {})
    srh = np.arange(geometry.n_layers * geometry.n_heads, dtype=float).reshape(geometry.n_layers, geometry.n_heads)
    srh[:, 0] = 100.0  # head 0 leads every layer
    atlas.set_score("semantic_retrieval", srh, family="semantic_retrieval", probe=None, description="srh",
                    settings={"srh_heads": srh_heads})
    if error is not None:
        atlas.set_score("srh_eviction_error", np.repeat(np.asarray(error)[:, None], geometry.n_heads, 1),
                        family="semantic_retrieval", probe=None, description="err", settings={"seed": 0})
    return atlas


def test_spec_builds_from_the_atlas_and_budgets_follow_the_error():
    error = np.array([0.1, 0.4, 0.2, 0.3])
    p = parse_policy("compresskv@0.25", G, atlas=_srh_atlas(error=error), context=1000)
    assert isinstance(p, CompressKVPolicy) and p.name == "compresskv@0.25"
    assert p.heads == [[0, 5]] * 4  # each layer's top 2 by semantic_retrieval
    budgets = p.layer_budgets(1000)
    assert budgets.sum() == 250 * 4 and list(np.argsort(budgets)) == [0, 2, 3, 1]
    assert budgets.tolist() == authors_allocation(error / error.sum(), 1000, 32, 750)
    assert (p.tokens_held(1000) == budgets[:, None]).all()
    assert p.layer_budgets(64).sum() == 16 * 4  # short prompts: still the requested total
    assert parse_policy("compresskv@100", G, atlas=_srh_atlas(error=error)).layer_budgets(1000).sum() == 400


@pytest.mark.parametrize("spec, atlas, why", [
    ("compresskv@0.25", None, "needs an atlas"),
    ("compresskv@0.25", "no-error", "srh_eviction_error"),
    ("compresskv@0.25", "empty", "semantic_retrieval"),
    ("compresskv@0", "ok", "share of the prompt"),
    ("compresskv@1.5", "ok", "whole number"),
    ("compresskv@-1", "ok", "share of the prompt"),
    ("compresskv@nan", "ok", "finite"),
    ("compresskv", "ok", "needs an amount"),
    ("compresskv@0.3+whole", "ok", "options"),
    ("compresskv@0.25", "other", "not this model's"),
])
def test_refusals_are_one_line(spec, atlas, why):
    other = Geometry(model_type="llama", n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, layer_types=("full",) * 2,
                     sliding_window=(None,) * 2, max_positions=4096, vocab_size=100)
    atlases = {None: None, "ok": _srh_atlas(error=np.ones(4)), "no-error": _srh_atlas(),
               "empty": Atlas.new({"spec": "fake"}, G, {}), "other": _srh_atlas(other, error=np.ones(2))}
    with pytest.raises(HeadwiseError, match=why) as e:
        parse_policy(spec, G, atlas=atlases[atlas], context=512)
    assert "\n" not in str(e.value)


def test_a_policy_refuses_a_model_of_another_geometry():
    p = CompressKVPolicy(G, 0.3, heads=[[0]] * 4)
    lm = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer())
    with pytest.raises(HeadwiseError, match="was built for 4 layers"):
        generate(lm, torch.tensor([[1, 5, 6, 7]]), p, max_new_tokens=1)
    with pytest.raises(HeadwiseError, match="layer shares"):
        CompressKVPolicy(G, 0.3, heads=[[0]] * 4, layer_share=[1, 2, 3])
    with pytest.raises(HeadwiseError, match="non-empty list of distinct"):
        CompressKVPolicy(G, 0.3, heads=[[0], [], [1], [2]])


def test_cache_keeps_the_selected_tokens_on_every_kv_head_and_bytes_are_the_formula():
    lm = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer())
    g = lm.geometry
    heads = [[1], [0, 3], [2]]
    policy = CompressKVPolicy(g, 0.3, heads=heads, layer_share=[0.2, 0.5, 0.3], observation=4, kernel=3,
                              min_tokens=8)
    ids = torch.randint(3, 96, (1, 80), generator=torch.Generator().manual_seed(4))
    budgets = policy.layer_budgets(80)
    assert budgets.sum() == 24 * 3 and len(set(budgets.tolist())) > 1
    cache = HeadwiseCache(policy)
    with torch.no_grad():
        lm.model(input_ids=ids, cache=cache, use_cache=True)
    assert cache.nbytes() == policy.kv_bytes(80)
    full = HeadwiseCache(CompressKVPolicy(g, 1000, heads=heads))  # keeps everything: the reference keys
    with torch.no_grad():
        lm.model(input_ids=ids, cache=full, use_cache=True)
    for layer in range(g.n_layers):
        kept = cache.layers[layer].store.keys[0]  # [kv, n, d]
        keys = full.layers[layer].store.keys[0]
        assert kept.shape[1] == budgets[layer]
        # one index set for every KV head of the layer, the tokens the layer's SRHs vote for
        match = [[int((keys[h] == kept[h, i]).all(-1).nonzero()[0]) for i in range(kept.shape[1])]
                 for h in range(g.n_kv_heads)]
        assert all(m == match[0] for m in match) and match[0][-4:] == [76, 77, 78, 79]
    res = generate(lm, ids, policy, max_new_tokens=3, until="budget")
    per_token = 2 * g.head_dim * 4 * g.n_kv_heads
    assert res.kv_bytes == per_token * int(budgets.sum() + 3 * g.n_layers)


def test_save_load_round_trip_keeps_the_measured_budgets(tmp_path):
    p = parse_policy("compresskv@0.2", G, atlas=_srh_atlas(error=np.array([0.1, 0.4, 0.2, 0.3])), context=500)
    path = p.save(tmp_path / "ckv.json")
    doc = json.loads(path.read_text())
    assert doc["kind"] == "compresskv" and doc["layer_share"] == pytest.approx([0.1, 0.4, 0.2, 0.3])
    back = CachePolicy.load(path)
    assert isinstance(back, CompressKVPolicy) and back.fields() == p.fields()
    assert (back.layer_budgets(2000) == p.layer_budgets(2000)).all()
    from_spec = parse_policy(str(path), G, context=2000)  # a file needs no atlas
    assert from_spec.kv_bytes(2000) == p.kv_bytes(2000)
    doc["layer_share"] = [0.1, -1, 0.2, 0.3]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(HeadwiseError, match="bad.json: CompressKV layer shares"):
        CachePolicy.load(tmp_path / "bad.json")
    # A fresh process resolves the kind from the file alone.
    code = (f"from headwise.kv import CachePolicy; p = CachePolicy.load({str(path)!r}); "
            f"print(type(p).__name__, int(p.layer_budgets(2000).sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["CompressKVPolicy", "1600"]


def test_a_policy_defined_outside_src_still_parses_beside_compresskv(recent_policy):
    from tests.test_plugins import RecentPolicy

    assert isinstance(parse_policy("recent@8", G), RecentPolicy)
    assert isinstance(parse_policy("compresskv@0.3", G, atlas=_srh_atlas(error=np.ones(4))), CompressKVPolicy)


@pytest.fixture
def recent_policy():
    from headwise.kv import register_policy, spec
    from tests.test_plugins import _build_recent

    register_policy("recent", _build_recent, syntax="recent@W")
    yield
    spec._REGISTERED.pop("recent", None)  # its policy kind stays: tests/test_plugins.py registered it on import


@pytest.mark.slow
def test_smollm2_policy_from_the_bench_atlas_holds_its_formula_bytes(smollm2):
    from pathlib import Path

    from headwise.probes.needle import passkey_case

    atlas = Atlas.load(Path(__file__).resolve().parents[2] / "bench" / "results" / "atlas-smollm2-srh.json")
    policy = parse_policy("compresskv@0.25", smollm2.geometry, atlas=atlas, context=1024)
    case = passkey_case(smollm2.tokenizer, context=1024, depth=0.5, seed=40)
    res = generate(smollm2, case.input_ids, policy, max_new_tokens=4, until="budget")
    t = case.input_ids.shape[1]
    per_token = 2 * smollm2.geometry.head_dim * 4 * smollm2.geometry.n_kv_heads
    assert policy.layer_budgets(t).sum() == round(0.25 * t) * smollm2.geometry.n_layers
    assert res.kv_bytes == policy.kv_bytes(t) + per_token * 4 * smollm2.geometry.n_layers
