"""Policies: which KV heads get the full cache, from atlases, DuoAttention files, budgets, at random."""

from __future__ import annotations

import json

import numpy as np
import pytest

from headwise.atlas import Atlas
from headwise.errors import HeadwiseError
from headwise.geometry import Geometry
from headwise.kv import HeadPolicy, SnapKVPolicy
from headwise.kv.spec import parse_policy

G = Geometry(model_type="llama", n_layers=4, n_heads=6, n_kv_heads=2, head_dim=8, layer_types=("full",) * 4,
             sliding_window=(None,) * 4, max_positions=4096, vocab_size=100)
GS = Geometry(model_type="gemma3_text", n_layers=3, n_heads=4, n_kv_heads=1, head_dim=8,
              layer_types=("sliding", "sliding", "full"), sliding_window=(16, 16, None), max_positions=4096,
              vocab_size=100)


def _atlas(geometry: Geometry, **scores: np.ndarray) -> Atlas:
    atlas = Atlas.new({"spec": "fake", "weights_sha256": "0" * 64}, geometry, {})
    for name, values in scores.items():
        atlas.set_score(name, values, family="test", probe=None, description=name)
    return atlas


def test_from_atlas_high_score_is_full_and_groups_take_max():
    s = np.zeros((4, 6))
    s[1, 4] = 0.9  # one query head of KV group 1 in layer 1
    s[3, 0] = 0.5
    s[2, 2] = 0.1
    p = HeadPolicy.from_atlas(_atlas(G, retrieval=s), "retrieval", full_fraction=2 / 8)
    assert p.full.sum() == 2 and p.full[1, 1] and p.full[3, 0]
    assert p.source["full_when"] == "high"


def test_streamable_mass_low_is_full_with_min_over_group():
    s = np.ones((4, 6))
    s[0, 1] = 0.2  # group 0 of layer 0 has one head that reads the middle
    s[2, 5] = 0.4
    s[1, 2], s[3, 3] = 1.5, 1.2
    p = HeadPolicy.from_atlas(_atlas(G, streamable_mass=s), "streamable_mass", full_fraction=0.25)
    assert p.full.sum() == 2 and p.full[0, 0] and p.full[2, 1]
    flipped = HeadPolicy.from_atlas(_atlas(G, streamable_mass=s), "streamable_mass", full_fraction=0.25,
                                higher_is_full=True)
    assert flipped.full[1, 0] and flipped.full[3, 1] and not flipped.full[0, 0]


def test_budget_bytes_picks_most_heads_that_fit():
    s = np.arange(24, dtype=float).reshape(4, 6)
    full = HeadPolicy.full_cache(G).kv_bytes(1000)
    p = HeadPolicy.from_atlas(_atlas(G, retrieval=s), "retrieval", budget_bytes=full // 2, context=1000, sink=10,
                          window=40)
    assert p.kv_bytes(1000) <= full // 2
    more = HeadPolicy(G, p.full.copy(), sink=10, window=40)
    more.full.ravel()[np.flatnonzero(~p.full.ravel())[0]] = True
    assert more.kv_bytes(1000) > full // 2
    with pytest.raises(HeadwiseError, match="budget"):
        HeadPolicy.from_atlas(_atlas(G, retrieval=s), "retrieval", budget_bytes=10, context=1000)


def test_random_is_seeded_and_same_size():
    a, b, c = HeadPolicy.random(G, 0.25, seed=1), HeadPolicy.random(G, 0.25, seed=1), HeadPolicy.random(G, 0.25, seed=2)
    assert a.n_full == 2 and np.array_equal(a.full, b.full)
    assert any(not np.array_equal(a.full, HeadPolicy.random(G, 0.25, seed=s).full) for s in range(2, 8))
    assert c.n_full == 2


def test_sliding_layers_are_not_selectable():
    p = HeadPolicy.streaming(GS, sink=2, window=4)
    assert p.full[:2].all() and not p.full[2].any() and p.n_selectable == 1
    assert p.kind(0, 0) == "model-window" and p.kind(2, 0) == "streaming"
    assert HeadPolicy.random(GS, 1.0).n_full == 1


