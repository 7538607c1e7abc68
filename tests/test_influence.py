"""AttentionInfluence: scores equal a naive two-pass reference, batching changes nothing, the ranking
is deterministic, and the CLI writes the ranking with its provenance and refuses bad input in one line."""

import hashlib
import json

import numpy as np
import pytest
import torch

import headwise
from headwise.atlas import Atlas
from headwise.cli import main
from headwise.errors import HeadwiseError
from headwise.influence import influence_scores, load_documents, random_heads, role_heads, role_score
from headwise.scores import role_rules
from tests.conftest import tiny_model, tiny_tokenizer, tiny_vision_model

RETRIEVAL = next(r for r in role_rules() if r.role == "retrieval")


def _atlas(loaded, info=None):
    """A hand-made atlas: 'retrieval' rises with the head index, so (2, 3), (2, 2), (2, 1) pass the 0.1 cut."""
    g = loaded.geometry
    atlas = Atlas.new((info or loaded.info).to_dict(), g, {})
    values = (np.arange(g.n_total_heads) * 0.02 - 0.07).reshape(g.n_layers, g.n_heads)
    atlas.set_score("retrieval", values, family="retrieval", probe=None, description="hand-made", rule=RETRIEVAL)
    return atlas


def _docs(n=7, seed=0):
    """Documents of different lengths over the tiny vocabulary, with repeats so that heads matter."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        block = [f"t{x}" for x in rng.integers(3, 90, size=3 + 4 * i)]
        docs.append(" ".join(block + block[: 2 + i]))
    return docs


def _projection(model, layer):
    """The module mapping concatenated head outputs to the residual stream, found by hand per architecture."""
    if hasattr(model, "transformer"):  # GPT-2
        return model.transformer.h[layer].attn.c_proj
    return model.model.layers[layer].self_attn.o_proj


def naive_loss(model, ids, heads, head_dim):
    """Mean next-token loss of one sequence [1, T], the heads' input columns of the output projection zeroed
    in a pre-hook, under SDPA (not headwise's attention function), one explicit loop over positions."""
    hooks = []
    for layer, head in heads:
        def zero(module, args, head=head):
            x = args[0].clone()
            x[..., head * head_dim:(head + 1) * head_dim] = 0
            return (x,)
        hooks.append(_projection(model, layer).register_forward_pre_hook(zero))
    return _sdpa_loss(model, ids, hooks)


def _sdpa_loss(model, ids, hooks):
    """Mean next-token loss of ids [1, T] under SDPA with `hooks` in place (removed afterwards), one
    explicit loop over positions."""
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits.double()[0]
    finally:
        model.set_attn_implementation("headwise")
        for h in hooks:
            h.remove()
    nll = [-torch.log_softmax(logits[t], -1)[ids[0, t + 1]].item() for t in range(ids.shape[1] - 1)]
    return float(np.mean(nll))


def test_scores_equal_a_naive_two_pass_computation(tiny):
    atlas = _atlas(tiny)
    docs = _docs()
    result = influence_scores(tiny, atlas, docs, role="retrieval", max_tokens=30)
    assert result.heads == [(2, 1), (2, 2), (2, 3)] and result.head_score == "retrieval"
    assert len(result.ranked) == len(docs) and any(d.truncated for d in result.ranked)
    for d in result.ranked:
        ids = torch.tensor([tiny.tokenizer(docs[d.index]).input_ids[:30]])
        assert d.tokens == ids.shape[1]
        clean = naive_loss(tiny.model, ids, [], tiny.geometry.head_dim)
        masked = naive_loss(tiny.model, ids, result.heads, tiny.geometry.head_dim)
        assert d.clean_loss == pytest.approx(clean, abs=2e-5)
        assert d.masked_loss == pytest.approx(masked, abs=2e-5)
        assert d.score == pytest.approx((masked - clean) / clean, abs=1e-5)
    assert any(abs(d.score) > 1e-3 for d in result.ranked)  # the masking does change something


@pytest.fixture
def llama():
    return headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer(), name="tiny-llama")


def test_batching_equals_one_document_at_a_time(llama):
    heads = [(0, 1), (1, 3), (2, 0)]
    docs = _docs(9, seed=1)
    by = {}
    for batch_tokens in (2, 200, 10**6):  # one document per pass, a few per pass, all in one
        r = influence_scores(llama, None, docs, heads=heads, batch_tokens=batch_tokens)
        by[batch_tokens] = {d.index: (d.clean_loss, d.masked_loss, d.score) for d in r.ranked}
    alone = {i: influence_scores(llama, None, [doc], heads=heads).ranked[0] for i, doc in enumerate(docs)}
    for i, d in alone.items():
        for got in by.values():
            np.testing.assert_allclose(got[i], (d.clean_loss, d.masked_loss, d.score), atol=1e-5)


