"""Causal validation: batched ablations equal one-at-a-time references, verdicts follow the numbers."""

import numpy as np
import pytest
import torch

from headwise import validate as V
from headwise.atlas import Atlas
from headwise.cli import main
from headwise.errors import HeadwiseError
from headwise.probes import repeated_tokens
from headwise.profile import ProfileSettings, profile
from tests.conftest import tiny_model, tiny_tokenizer
from tests.scores.test_retrieval import toy_model


@pytest.fixture(scope="module")
def toy():
    return toy_model()


@pytest.fixture(scope="module")
def toy_atlas(toy):
    return profile(toy, ["previous_token", "induction"], ProfileSettings(block_len=20, repeated_sequences=8))


def naive_in_context_loss(model, ids, ablated, head_dim=16):
    """heads.json's own ablation (zero o_proj input columns in a pre-hook), default attention, explicit loops."""
    hooks = []
    for layer, head in ablated:
        def zero(module, args, head=head):
            x = args[0].clone()
            x[..., head * head_dim:(head + 1) * head_dim] = 0
            return (x,)
        hooks.append(model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(zero))
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits.double()
    finally:
        model.set_attn_implementation("headwise")
        for h in hooks:
            h.remove()
    n = (ids.shape[1] - 1) // 2
    losses = []
    for b in range(ids.shape[0]):
        nll = [-torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]].item() for t in range(1 + n, 2 * n)]
        losses.append(np.mean(nll))
    return float(np.mean(losses))


def test_in_context_loss_matches_naive_ablation(toy):
    task = V.InContextLossTask(block_len=20, n_sequences=6, seed=3, rows_per_pass=4)  # several passes
    conditions = [[], [(1, 0), (1, 1)], [(0, 1)], [(0, 0), (1, 3)]]
    scales = torch.stack([V.ablation_scale(toy.geometry, c) for c in conditions])
    got = task.evaluate(toy, scales).values
    ids = repeated_tokens(toy.tokenizer, 96, block_len=20, repeats=2, n_sequences=6, seed=3).input_ids
    want = [naive_in_context_loss(toy.model, ids, c) for c in conditions]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert got[0] < 0.05 and got[2] > 2  # heads.json: 0.0005 unablated, +3.7 without the previous-token head


def test_batched_greedy_replies_equal_one_condition_at_a_time():
    import headwise

    m = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer(), name="tiny")
    ids = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(1))
    scales = torch.stack([V.ablation_scale(m.geometry, c) for c in ([], [(0, h) for h in range(4)], [(1, 0)])])
    batched = V.greedy_replies(m, ids, scales, 6)
    single = [V.greedy_replies(m, ids, scales[i:i + 1], 6)[0] for i in range(3)]
    assert batched == single
    assert batched[0] != batched[1]  # the ablation does change something


def test_toy_labels_against_their_causal_tests(toy, toy_atlas):
    task = V.InContextLossTask(block_len=20)
    assert (0, 1) in toy_atlas.heads_with_role("previous-token")
    r = V.validate(toy, toy_atlas, "previous-token", k=1, draws=6, seed=0, task=task)
    assert r["targeted_heads"][0][:2] == [0, 1]
    assert r["baseline"] < 0.05 and r["targeted"] > 2  # the previous-token head is needed for induction
    assert all([0, 1] not in heads for heads in r["random_heads"])
    # Head (0, 0) is just as necessary (heads.json: +2.9 nats), so a draw that hits it can beat the label.
    assert r["passes"] == (r["targeted_harm"] > max(r["random_harm"]))
    assert r["verdict"].startswith("passes" if r["passes"] else "FAILS")
    # All four layer-1 induction heads vs the only other 4-head set, layer 0: the induction heads matter more.
    r = V.validate(toy, toy_atlas, "induction", k=4, draws=5, seed=0, task=task)
    assert sorted(h[:2] for h in r["targeted_heads"]) == [[1, 0], [1, 1], [1, 2], [1, 3]]
    assert r["passes"] and r["targeted"] > r["random_mean"] > r["baseline"]
    text = V.format_validation(r)
    assert "unablated" in text and "random ablations" in text and "passes" in text


class CountTask(V.ValidationTask):
    """Metric = how many of `critical` heads a condition ablates (a loss: lower is better)."""

    name, metric, higher_is_better = "count", "critical heads ablated", False

    def __init__(self, critical):
        self.critical = critical
        self.seen = None

    def evaluate(self, loaded, scales):
        self.seen = scales.clone()
        return V.TaskOutcome([float(sum(s[layer, head] == 0 for layer, head in self.critical)) for s in scales])


