"""`headwise attribute`: JSONL parsing, KL / target-loss attribution equal one forward pass per
head, and the score lands in the atlas under the user's name."""

import json

import numpy as np
import pytest
import torch

import headwise
from headwise import Atlas, Session, ablation_scale
from headwise.attribute import Example, attribute, attribute_to_atlas, load_examples
from headwise.cli import main
from headwise.errors import HeadwiseError
from tests.conftest import tiny_model, tiny_tokenizer


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture
def llama():
    return headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer(), name="tiny-llama")


PROMPTS = ["t5 t9 t13 t5 t9", "t20 t21 t22 t20", "t7 t8 t9 t10 t7 t8", "t30 t31 t30 t31"]


def _naive(loaded, examples, metric):
    """One full forward pass per head and example: KL at the prompt's last token, or target loss increase."""
    g, tok = loaded.geometry, loaded.tokenizer
    out = np.zeros((len(examples), g.n_layers, g.n_heads))
    for i, e in enumerate(examples):
        prompt = tok(e.prompt).input_ids
        target = tok(e.target, add_special_tokens=False).input_ids if metric == "loss" else []
        ids = torch.tensor([prompt + target])

        def read(logits, prompt=prompt, target=target):
            logp = torch.log_softmax(logits[0].double(), -1)
            if metric == "kl":
                return logp[len(prompt) - 1]
            return -torch.stack([logp[len(prompt) - 1 + j, t] for j, t in enumerate(target)]).mean()

        with torch.no_grad():
            clean = read(loaded.model(ids).logits)
            for layer in range(g.n_layers):
                for head in range(g.n_heads):
                    with Session(g, head_scale=ablation_scale(g, [(layer, head)])):
                        ablated = read(loaded.model(ids).logits)
                    out[i, layer, head] = (clean.exp() * (clean - ablated)).sum() if metric == "kl" else \
                        ablated - clean
    return out


def test_kl_attribution_equals_one_pass_per_head(tiny):
    examples = [Example(p) for p in PROMPTS]
    result = attribute(tiny, examples, max_tokens=40)
    assert result.settings["metric"] == "kl"
    np.testing.assert_allclose(result.per_example, _naive(tiny, examples, "kl"), atol=1e-6)
    np.testing.assert_allclose(result.scores, result.per_example.mean(0))
    assert result.scores.max() > 1e-4


def test_target_loss_attribution_equals_one_pass_per_head(llama):
    examples = [Example("t5 t9 t13 t5", " t9 t13"), Example("t20 t21", " t22 t20 t21"), Example("t7 t8 t7", " t8")]
    result = attribute(llama, examples, max_tokens=64)
    assert result.settings["metric"] == "loss"
    np.testing.assert_allclose(result.per_example, _naive(llama, examples, "loss"), atol=2e-5)


