"""headwise.prune: physically removed heads equal zeroed heads, saved as a plain transformers model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import headwise
from headwise import Atlas, HeadwiseError
from headwise.cli import main
from headwise.prune import (
    PROVENANCE_FILE,
    check_heads,
    provenance,
    prune_heads,
    pruning_units,
    representable_fractions,
    save_pruned,
    select_heads,
)
from tests.conftest import tiny_model, tiny_tokenizer

PRUNABLE = ["llama-gqa", "qwen2", "qwen3", "gemma3-sliding"]


def _loaded(arch: str) -> headwise.LoadedModel:
    return headwise.from_model(tiny_model(arch), tiny_tokenizer(), name=f"tiny-{arch}")


def _atlas(loaded: headwise.LoadedModel, values: np.ndarray, name: str = "importance_norm") -> Atlas:
    atlas = Atlas.new(loaded.info.to_dict(), loaded.geometry, {})
    atlas.set_score(name, values, family="importance", probe=None, description="hand-made")
    return atlas


def _expected_drop(loaded: headwise.LoadedModel, removed_q: int, removed_kv: int) -> int:
    """Parameters gone per the projections' shapes: q rows (+bias), k/v rows (+bias), o_proj input columns."""
    g, total = loaded.geometry, 0
    for module in loaded.model.modules():
        if getattr(module, "_headwise_layer", None) is None:
            continue
        for name, n in (("q_proj", removed_q), ("k_proj", removed_kv), ("v_proj", removed_kv)):
            proj = getattr(module, name)
            total += n * g.head_dim * (proj.in_features + (proj.bias is not None))
        total += removed_q * g.head_dim * module.o_proj.out_features
    return total