@pytest.fixture
def fake_role(toy, toy_atlas, monkeypatch):
    V.registered_roles()  # plug-in modules register their tasks before the registry is swapped
    monkeypatch.setattr(V, "_TASKS", dict(V._TASKS))
    atlas = Atlas(json_copy(toy_atlas.data))
    atlas.set_score("fake", np.arange(8.0).reshape(2, 4), family="test", probe=None, description="test")
    return atlas


def json_copy(d):
    import json

    return json.loads(json.dumps(d))


def test_verdict_follows_the_numbers(toy, fake_role):
    good = CountTask([(1, 3), (1, 2)])  # the two highest 'fake' scores
    V.register_task("fake-role", good, score="fake")
    r = V.validate(toy, fake_role, "fake-role", k=2, draws=5, seed=1)
    assert [h[:2] for h in r["targeted_heads"]] == [[1, 3], [1, 2]]
    assert r["baseline"] == 0 and r["targeted"] == 2 and r["random"] == [0.0] * 5 and r["passes"]
    # Row 0 ablates nothing, row 1 the targeted heads, rows 2.. the random draws, which avoid the targeted heads.
    assert good.seen.shape == (7, 2, 4) and (good.seen[0] == 1).all()
    assert {tuple(x) for x in torch.nonzero(good.seen[1] == 0).tolist()} == {(1, 3), (1, 2)}
    draws = [{tuple(x) for x in torch.nonzero(s == 0).tolist()} for s in good.seen[2:]]
    assert all(len(d) == 2 and not d & {(1, 3), (1, 2)} for d in draws)
    assert draws == [{tuple(h) for h in hs} for hs in r["random_heads"]]
    again = V.validate(toy, fake_role, "fake-role", k=2, draws=5, seed=1)
    assert again["random_heads"] == r["random_heads"]  # seeded

    V.register_task("fake-role", CountTask([(0, 0)]), score="fake", replace=True)
    r = V.validate(toy, fake_role, "fake-role", k=2, draws=5, seed=1)
    assert not r["passes"] and r["verdict"].startswith("FAILS")


def test_results_are_stored_in_the_atlas(toy, fake_role, tmp_path):
    V.register_task("fake-role", CountTask([(1, 3)]), score="fake")
    V.validate_and_store(toy, fake_role, "fake-role", k=1, draws=5)
    loaded = Atlas.load(fake_role.save(tmp_path / "a"))
    entry = loaded.data["validation"]["fake-role@k1"]
    assert entry["task"] == "count" and entry["draws"] == 5 and entry["passes"]
    assert {"baseline", "targeted", "random", "random_mean", "random_std", "verdict", "task_settings",
            "targeted_heads", "random_heads", "seed"} <= set(entry)


def test_bad_requests(toy, fake_role):
    V.register_task("fake-role", CountTask([(1, 3)]), score="fake")
    with pytest.raises(HeadwiseError, match="at least 5"):
        V.validate(toy, fake_role, "fake-role", k=1, draws=3)
    with pytest.raises(HeadwiseError, match="--k must be"):
        V.validate(toy, fake_role, "fake-role", k=8)
    with pytest.raises(HeadwiseError, match="no validation task"):
        V.validate(toy, fake_role, "nonsense")
    with pytest.raises(HeadwiseError, match="already has"):
        V.register_task("fake-role", CountTask([]))
    other = profile(toy_model(), ["previous_token"], ProfileSettings(block_len=8, repeated_sequences=1))
    import headwise

    tiny = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer(), name="tiny")
    with pytest.raises(HeadwiseError, match="geometry|weights"):
        V.validate(tiny, other, "previous-token", k=1)


def test_cli_reports_a_missing_atlas(tmp_path, capsys):
    assert main(["validate", "--role", "induction", "--atlas", str(tmp_path / "none")]) == 2
    assert "headwise: error:" in capsys.readouterr().err


def test_cli_context_is_for_retrieval_only(tmp_path, capsys):
    assert main(["validate", "--atlas", str(tmp_path), "--role", "induction", "--context", "512"]) == 2
    assert "--context applies to --role retrieval only" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_induction_heads_carry_in_context_learning(smollm2):
    """Olsson et al.: zeroing the top induction heads raises in-context loss far more than zeroing random heads."""
    atlas = profile(smollm2, ["induction"], ProfileSettings(repeated_sequences=2))
    r = V.validate(smollm2, atlas, "induction", k=10, draws=5, task=V.InContextLossTask(n_sequences=2))
    assert r["passes"], V.format_validation(r)
    assert r["targeted_harm"] > 3 * max(r["random_harm"]), V.format_validation(r)