def test_duo_file(tmp_path):
    gates = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.05], [0.7, 0.6]])
    path = tmp_path / "full_attention_heads.tsv"
    path.write_text("\n".join("\t".join(str(x) for x in row) for row in gates) + "\n")
    p = HeadPolicy.from_duo_file(path, G, full_fraction=0.5)
    assert p.full.sum() == 4 and p.full[0, 1] and p.full[1, 0] and p.full[3, 0] and p.full[3, 1]
    bad = tmp_path / "bad.tsv"
    bad.write_text("0.1\t0.2\t0.3\n")
    with pytest.raises(HeadwiseError, match="gate matrix"):
        HeadPolicy.from_duo_file(bad, G)
    bad.write_text("a\tb\n")
    with pytest.raises(HeadwiseError, match="tab-separated"):
        HeadPolicy.from_duo_file(bad, G)


def test_razor_takes_echo_then_induction():
    echo = np.zeros((4, 6))
    echo[0, 0] = 1.0
    induction = np.arange(24, dtype=float).reshape(4, 6)
    atlas = _atlas(G, echo=echo, razor_induction=induction)
    p = HeadPolicy.from_atlas(atlas, "razor", full_fraction=1.0)
    assert p.all_full
    p = HeadPolicy.from_atlas(atlas, "razor", full_fraction=0.25)  # 2 heads < 8: no echo slot, top induction only
    assert p.full[3].all() and p.full.sum() == 2



def test_kv_budget_spec_fits_the_most_heads_in_a_share_of_the_full_cache():
    atlas = _atlas(G, retrieval=np.arange(24, dtype=float).reshape(4, 6))
    full = HeadPolicy.full_cache(G).kv_bytes(1000)
    for spec in ("headwise:retrieval@kv0.5", "random@kv0.5:4+whole"):
        p = parse_policy(spec, G, atlas=atlas, context=1000, sink=10, window=40)
        assert p.kv_bytes(1000) <= full // 2
        more = HeadPolicy(G, p.full.copy(), sink=10, window=40)
        more.full.ravel()[np.flatnonzero(~p.full.ravel())[0]] = True
        assert more.kv_bytes(1000) > full // 2, spec
    # 8 KV heads; the streaming ones cost 50 of 1000 tokens: 4 full = 0.525 > 0.5, so 3
    assert parse_policy("random@kv0.5:4", G, context=1000, sink=10, window=40).n_full == 3
    assert parse_policy("headwise:retrieval@kv0.5", G, atlas=atlas, context=1000, sink=10, window=40).full[3].all()
    # a longer prompt leaves more room for full heads under the same share
    assert parse_policy("random@kv0.6", G, context=4000, sink=10, window=40).n_full > \
        parse_policy("random@kv0.6", G, context=200, sink=10, window=40).n_full
    for bad, why in (("random@kv0.5", "give a context"), ("random@kv1.5", r"in \(0, 1\]"),
                     ("headwise:retrieval@kvx", "not a number")):
        with pytest.raises(HeadwiseError, match=why):
            parse_policy(bad, G, atlas=atlas, context=None if "context" in why else 1000)

def test_round_trip_and_geometry_check(tmp_path):
    p = HeadPolicy.random(G, 0.5, seed=3, sink=8, window=32, compensate=True)
    q = HeadPolicy.load(p.save(tmp_path / "p.json"))
    assert np.array_equal(p.full, q.full) and (q.sink, q.window, q.compensate) == (8, 32, True)
    assert q.prefill == "whole"  # the default: the prefill that keeps the full cache's replies
    assert HeadPolicy.load(HeadPolicy.streaming(G, prefill="bounded").save(tmp_path / "w.json")).prefill == "bounded"
    t = HeadPolicy.load(HeadPolicy.streaming(G, prefill="tail", tail=64, quant=4).save(tmp_path / "t.json"))
    assert (t.prefill, t.tail, t.quant) == ("tail", 64, 4)
    # A file from before the default changed has no prefill field and meant the bounded prefill.
    doc = json.loads((tmp_path / "p.json").read_text())
    for key in ("prefill", "tail", "quant"):
        del doc[key]
    (tmp_path / "old.json").write_text(json.dumps(doc))
    assert HeadPolicy.load(tmp_path / "old.json").prefill == "bounded"
    with pytest.raises(HeadwiseError, match="prefill must be"):
        HeadPolicy.streaming(G, prefill="all")
    with pytest.raises(HeadwiseError, match="built for"):
        q.check(GS)
    with pytest.raises(HeadwiseError, match="matrix"):
        HeadPolicy(G, np.ones((3, 2), bool))