def test_ranking_is_deterministic_and_short_documents_are_skipped(llama):
    docs = ["", *_docs(6), _docs(6)[2]]  # "" is one token (BOS); the last repeats the third document
    a = influence_scores(llama, None, docs, heads=[(1, 0), (2, 2)])
    b = influence_scores(llama, None, docs, heads=[(2, 2), (1, 0)])
    assert a.records() == b.records()
    scores = [d.score for d in a.ranked]
    assert scores == sorted(scores, reverse=True)
    assert a.skipped == [{"index": 0, "id": 0, "reason": "1 token(s): no next-token loss"}]
    assert {d.index for d in a.ranked} == set(range(1, len(docs)))


def test_head_choice(llama):
    atlas = _atlas(llama)
    assert role_score(atlas, "retrieval") == ("retrieval", True)
    assert role_heads(atlas, "retrieval") == [(2, 1), (2, 2), (2, 3)]  # the labelled heads
    assert role_heads(atlas, "retrieval", k=1) == [(2, 3)]
    drawn = random_heads(3, 4, 3, seed=5, exclude=role_heads(atlas, "retrieval"))
    assert drawn == random_heads(3, 4, 3, seed=5, exclude=role_heads(atlas, "retrieval")) and len(set(drawn)) == 3
    assert not set(drawn) & {(2, 1), (2, 2), (2, 3)}
    assert random_heads(3, 4, 3, seed=6) != random_heads(3, 4, 3, seed=7)


@pytest.mark.parametrize("kwargs, message", [
    ({"role": "retrieval", "k": 0}, "k must be between 1 and 12"),
    ({"role": "retrieval", "k": 13}, "k must be between 1 and 12"),
    ({"role": "nonsense"}, "no role rule knows role 'nonsense'"),
    ({"role": "induction"}, "this atlas has no score 'induction'"),
    ({"heads": [(3, 0)]}, "outside this model"),
])
def test_bad_heads_are_refused(llama, kwargs, message):
    with pytest.raises(HeadwiseError, match=message):
        influence_scores(llama, _atlas(llama), _docs(2), **kwargs)


def test_bad_models_and_corpora_are_refused(llama):
    other = headwise.from_model(tiny_model("llama-gqa", seed=1), tiny_tokenizer(), name="other")
    with pytest.raises(HeadwiseError, match="atlas was made for model"):
        influence_scores(other, _atlas(llama), _docs(2), role="retrieval")
    vit = headwise.from_model(tiny_vision_model("vit"), name="vit")
    with pytest.raises(HeadwiseError, match="is an image model; AttentionInfluence needs a language model"):
        influence_scores(vit, None, ["t1 t2"], heads=[(0, 0)])
    with pytest.raises(HeadwiseError, match="no documents"):
        influence_scores(llama, None, [], heads=[(0, 0)])
    with pytest.raises(HeadwiseError, match="no document has 2 or more tokens"):
        influence_scores(llama, None, ["", ""], heads=[(0, 0)])
    with pytest.raises(HeadwiseError, match="no head of this atlas is labelled 'retrieval'"):
        atlas = _atlas(llama)
        atlas.set_score("retrieval", np.zeros((3, 4)), family="retrieval", probe=None, description="x", rule=RETRIEVAL)
        influence_scores(llama, atlas, _docs(2), role="retrieval")


# ---- the command line ---------------------------------------------------------------------------
def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture
def setup(tmp_path, model_dir):
    loaded = headwise.load(str(model_dir))
    atlas_file = _atlas(loaded).save(tmp_path / "atlas-tiny.json")
    corpus = _write(tmp_path / "corpus.jsonl", [{"text": t, "id": f"doc{i}"} for i, t in enumerate(_docs(5))]
                    + [{"text": "t3 t4 t5 t3 t4"}])
    return {"model": str(model_dir), "atlas": str(atlas_file), "corpus": corpus, "tmp": tmp_path, "loaded": loaded}


def _run(setup, *extra, data=None, out=None):
    return main(["influence", "--model", setup["model"], "--atlas", setup["atlas"], "--role", "retrieval",
                 "--data", str(data or setup["corpus"]), "--out", str(out or setup["tmp"] / "ranked.jsonl"), *extra])


