"""retrieval / retrieval_mass equal the papers' loops over eager attention, and the trial bookkeeping holds."""

from pathlib import Path

import numpy as np
import pytest
import torch

from headwise.probes.needle import Needle, NeedleCase, bundled_needles, needle_case
from headwise.profile import ProfileSettings, profile
from headwise.scores import retrieval as rt
from tests.conftest import tiny_tokenizer
from tests.reference import eager_attentions

TOY = Path(__file__).resolve().parents[1] / "data" / "toy_induction"


def toy_model():
    from transformers import LlamaForCausalLM

    import headwise

    return headwise.from_model(LlamaForCausalLM.from_pretrained(TOY, local_files_only=True), tiny_tokenizer(),
                               name="toy-induction")


def naive_trial(model, case: NeedleCase, generated: list[int]):
    """Wu et al.'s retrieval_calculate and HeadKV's variant, transcribed as loops over eager weights.

    Decode step t's query is position T-1+t (the last prompt token first) and it produced generated[t].
    """
    prompt = case.input_ids[0].tolist()
    full = torch.tensor([prompt + generated[:-1]])
    atts = eager_attentions(model, full)
    s, e = case.needle_spans[case.target]
    n_layers, n_heads = len(atts), atts[0].shape[1]
    copies, mass, top1 = np.zeros((n_layers, n_heads)), np.zeros((n_layers, n_heads)), []
    for t, token in enumerate(generated):
        q = len(prompt) - 1 + t
        step = np.zeros((n_layers, n_heads), dtype=int)
        for layer in range(n_layers):
            for head in range(n_heads):
                row = atts[layer][0, head, q, :q + 1]
                i = int(np.argmax(row))
                step[layer, head] = i
                if s <= i < e and prompt[i] == token:
                    copies[layer, head] += 1
                order = np.argsort(-row, kind="stable")[:e - s]
                mass[layer, head] += sum(row[j] for j in order if s <= j < e)
        top1.append(step)
    return copies, mass, top1, atts


def greedy_reference(model, case, n):
    ids = case.input_ids
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def random_case(seed=0, length=48, span=(10, 22)) -> NeedleCase:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (1, length), generator=g)
    ids[0, 0] = 1
    text = " ".join(f"t{i - 3}" for i in ids[0, span[0]:span[1]].tolist())
    return NeedleCase(input_ids=ids, needle_spans=[span], needles=[Needle(text, "q", text.split()[0])], target=0)


def test_decode_trial_matches_eager_reference(tiny):
    case = random_case()
    trial = rt.decode_trial(tiny, case, max_new_tokens=6)
    assert trial.generated == greedy_reference(tiny.model, case, len(trial.generated))
    copies, mass, top1, _ = naive_trial(tiny.model, case, trial.generated)
    assert len(trial.top1) == len(top1)
    for step, (got, want) in enumerate(zip(trial.top1, top1)):
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")
    np.testing.assert_array_equal(trial.copies, copies)
    np.testing.assert_allclose(trial.mass, mass, atol=1e-5)
    np.testing.assert_allclose(trial.score, copies / 12)


def test_toy_induction_heads_copy_the_needle():
    """The toy model continues a repeated block by induction: its layer-1 heads copy from the first copy."""
    m = toy_model()
    g = torch.Generator().manual_seed(5)
    block = (torch.randperm(93, generator=g)[:20] + 3).tolist()
    ids = torch.tensor([[1] + block + block[:4]])
    text = " ".join(f"t{i - 3}" for i in block)
    case = NeedleCase(input_ids=ids, needle_spans=[(1, 21)], needles=[Needle(text, "q", "x")], target=0)
    trial = rt.decode_trial(m, case, max_new_tokens=10)
    assert trial.generated == block[4:14]  # the model really does induction
    copies, mass, top1, _ = naive_trial(m.model, case, trial.generated)
    np.testing.assert_array_equal(trial.copies, copies)
    np.testing.assert_allclose(trial.mass, mass, atol=1e-5)
    assert trial.recall == pytest.approx(10 / 20)
    # Every layer-1 head attends to the token it is producing (heads.json: induction-offset attention > 0.9).
    assert (trial.copies[1] >= 9).all() and (trial.copies[0] <= 1).all()