@pytest.mark.parametrize("arch", PRUNABLE)
def test_pruned_model_equals_zeroed_heads_and_loads_without_headwise(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded = _loaded(arch)
    g = loaded.geometry
    units = pruning_units(g)
    # Llama's and Gemma3's configs want hidden % heads == 0: one MQA unit is one head, so prune two.
    per_layer = 2 if g.n_kv_heads == 1 else 1
    removed = {layer: sorted(h for u in range(per_layer) for h in units[(layer + 1 + u) % len(units)])
               for layer in range(g.n_layers)}
    heads = [(layer, h) for layer, hs in removed.items() for h in hs]
    model = prune_heads(loaded, heads)
    out = save_pruned(model, loaded.tokenizer, tmp_path / "pruned",
                      provenance(loaded, heads, score="hand", fraction=None, seed=None))
    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert not hasattr(plain.model.layers[0].self_attn, "_headwise_layer")  # built by transformers alone

    ids = torch.randint(3, g.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pruned_logits = plain(input_ids=ids).logits
        with headwise.Session(g, head_scale=headwise.ablation_scale(g, heads)):
            zeroed_logits = loaded.model(input_ids=ids).logits
        full_logits = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(pruned_logits, zeroed_logits, atol=1e-5, rtol=0)
    assert (pruned_logits - full_logits).abs().max() > 1e-3  # the heads did matter

    removed_q = len(units[0]) * per_layer
    removed_kv = 1 if g.n_kv_heads > 1 else 0  # MQA keeps its one KV head
    before = sum(p.numel() for p in loaded.model.parameters())
    assert before - sum(p.numel() for p in plain.parameters()) == _expected_drop(loaded, removed_q, removed_kv)
    assert plain.config.num_attention_heads == g.n_heads - removed_q
    assert plain.config.num_key_value_heads == g.n_kv_heads - removed_kv

    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["source_model"]["weights_sha256"] == loaded.info.weights_sha256
    assert record["removed_heads"] == {str(layer): hs for layer, hs in removed.items()}
    assert {"torch", "transformers", "headwise"} <= set(record["versions"])


def test_gpt2_is_refused_in_one_line():
    loaded = _loaded("gpt2")
    with pytest.raises(HeadwiseError, match="c_attn") as e:
        prune_heads(loaded, [(layer, 0) for layer in range(loaded.geometry.n_layers)])
    assert "\n" not in str(e.value)


def test_a_head_count_the_config_refuses_is_one_line():
    loaded = _loaded("gemma3-sliding")  # hidden 64, 4 heads on 1 KV head: 3 heads left is refused by Gemma3TextConfig
    with pytest.raises(HeadwiseError, match="refuses a model with 3 heads per layer") as e:
        prune_heads(loaded, [(layer, 0) for layer in range(3)])
    assert "\n" not in str(e.value)
    qwen = _loaded("qwen3")  # one whole KV group of two heads: 2 heads left, accepted
    assert prune_heads(qwen, [(layer, 0) for layer in range(3)] + [(layer, 1) for layer in range(3)]) \
        .config.num_attention_heads == 2


def test_heads_that_cannot_be_pruned_are_refused():
    loaded = _loaded("llama-gqa")  # 3 layers x 4 heads on 2 KV heads
    g = loaded.geometry
    bad = {
        "same number of heads in every layer": {0: [0, 1], 1: [0, 1]},
        "prune whole KV groups": [(layer, 0) for layer in range(3)],
        "cannot prune all": {layer: [0, 1, 2, 3] for layer in range(3)},
        "no heads to prune": [],
        "outside this model": [(0, 9)],
    }
    for message, heads in bad.items():
        with pytest.raises(HeadwiseError, match=message) as e:
            check_heads(g, heads)
        assert "\n" not in str(e.value)
    assert check_heads(g, {0: [2, 3], 1: [0, 1], 2: [3, 2]}) == [[2, 3], [0, 1], [2, 3]]


def test_select_heads_removes_the_least_important_units_the_same_count_per_layer():
    loaded = _loaded("llama-gqa")  # units: KV groups {0, 1} and {2, 3}
    g = loaded.geometry
    values = np.array([[5.0, 5.0, 1.0, 1.0],  # group 1 least important
                       [0.0, 1.0, 9.0, 0.0],  # group 0 (1) < group 1 (9)
                       [3.0, -1.0, 1.0, 0.5]])  # group 0 (2) > group 1 (1.5)
    atlas = _atlas(loaded, values)
    heads = select_heads(atlas, g, "importance_norm", 0.5, info=loaded.info)
    assert heads == [(0, 2), (0, 3), (1, 0), (1, 1), (2, 2), (2, 3)]
    flipped = select_heads(atlas, g, "importance_norm", 0.5, largest_is_important=False)
    assert flipped == [(0, 0), (0, 1), (1, 2), (1, 3), (2, 0), (2, 1)]

    mqa = _loaded("gemma3-sliding")  # one KV head: the unit is a query head
    scores = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 4.0, 3.0]])
    chosen = select_heads(_atlas(mqa, scores), mqa.geometry, "importance_norm", 0.5)
    assert chosen == [(0, 2), (0, 3), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert select_heads(_atlas(mqa, scores), mqa.geometry, "importance_norm", 0.25) == [(0, 3), (1, 0), (2, 1)]


def test_protected_roles_keep_their_units_while_other_units_can_go():
    from headwise.scores import role_rules

    loaded = _loaded("llama-gqa")  # units: KV groups {0, 1} and {2, 3}
    g = loaded.geometry
    atlas = _atlas(loaded, np.array([[5.0, 5.0, 1.0, 1.0], [0.0, 1.0, 9.0, 0.0], [3.0, -1.0, 1.0, 0.5]]))
    induction = np.zeros((g.n_layers, g.n_heads))
    induction[0, 3] = induction[1, 1] = 0.9  # layer 0: the least important group holds an induction head
    atlas.set_score("induction", induction, family="t", probe=None, description="hand-made",
                    rule=next(r for r in role_rules() if r.role == "induction"))
    plain = select_heads(atlas, g, "importance_norm", 0.5)
    kept = select_heads(atlas, g, "importance_norm", 0.5, protect=["induction"])
    assert plain == [(0, 2), (0, 3), (1, 0), (1, 1), (2, 2), (2, 3)]
    assert kept == [(0, 0), (0, 1), (1, 2), (1, 3), (2, 2), (2, 3)]  # layers 0 and 1 lose the other group
    for seed in range(4):  # the random control draws among unprotected units first, too
        drawn = select_heads(atlas, g, "random", 0.5, seed=seed, protect=["induction"])
        assert (0, 3) not in drawn and (1, 1) not in drawn
    with pytest.raises(HeadwiseError, match="no role 'retrieval' to protect"):
        select_heads(atlas, g, "importance_norm", 0.5, protect=["retrieval"])


def test_random_selection_is_seeded():
    loaded = _loaded("gemma3-sliding")
    g = loaded.geometry
    atlas = _atlas(loaded, np.ones((g.n_layers, g.n_heads)))
    draws = {seed: select_heads(atlas, g, "random", 0.5, seed=seed) for seed in range(6)}
    assert draws[3] == select_heads(atlas, g, "random", 0.5, seed=3)
    assert len({tuple(d) for d in draws.values()}) > 1
    for d in draws.values():
        assert [sum(1 for layer, _ in d if layer == i) for i in range(g.n_layers)] == [2] * g.n_layers


def test_select_heads_refusals_are_one_line():
    loaded = _loaded("llama-gqa")
    g = loaded.geometry
    atlas = _atlas(loaded, np.arange(12.0).reshape(3, 4))
    cases = [
        (dict(score="importance_norm", fraction=0), "between 0 and 1"),
        (dict(score="importance_norm", fraction=1), "between 0 and 1"),
        (dict(score="importance_norm", fraction=1.5), "between 0 and 1"),
        (dict(score="importance_norm", fraction=float("nan")), "between 0 and 1"),
        (dict(score="importance_norm", fraction=0.2), "prunes none"),
        (dict(score="importance_norm", fraction=0.9), "prunes every one"),
        (dict(score="bogus", fraction=0.5), "no score 'bogus'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(HeadwiseError, match=message) as e:
            select_heads(atlas, g, info=loaded.info, **kwargs)
        assert "\n" not in str(e.value)
    nan = _atlas(loaded, np.where(np.eye(3, 4) > 0, np.nan, 1.0))
    with pytest.raises(HeadwiseError, match="NaN"):
        select_heads(nan, g, "importance_norm", 0.5)
    other = headwise.from_model(tiny_model("llama-gqa", seed=1), tiny_tokenizer(), name="other")
    with pytest.raises(HeadwiseError, match="atlas was made for model") as e:
        select_heads(atlas, other.geometry, "importance_norm", 0.5, info=other.info)
    assert "\n" not in str(e.value)
    qwen = _loaded("qwen3")
    with pytest.raises(HeadwiseError, match="geometry"):
        select_heads(atlas, qwen.geometry, "importance_norm", 0.5)


def test_the_representable_fractions_are_named_when_a_fraction_is_not_one():
    gqa = _loaded("llama-gqa")  # 2 KV groups per layer: only half
    assert representable_fractions(gqa.geometry, gqa.model.config) == [(1, 2)]
    atlas = _atlas(gqa, np.arange(12.0).reshape(3, 4))
    with pytest.raises(HeadwiseError) as e:
        select_heads(atlas, gqa.geometry, "importance_norm", 0.1, config=gqa.model.config)
    assert str(e.value) == ("fraction 0.1 prunes none of the 2 KV groups per layer (it rounds to 0); this model can "
                            "prune 1/2 (0.5) of each layer's 2 KV groups (whole units, the same number in every "
                            "layer, head counts its config accepts)")
    mqa = _loaded("gemma3-sliding")  # 4 heads of hidden size 64: Gemma3's config refuses 3 heads (64 % 3 != 0)
    assert representable_fractions(mqa.geometry) == [(1, 4), (2, 4), (3, 4)]
    assert representable_fractions(mqa.geometry, mqa.model.config) == [(2, 4), (3, 4)]
    atlas = _atlas(mqa, np.ones((3, 4)))
    with pytest.raises(HeadwiseError, match=r"rounds to 1 of 4 heads per layer \(3 heads left\), which transformers' "
                                            r"config of this model refuses; this model can prune 2/4 \(0.5\) or "
                                            r"3/4 \(0.75\)") as e:
        select_heads(atlas, mqa.geometry, "importance_norm", 0.25, config=mqa.model.config)
    assert "\n" not in str(e.value)
    assert len(select_heads(atlas, mqa.geometry, "importance_norm", 0.7, config=mqa.model.config)) == 3 * 3


def test_save_refuses_a_directory_with_other_files_and_replaces_an_older_pruned_model(tmp_path):
    loaded = _loaded("qwen3")
    heads = [(layer, h) for layer in range(3) for h in (0, 1)]
    model = prune_heads(loaded, heads)
    record = provenance(loaded, heads, score="hand", fraction=None, seed=None)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(HeadwiseError, match="not a pruned model"):
        save_pruned(model, loaded.tokenizer, busy, record)
    assert (busy / "notes.txt").read_text() == "mine"
    out = save_pruned(model, loaded.tokenizer, tmp_path / "p", record)
    (out / "stale.txt").write_text("old")
    save_pruned(model, loaded.tokenizer, out, record)
    assert not (out / "stale.txt").exists() and (out / PROVENANCE_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_prune_end_to_end(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    atlas_dir = tmp_path / "atlas"
    assert main(["profile", "--model", str(model_dir), "--scores", "importance_norm", "--out", str(atlas_dir),
                 "--importance-context", "16", "--importance-sequences", "2", "--no-report"]) == 0
    capsys.readouterr()
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--atlas", str(atlas_dir), "--score", "importance_norm",
                 "--fraction", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pruned 2 of 4 query heads (0.5) in each of 3 layers" in printed and "pruned model written to" in printed
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    record = json.loads((out / PROVENANCE_FILE).read_text())
    atlas = Atlas.load(atlas_dir)
    assert record["score"] == "importance_norm" and record["fraction"] == 0.5 and record["seed"] is None
    # The atlas's probes, so that headwise compare can keep its held-out text apart from what the scores read.
    assert record["atlas"]["settings"]["probes"]["importance_text"]["context"] == 16
    assert record["atlas"]["model"]["weights_sha256"] == record["source_model"]["weights_sha256"]
    assert record["source_model"]["weights_sha256"] == atlas.model["weights_sha256"]
    importance = atlas.score("importance_norm")
    for layer, heads in record["removed_heads"].items():
        kept = [h for h in range(4) if h not in heads]
        assert importance[int(layer), heads].sum() <= importance[int(layer), kept].sum()
    # The pruned directory is a model headwise loads and profiles too.
    assert headwise.load(str(out)).geometry.n_heads == 2

    assert main(["prune", "--model", str(model_dir), "--atlas", str(atlas_dir), "--score", "random", "--seed", "3",
                 "--fraction", "0.5", "--out", str(tmp_path / "random")]) == 0
    assert json.loads((tmp_path / "random" / PROVENANCE_FILE).read_text())["seed"] == 3
    capsys.readouterr()
    for argv, message in [
        (["--fraction", "0"], "--fraction must be between 0 and 1"),
        (["--fraction", "1"], "--fraction must be between 0 and 1"),
        (["--fraction", "1.5"], "--fraction must be between 0 and 1"),
        (["--fraction", "0.9"], "prunes every one"),
        (["--score", "bogus"], "no score 'bogus'"),
    ]:
        args = {"--score": "importance_norm", "--fraction": "0.5", **dict(zip(argv[::2], argv[1::2]))}
        code = main(["prune", "--model", str(model_dir), "--atlas", str(atlas_dir), "--out", str(tmp_path / "x"),
                     *[x for kv in args.items() for x in kv]])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()  # a refused run leaves nothing behind
    other = tmp_path / "other"
    tiny_model("llama-gqa", seed=5).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    assert main(["prune", "--model", str(other), "--atlas", str(atlas_dir), "--score", "importance_norm",
                 "--fraction", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "atlas was made for model" in capsys.readouterr().err