def test_cli_writes_the_ranking_and_its_provenance(setup, capsys):
    out = setup["tmp"] / "sub" / "ranked.jsonl"
    assert _run(setup, out=out) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["rank"] for r in lines] == list(range(1, 7))
    assert {r["id"] for r in lines} == {"doc0", "doc1", "doc2", "doc3", "doc4", 6}  # no id: the line number
    assert set(lines[0]) == {"rank", "id", "score", "clean_loss", "masked_loss", "tokens", "truncated"}
    meta = json.loads((setup["tmp"] / "sub" / "ranked.jsonl.meta.json").read_text())
    assert meta["ranked"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert meta["heads"] == [[2, 1], [2, 2], [2, 3]] and meta["k"] == 3 and meta["head_score"] == "retrieval"
    assert meta["model"]["weights_sha256"] == setup["loaded"].info.weights_sha256
    assert meta["random_seed"] is None and "torch" in meta["versions"]
    assert meta["data"]["sha256"] == hashlib.sha256(setup["corpus"].read_bytes()).hexdigest()
    assert "ranking written to" in capsys.readouterr().out
    # The control: k random heads from outside the role's top k, recorded; the same seed, the same file.
    control = setup["tmp"] / "random.jsonl"
    assert _run(setup, "--random-seed", "3", out=control) == 0
    first = control.read_bytes()
    assert _run(setup, "--random-seed", "3", out=control) == 0 and control.read_bytes() == first
    meta = json.loads((setup["tmp"] / "random.jsonl.meta.json").read_text())
    assert meta["random_seed"] == 3 and meta["head_score"] is None and len(meta["heads"]) == 3
    assert not {tuple(h) for h in meta["heads"]} & {(2, 1), (2, 2), (2, 3)}


def test_cli_refuses_bad_input_in_one_line(setup, capsys):
    tmp = setup["tmp"]
    other = _atlas(setup["loaded"], info=headwise.from_model(tiny_model("llama-gqa", seed=1), tiny_tokenizer(),
                                                             name="other").info).save(tmp / "atlas-other.json")
    cases = {
        "data file not found": dict(data=tmp / "missing.jsonl"),
        "line 2 is not JSON": dict(data=_write(tmp / "bad.jsonl", ['{"text": "t1 t2"}', "t1 t2 t3"])),
        'line 1 has no "text" string': dict(data=_write(tmp / "notext.jsonl", [{"prompt": "t1 t2"}])),
        "holds no documents": dict(data=_write(tmp / "empty.jsonl", ["", "  "])),
        "is used twice": dict(data=_write(tmp / "dup.jsonl", [{"text": "t1 t2", "id": 1}, {"text": "t3 t4", "id": 1}])),
        "no document has 2 or more tokens": dict(data=_write(tmp / "short.jsonl", [{"text": ""}])),
    }
    for message, kwargs in cases.items():
        assert _run(setup, **kwargs) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    for extra, message in [(["--k", "13"], "k must be between 1 and 12"), (["--k", "0"], "--k must be a positive"),
                           (["--atlas", str(other)], "atlas was made for model"),
                           (["--role", "nonsense"], "no role rule knows role 'nonsense'"),
                           (["--random-seed", "-1"], "--random-seed must be"),
                           (["--k", "10", "--random-seed", "0"], "only 2 heads are left")]:
        assert _run(setup, *extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["influence", "--atlas", setup["atlas"], "--role", "retrieval", "--data", str(setup["corpus"]),
                 "--out", str(setup["corpus"])]) == 2
    assert "is the --data file" in capsys.readouterr().err
    assert not (tmp / "ranked.jsonl").exists() and not (tmp / "ranked.jsonl.meta.json").exists()


def test_load_documents_accepts_ids(tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"text": "a", "id": "x"}, "", {"text": "b"}])
    assert [(d.id, d.text) for d in load_documents(path)] == [("x", "a"), (3, "b")]


def naive_uniform_loss(model, ids, heads, geometry):
    """Mean next-token loss with the heads' attention uniform over the causal past: such a head outputs the
    running mean of its KV head's values, written into the output projection's input by a pre-hook (values
    captured from v_proj, which carries no position encoding), under SDPA."""
    d, group = geometry.head_dim, geometry.n_heads // geometry.n_kv_heads
    values, hooks = {}, []
    for layer, head in heads:
        attn = model.model.layers[layer].self_attn
        hooks.append(attn.v_proj.register_forward_hook(lambda m, a, out, layer=layer: values.__setitem__(layer, out)))

        def uniform(module, args, layer=layer, head=head):
            x = args[0].clone()
            kv = head // group
            v = values[layer][..., kv * d:(kv + 1) * d]
            counts = torch.arange(1, v.shape[1] + 1, dtype=v.dtype)[None, :, None]
            x[..., head * d:(head + 1) * d] = v.cumsum(1) / counts
            return (x,)
        hooks.append(attn.o_proj.register_forward_pre_hook(uniform))
    return _sdpa_loss(model, ids, hooks)


def test_uniform_masking_equals_a_running_mean_of_values(llama):
    heads = [(0, 1), (1, 3), (2, 0)]
    docs = _docs(5, seed=2)
    result = influence_scores(llama, None, docs, heads=heads, ablation="uniform", batch_tokens=200)
    zeroed = influence_scores(llama, None, docs, heads=heads)
    assert result.describe()["ablation"].startswith("head attention weights replaced by uniform")
    for d in result.ranked:
        ids = torch.tensor([llama.tokenizer(docs[d.index]).input_ids])
        assert d.masked_loss == pytest.approx(naive_uniform_loss(llama.model, ids, heads, llama.geometry), abs=2e-5)
    assert {d.index: d.score for d in result.ranked} != pytest.approx({d.index: d.score for d in zeroed.ranked})
    with pytest.raises(HeadwiseError, match="unknown ablation"):
        influence_scores(llama, None, docs, heads=heads, ablation="mean")