def test_cli_validate_writes_into_the_atlas(tmp_path, capsys):
    import shutil

    import headwise
    from tests.scores.test_retrieval import TOY

    model_dir = tmp_path / "toy"
    shutil.copytree(TOY, model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    loaded = headwise.load(str(model_dir))
    atlas_dir = tmp_path / "atlas"
    profile(loaded, ["previous_token"], ProfileSettings(block_len=20, repeated_sequences=2)).save(atlas_dir)
    assert main(["validate", "--role", "previous-token", "--atlas", str(atlas_dir), "--k", "1"]) == 0
    out = capsys.readouterr().out
    assert "unablated" in out and "verdict:" in out
    entry = Atlas.load(atlas_dir).data["validation"]["previous-token@k1"]
    assert entry["targeted_heads"][0][:2] == [0, 1] and len(entry["random"]) == 5


def test_cli_profile_validate_flag(tmp_path, capsys):
    import shutil

    from tests.scores.test_retrieval import TOY

    model_dir = tmp_path / "toy"
    shutil.copytree(TOY, model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out_dir = tmp_path / "atlas"
    assert main(["profile", "--model", str(model_dir), "--scores", "previous_token,induction", "--validate",
                 "--no-report", "--out", str(out_dir)]) == 0
    atlas = Atlas.load(out_dir)
    labelled = {role for role in ("previous-token", "induction") if atlas.heads_with_role(role)}
    assert {key.split("@")[0] for key in atlas.data["validation"]} == labelled and labelled
    assert atlas.data["settings"]["retrieval_grid"] == "default"
    assert "verdict:" in capsys.readouterr().out


def test_retrieval_task_runs_every_case_under_every_condition(tmp_path):
    import headwise

    m = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer(), name="tiny")
    text = tmp_path / "filler.txt"
    text.write_text(" ".join(f"t{i % 40}." for i in range(600)))
    task = V.RetrievalTask(context=200, passkeys=2, needles=2, text=str(text))
    labels = [c.settings["label"] for c in task.cases(m)]
    assert len(labels) == 4 and labels[0].startswith("passkey") and labels[2].startswith("needle 0")
    scales = torch.stack([V.ablation_scale(m.geometry, c) for c in ([], [(0, 0)])])
    out = task.evaluate(m, scales)
    assert len(out.values) == 2 and all(0 <= v <= 1 for v in out.values)
    assert all(set(d["correct"]) <= set(labels) for d in out.details)
    assert task.settings()["context"] == 200


# ---- image classifiers ----------------------------------------------------------------------
def test_important_heads_are_validated_on_held_out_images():
    import headwise
    from headwise.profile import ProfileSettings, profile
    from tests.conftest import tiny_vision_model

    m = headwise.from_model(tiny_vision_model("vit"), name="tiny-vit")
    atlas = profile(m, ["importance_accuracy"], ProfileSettings(image_count=8))
    result = V.validate(m, atlas, "important", k=2, draws=5)
    assert result["task"] == "image_accuracy" and result["score"] == "importance_accuracy"
    assert result["task_settings"]["offset"] == 8 and result["task_settings"]["count"] == 256
    assert len(result["random"]) == 5 and result["verdict"].startswith(("passes", "FAILS"))
    # Each condition's accuracy equals a plain run with those heads zeroed.
    from headwise.ablation import class_logits
    from headwise.probes import image_probe

    held = image_probe(m.processor, m.geometry, count=256, seed=0, offset=8)
    targeted = [(layer, head) for layer, head, _ in result["targeted_heads"]]
    with torch.no_grad(), headwise.Session(m.geometry, head_scale=V.ablation_scale(m.geometry, targeted)):
        acc = float((class_logits(m.model, held.pixel_values).argmax(-1) == held.labels).double().mean())
    assert result["targeted"] == pytest.approx(acc)


def test_image_validation_refuses_a_language_model_atlas(tiny):
    from headwise.profile import ProfileSettings, profile

    atlas = profile(tiny, ["previous_token"], ProfileSettings(block_len=8, repeated_sequences=2))
    with pytest.raises(HeadwiseError, match="needs an image model"):
        V.validate(tiny, atlas, "important", k=2)