def test_aggregate_drops_trials_that_do_not_recall_the_needle():
    def fake(recall, found, copies):
        case = random_case()
        c = np.full((2, 3), float(copies))
        return rt.Trial(case=case, generated=[5, 6], reply="", recall=recall, answer_found=found, copies=c,
                        mass=c / 10)

    trials = [fake(1.0, True, 6), fake(0.5, True, 3), fake(0.2, False, 12)]
    retrieval, mass = rt.aggregate(trials)
    np.testing.assert_allclose(retrieval, 6 / 12)  # exactly 0.5 recall is dropped (the paper's code: > 50)
    np.testing.assert_allclose(mass, np.mean([0.6 / 2, 0.3 / 2]))
    retrieval, mass = rt.aggregate([fake(0.1, False, 3)])
    assert np.isnan(retrieval).all() and np.isnan(mass).all()


def test_rouge1_recall():
    assert rt.rouge1_recall("The magic word is lanternfish.", "the magic WORD is: lanternfish") == 1.0
    assert rt.rouge1_recall("a b c d", "a b") == 0.5
    assert rt.rouge1_recall("a a b", "a") == pytest.approx(1 / 3)


def test_grids():
    contexts, depths = rt.grid("default", 8192)
    assert contexts == [256, 512, 1024] and len(depths) == 3
    contexts, depths = rt.grid("full", 8192)
    assert max(contexts) <= 8192 - 64 and len(depths) == 10 and contexts == sorted(contexts)
    assert rt.grid("full", None)[0][-1] == 50000
    with pytest.raises(Exception, match="unknown retrieval grid"):
        rt.grid("huge", 8192)


def test_profile_writes_scores_and_trial_records(tmp_path, monkeypatch):
    import headwise
    from tests.conftest import tiny_model

    tiny = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer(), name="tiny")
    monkeypatch.setitem(rt.GRIDS, "default", {"contexts": (96,), "depths": (0.2, 0.8)})
    monkeypatch.setattr(rt, "bundled_needles", lambda: bundled_needles()[5:6])  # a short needle: fewer steps
    text = tmp_path / "filler.txt"
    text.write_text(" ".join(f"t{i % 40}." for i in range(600)))
    atlas = profile(tiny, ["retrieval", "retrieval_mass"], ProfileSettings(text=str(text)))
    records = atlas.profile("retrieval_trials")["records"]
    assert len(records) == 2 and [r["depth"] for r in records] == [0.2, 0.8]
    keys = {"context", "depth", "needle", "reply", "needle_recall", "kept_retrieval", "copying_heads"}
    assert keys <= set(records[0])
    settings = atlas.data["settings"]["probes"]["needle_retrieval"]
    assert settings["trials"] == len(records) and settings["contexts"] == [96]
    assert atlas.score("retrieval").shape == (tiny.geometry.n_layers, tiny.geometry.n_heads)
    assert "retrieval" in [r["role"] for r in atlas.data["roles"]["rules"]]
    type(atlas).load(atlas.save(tmp_path / "a"))  # stays loadable


@pytest.mark.slow
def test_smollm2_has_few_strong_retrieval_heads(smollm2):
    """Wu et al.: a few heads copy the needle while the model repeats it (score > 0.1); most never do."""
    case = needle_case(smollm2.tokenizer, context=256, depth=0.5, needle=0, seed=0)
    trial = rt.decode_trial(smollm2, case)
    assert trial.recall > 0.5, trial.reply
    retrieval, mass = rt.aggregate([trial])
    strong = (retrieval > 0.1).sum()
    assert 1 <= strong <= 0.1 * retrieval.size, strong