def test_parse_policy_specs():
    atlas = _atlas(G, streamable_mass=np.random.default_rng(0).random((4, 6)))
    assert parse_policy("full", G).all_full
    s = parse_policy("streaming@0.25", G, context=1000)
    assert s.sink == 4 and s.window == 246 and s.n_full == 0
    h = parse_policy("headwise:streamable_mass@0.5+comp", G, atlas=atlas, window=64)
    assert h.n_full == 4 and h.compensate and h.window == 64 and h.name == "headwise:streamable_mass@0.5+comp"
    assert parse_policy("random@0.25:3", G).source["seed"] == 3
    assert parse_policy("random@0.25:3", G).prefill == "whole"
    assert parse_policy("random@0.25:3+bounded", G).prefill == "bounded"
    t = parse_policy("headwise:streamable_mass@0.5+tail64+mid8", G, atlas=atlas)
    assert (t.prefill, t.tail, t.middle) == ("tail", 64, 8) and t.option_suffix() == "+tail64+mid8"
    assert "last 64 queries" in t.describe()
    assert parse_policy("full+q8", G).quant == 8 and parse_policy("random@0.5+q4", G).quant == 4
    e = parse_policy("random@0.5+early2+mid8", G)
    assert (e.prefill, e.tail, e.early, e.option_suffix()) == ("tail", 0, 2, "+early2+mid8")
    assert [e.layer_tail(i) for i in range(4)] == [None, None, 0, 0]
    assert parse_policy("random@0.5+tail16+early1", G).layer_tail(3) == 16
    k = parse_policy("random@0.5+early1+stride8+mid8", G)
    assert (k.prefill, k.tail, k.early, k.stride, k.option_suffix()) == ("tail", 0, 1, 8, "+early1+stride8+mid8")
    assert "every 8th earlier token" in k.describe()
    assert parse_policy("random@0.5+stride4+tail16", G).layer_tail(0) == 16
    bs = parse_policy("random@0.5+blocks16+mid64", G)
    assert (bs.prefill, bs.blocks, bs.stride, bs.option_suffix()) == ("tail", 16, 0, "+blocks16+mid64")
    assert "16 key blocks per query block" in bs.describe()
    w = parse_policy("headwise:streamable_mass@0.5+whole+comp", G, atlas=atlas)
    assert (w.prefill, w.compensate, w.n_full) == ("whole", True, 4)
    assert parse_policy("streaming@64+whole", G).prefill == "whole"
    snap = parse_policy("snapkv@0.3", G)
    assert isinstance(snap, SnapKVPolicy) and snap.tokens_kept(1000) == 300
    for bad, why in (("nope", "unknown policy"), ("headwise:streamable_mass@0.5", "needs an atlas"),
                     ("headwise:streamable_mass:sideways@0.5", "direction"), ("random@x", "not a number"),
                     ("full+whole", "takes no option"), ("snapkv@0.3+comp", "takes no option"),
                     ("random@0.5+q3", "8, 4 or 2 bits"), ("random@0.5+q", r"\+q takes"),
                     ("full+q16", "8, 4 or 2 bits"),
                     ("random@0.5+tail", r"\+tail takes"), ("random@0.5+tail0", "1 <= N"),
                     ("random@0.5+whole+bounded", "two prefill modes"), ("random@0.5+tail8+whole", "two prefill"),
                     ("random@0.5+bounded+mid8", r"drop \+bounded"), ("random@0.5+whole+early2", "two prefill"),
                     ("random@0.5+early", "number of layers"), ("random@0.5+early9", r"early layers in \[0, 4\]"),
                     ("random@0.5+stride", r"\+stride takes"), ("random@0.5+stride0", "1 <= N"),
                     ("random@0.5+bounded+stride8", "two prefill"), ("random@0.5+stride8+comp", r"\+comp"),
                     ("snapkv@0.3+stride8", "takes no option"), ("random@0.5+blocks", r"\+blocks takes"),
                     ("random@0.5+blocks0", "1 <= N"), ("random@0.5+stride8+blocks4", "two patterns"),
                     ("random@0.5+blocks4+comp", r"\+blocksK does not combine"),
                     ("random@0.5+bounded+blocks4", "two prefill"), ("snapkv@0.3+blocks8", "takes no option")):
        with pytest.raises(HeadwiseError, match=why):
            parse_policy(bad, G, atlas=None if "atlas" in why else atlas)