def test_jsonl_parsing_and_one_line_errors(tmp_path):
    ok = _write(tmp_path / "ok.jsonl", [{"prompt": "a b", "target": " c"}, "", '"just a prompt"'])
    assert load_examples(ok) == [Example("a b", " c"), Example("just a prompt")]
    cases = [(["{not json"], "line 1 is not JSON"), ([{"text": "x"}], 'line 1 has no "prompt"'),
             ([{"prompt": "x", "target": ""}], '"target" must be a non-empty string'), ([""], "holds no examples")]
    for lines, message in cases:
        with pytest.raises(HeadwiseError, match=message):
            load_examples(_write(tmp_path / "bad.jsonl", lines))
    with pytest.raises(HeadwiseError, match="not found"):
        load_examples(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(HeadwiseError, match="not UTF-8"):
        load_examples(tmp_path / "bin.jsonl")


def test_mixed_targets_and_bad_metric_are_refused(llama):
    with pytest.raises(HeadwiseError, match="1 of 2 examples have a target"):
        attribute(llama, [Example("t3 t4", " t5"), Example("t6 t7")])
    with pytest.raises(HeadwiseError, match="needs a target on every example"):
        attribute(llama, [Example("t3 t4")], metric="loss")
    with pytest.raises(HeadwiseError, match="unknown metric"):
        attribute(llama, [Example("t3 t4")], metric="bleu")


def test_scores_land_in_the_atlas_under_the_users_names(llama, tmp_path):
    data = _write(tmp_path / "d.jsonl", [{"prompt": p} for p in PROMPTS])
    atlas, path = attribute_to_atlas(llama, data, "copying", tmp_path / "atlas")
    targets = _write(tmp_path / "t.jsonl", [{"prompt": "t5 t9 t5", "target": " t9"}])
    atlas, path = attribute_to_atlas(llama, targets, "recall", tmp_path / "atlas")
    again = Atlas.load(path)
    assert again.score_names == ["copying", "recall"]
    assert again.data["scores"]["copying"]["family"] == "attribute"
    assert again.data["settings"]["probes"]["attribute:recall"]["metric"] == "loss"
    np.testing.assert_allclose(again.score("copying"), attribute(llama, load_examples(data)).scores, atol=1e-6)
    with pytest.raises(HeadwiseError, match="built-in score name"):
        attribute_to_atlas(llama, data, "induction", tmp_path / "atlas")
    with pytest.raises(HeadwiseError, match="must be letters"):
        attribute_to_atlas(llama, data, "my name", tmp_path / "atlas")
    other = headwise.from_model(tiny_model("qwen2"), tiny_tokenizer(), name="tiny-qwen2")
    with pytest.raises(HeadwiseError, match="profile this model first"):
        attribute_to_atlas(other, data, "copying", tmp_path / "atlas")


def test_cli_attribute(model_dir, tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", [{"prompt": p} for p in PROMPTS])
    assert main(["attribute", "--model", str(model_dir), "--data", str(data), "--name", "copying", "--atlas",
                 str(tmp_path / "a"), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "copying (kl)" in out and out.count("  L") == 3 and "atlas written to" in out
    assert Atlas.load(tmp_path / "a").score("copying").shape == (3, 4)
    assert main(["attribute", "--model", str(model_dir), "--data", str(tmp_path / "nope.jsonl"), "--name", "x"]) == 2
    assert "data file not found" in capsys.readouterr().err


def test_attribution_validation_task_agrees_with_the_attribution(llama, tmp_path):
    from headwise.attribute import AttributionTask, register_attribution
    from headwise.validate import registered_roles, validate

    g = llama.geometry
    for lines in ([{"prompt": p} for p in PROMPTS], [{"prompt": "t5 t9 t5", "target": " t9 t13"},
                                                      {"prompt": "t20 t21 t22 t20", "target": " t21"}]):
        data = _write(tmp_path / "v.jsonl", lines)
        task = AttributionTask(data)
        scales = torch.stack([torch.ones(g.n_layers, g.n_heads), ablation_scale(g, [(1, 2)])])
        values = task.evaluate(llama, scales).values
        single = attribute(llama, load_examples(data)).scores[1, 2]
        if task.kind == "kl":
            assert values[0] == pytest.approx(0, abs=1e-6) and values[1] == pytest.approx(single, abs=1e-6)
        else:  # mean target loss; its increase under the ablation is the attribution's score
            assert values[1] - values[0] == pytest.approx(single, abs=2e-5)
    atlas, _ = attribute_to_atlas(llama, data, "recall", tmp_path / "atlas")
    assert "recall" in registered_roles()
    result = validate(llama, atlas, "recall", k=2, draws=5)
    assert result["score"] == "recall" and len(result["random"]) == 5
    register_attribution("recall", data)  # re-registering the same name replaces it
    from headwise.attribute import register_atlas_attributions

    assert register_atlas_attributions(Atlas.load(tmp_path / "atlas")) == ["recall"]


def test_an_attribution_cannot_take_over_a_role(llama, tmp_path):
    """A name equal to a role with its own validation task is refused: it would swap that role's task."""
    from headwise.attribute import register_attribution
    from headwise.validate import InContextLossTask, registered_task

    data = _write(tmp_path / "d.jsonl", [{"prompt": p} for p in PROMPTS])
    with pytest.raises(HeadwiseError, match="'previous-token' is a role with a validation task of its own"):
        attribute_to_atlas(llama, data, "previous-token", tmp_path / "atlas")  # a role, not a score name
    for role in ("previous-token", "induction", "retrieval", "successor"):
        with pytest.raises(HeadwiseError, match=f"'{role}' is a role with a validation task of its own"):
            register_attribution(role, data)
    assert isinstance(registered_task("previous-token"), InContextLossTask)
    assert isinstance(registered_task("induction"), InContextLossTask)
    assert not (tmp_path / "atlas").exists()


def test_an_attribution_task_refuses_another_atlases_data(llama, tmp_path):
    """The registry is process-wide: a task registered for one atlas must not validate another's attribution."""
    from headwise.attribute import register_atlas_attribution
    from headwise.validate import validate

    first = _write(tmp_path / "a.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    second = _write(tmp_path / "b.jsonl", [{"prompt": p} for p in PROMPTS[2:]])
    attribute_to_atlas(llama, first, "recall", tmp_path / "a")
    attribute_to_atlas(llama, second, "recall", tmp_path / "b")  # now the registered 'recall' task runs on b.jsonl
    a = Atlas.load(tmp_path / "a")
    with pytest.raises(HeadwiseError, match="is not the data the atlas's 'recall' attribution was measured on"):
        validate(llama, a, "recall", k=2)
    assert register_atlas_attribution(a, "recall") and not register_atlas_attribution(a, "nothing")
    assert validate(llama, a, "recall", k=2)["task_settings"]["data"] == str(first)


def test_register_atlas_attribution_names_the_atlas_and_the_field(llama, tmp_path):
    from headwise.attribute import register_atlas_attribution, register_atlas_attributions

    data = _write(tmp_path / "d.jsonl", [{"prompt": p} for p in PROMPTS])
    attribute_to_atlas(llama, data, "copying", tmp_path / "a")
    atlas = Atlas.load(tmp_path / "a")
    for field, value, expected in [("metric", 5, "settings.metric must be one of 'auto', 'kl', 'loss' (got 5)"),
                                   ("chat", "yes", "settings.chat must be true or false (got 'yes')"),
                                   ("data", 3, "settings.data must be a string (got 3)"),
                                   ("data", str(tmp_path / "gone.jsonl"), "settings.data names")]:
        broken = Atlas.load(tmp_path / "a")
        broken.data["scores"]["copying"]["settings"][field] = value
        with pytest.raises(HeadwiseError) as e:
            register_atlas_attribution(broken, "copying")
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path / 'a' / 'atlas.json'}: field scores.copying.") and expected in msg, msg
        assert "\n" not in msg
    assert register_atlas_attributions(atlas) == ["copying"]