def test_middle_tokens_in_specs_bytes_budgets_and_files(tmp_path):
    atlas = _atlas(G, retrieval=np.arange(24, dtype=float).reshape(4, 6))
    p = parse_policy("headwise:retrieval@0.25+whole+mid30", G, atlas=atlas, sink=10, window=40)
    assert (p.middle, p.prefill, p.n_full) == (30, "whole", 2)
    assert "30 middle tokens" in p.describe()
    per_token = 2 * G.head_dim * 4
    # 2 full heads of 1000 tokens, 6 streaming heads of 10 + 40 + 30
    assert p.kv_bytes(1000) == per_token * (2 * 1000 + 6 * 80)
    assert p.kv_bytes(60) == per_token * 8 * 60  # a short prompt: nothing to drop
    # middle tokens come out of the same budget: 3 full heads + 5 x 50 fit in half of 8 x 1000, 3 + 5 x 250 do not
    assert parse_policy("random@kv0.5+whole", G, context=1000, sink=10, window=40).n_full == 3
    assert parse_policy("random@kv0.5+whole+mid200", G, context=1000, sink=10, window=40).n_full == 2
    assert HeadPolicy.load(p.save(tmp_path / "m.json")).middle == 30
    strided = parse_policy("headwise:retrieval@0.25+stride8+mid30", G, atlas=atlas)
    assert HeadPolicy.load(strided.save(tmp_path / "s.json")).stride == 8
    assert parse_policy(str(tmp_path / "s.json") + "+whole", G).stride == 0  # a prefill option replaces the file's
    assert parse_policy(str(tmp_path / "m.json") + "+stride4", G).stride == 4
    blocked = HeadPolicy.load(parse_policy("headwise:retrieval@0.25+blocks8", G, atlas=atlas).save(tmp_path / "b.json"))
    assert (blocked.blocks, blocked.prefill) == (8, "tail")
    assert parse_policy(str(tmp_path / "b.json") + "+stride4", G).blocks == 0  # the file's pattern is replaced
    assert parse_policy(str(tmp_path / "m.json"), G).middle == 30
    for bad, why in (("headwise:retrieval@0.25+bounded+mid30", "bounded"), ("razor@0.25+whole+mid8", "compensation"),
                     ("full+mid8", "takes no option"), ("headwise:retrieval@0.25+whole+midx", "not a number")):
        with pytest.raises(HeadwiseError, match=why):
            parse_policy(bad, G, atlas=atlas)


def test_specs_mean_what_they_say_or_are_refused(tmp_path):
    from headwise.kv.spec import check_spec

    grammar = (("random:7@0.5", "no ':' argument"), ("razor:zzz@0.5", "no ':' argument"),
               ("full:", "nothing after"), ("full@", "nothing after"), ("streaming:", "nothing after"),
               ("headwise@0.5", "needs its"), ("duo:x.tsv", "needs an amount"), ("streamingXYZ", "unknown policy"),
               ("full+whole", "takes no option"), ("random@0.5+q1", "8, 4 or 2 bits"))
    for bad, why in grammar + (("streaming@5_0", "not a number"), ("snapkv@1e400", "finite")):
        if (bad, why) in grammar:
            with pytest.raises(HeadwiseError, match=why):
                check_spec(bad)  # the grammar alone, before any model is loaded
        with pytest.raises(HeadwiseError, match=why):
            parse_policy(bad, G, context=1000)
    # X of the full cache counts the middle tokens too.
    p = parse_policy("streaming@0.5+whole+mid64", G, context=1000)
    assert p.kv_bytes(1000) == HeadPolicy.full_cache(G).kv_bytes(1000) // 2 and p.window == 500 - 4 - 64
    # A DuoAttention file under a byte budget, like the other head policies.
    gates = tmp_path / "gates.tsv"
    gates.write_text("\n".join("\t".join(str((i * 2 + j) / 8) for j in range(2)) for i in range(4)))
    budget = parse_policy(f"duo:{gates}@kv0.5", G, context=1000, sink=10, window=40)
    assert budget.n_full == 3 and budget.kv_bytes(1000) <= HeadPolicy.full_cache(G).kv_bytes(1000) // 2
    gates.write_text("nan\t1\n" * 4)
    with pytest.raises(HeadwiseError, match="finite"):
        parse_policy(f"duo:{gates}@0.5", G)
    # A saved policy may not ask for more tokens than the model has, nor take --sink/--window.
    big = HeadPolicy.streaming(G, window=2**20).to_dict()
    path = tmp_path / "big.json"
    path.write_text(__import__("json").dumps(big))
    with pytest.raises(HeadwiseError, match="--window must be"):
        parse_policy(str(path), G)
    ok = tmp_path / "ok.json"
    HeadPolicy.streaming(G).save(ok)
    with pytest.raises(HeadwiseError, match="own sinks and window"):
        parse_policy(str(ok), G, sink=8)
