"""headwise.compare: a base and its pruned models measured side by side, every metric for every model."""

from __future__ import annotations

import json
import math
import string

import pytest
import torch

import headwise
from headwise import compare as compare_module
from headwise.cli import main
from headwise.compare import CompareSettings, held_out_text, profile_text_probes, text_windows
from headwise.probes.text import bundled_text_files, load_text, natural_text
from tests.conftest import tiny_model

# Small everything: a run over three tiny models takes seconds.
FLAGS = ["--shots", "2", "--limit", "3", "--passkey-trials", "2", "--passkey-context", "400", "--heldout-windows", "3",
         "--heldout-context", "40", "--speed-repeats", "2", "--speed-prompt", "16", "--speed-new-tokens", "3"]


def char_tokenizer():
    """One token per character (93 of them, the rest unknown): bundled prose becomes varied ids that fit the tiny
    models' 96-token vocabulary, so windows at different places differ."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + " " + string.punctuation[:30]
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", *chars])}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Split(" ", "isolated")
    raw.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def save_model(directory, seed: int = 0):
    tiny_model("llama-gqa", seed=seed).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def task_file(path):
    """An in-context task over the characters: "ab" -> "c"."""
    letters = string.ascii_lowercase
    lines = [json.dumps({"prompt": f"{letters[i % 26]}{letters[(i + 1) % 26]}{i}", "target": letters[(i + 2) % 26],
                         "split": "test" if i % 3 == 0 else "train"}) for i in range(40)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A base, a model pruned by importance_norm and one pruned at random; compared by the CLI."""
    root = tmp_path_factory.mktemp("compare")
    model = save_model(root / "model")
    assert main(["profile", "--model", str(model), "--scores", "importance_norm", "--out", str(root / "atlas"),
                 "--importance-context", "24", "--importance-sequences", "2", "--no-report"]) == 0
    for name, score in (("norm", "importance_norm"), ("rand", "random")):
        assert main(["prune", "--model", str(model), "--atlas", str(root / "atlas"), "--score", score,
                     "--fraction", "0.5", "--seed", "1", "--out", str(root / name)]) == 0
    tasks = task_file(root / "letters.jsonl")
    argv = ["compare", "--model", str(model), "--pruned", str(root / "norm"), str(root / "rand"), "--tasks",
            str(tasks), *FLAGS]
    assert main([*argv, "--out", str(root / "c.json")]) == 0
    return root, argv, json.loads((root / "c.json").read_text())


def test_every_metric_for_every_model_and_the_base_is_its_own_unit(run):
    root, _, doc = run
    assert doc["schema"] == "headwise.compare/1" and doc["complete"] and doc["models_done"] == 3
    assert [m["name"] for m in doc["models"]] == ["base", "norm", "rand"]
    assert {"torch", "transformers", "headwise"} <= set(doc["versions"])
    for m in doc["models"]:
        assert m["parameters"] > 0 and math.isfinite(m["perplexity"]["perplexity"])
        assert math.isfinite(m["in_context_loss"]) and m["tasks"]["letters"]["n"] == 3
        assert 0 <= m["task_accuracy"] <= 1 and m["passkey"]["n"] == 2
        assert set(m["ratios"]) == {"parameters", "perplexity", "in_context_loss", "task_accuracy",
                                    "passkey_accuracy", "prefill_tok_s", "decode_tok_s"}
        speed = doc["speed"]["models"][m["name"]]
        assert len(speed["prefill_s"]) == len(speed["decode_s"]) == 2 and speed["decode_tok_s"] > 0
    base, norm, rand = doc["models"]
    assert all(v == 1.0 or v is None for v in base["ratios"].values()), base["ratios"]
    assert base["ratios"]["parameters"] == 1.0 and base["ratios"]["decode_tok_s"] == 1.0
    assert doc["speed"]["models"]["base"]["decode_ratio_per_round"] == [1.0, 1.0]
    assert base["provenance"] is None and base["heads_removed_share"] == 0
    assert norm["criterion"] == "importance_norm" and rand["criterion"] == "random" and rand["seed"] == 1
    assert norm["heads_removed_share"] == 0.5 and norm["geometry"]["query_heads"] == 2
    assert norm["ratios"]["parameters"] == norm["parameters"] / base["parameters"] < 1
    assert norm["provenance"]["source_model"]["weights_sha256"] == base["model"]["weights_sha256"]
    assert (root / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_perplexity_equals_a_direct_computation_on_the_same_windows(run):
    from transformers import AutoModelForCausalLM

    root, _, doc = run
    tok = char_tokenizer()
    docs = dict(zip([p.name for p in bundled_text_files()], load_text(None)))
    rows = [[tok.bos_token_id] + tok(docs[w["document"]], add_special_tokens=False).input_ids[
        w["start_token"]:w["start_token"] + w["tokens"]] for w in doc["held_out_text"]["windows"]]
    ids = torch.tensor(rows)
    assert ids.shape == (3, 40) and len({tuple(r) for r in rows}) == 3
    for entry, directory in ((doc["models"][0], root / "model"), (doc["models"][1], root / "norm")):
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()  # plain transformers
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        assert entry["perplexity"]["tokens"] == 3 * 39
        assert entry["perplexity"]["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_held_out_windows_are_natural_text_windows_that_no_profile_probe_read(run):
    _, _, doc = run
    tok = char_tokenizer()
    # The replay of natural_text's sampling is natural_text's own windows.
    encoded = [tok(d, add_special_tokens=False).input_ids for d in load_text(None)]
    for context, n, seed in ((24, 2, 0), (300, 5, 3)):
        spans = text_windows(encoded, context=context, n_sequences=n, seed=seed, prepend_bos=True)
        probe = natural_text(tok, context=context, n_sequences=n, seed=seed)
        assert probe.input_ids.tolist() == [[1] + encoded[d][s:s + b] for d, s, b in spans]
    record = doc["held_out_text"]
    read = record["not_overlapping"]
    assert {p["probe"] for p in read} == {"importance_text", "text", "pattern_text"}
    assert {"context": 24, "n_sequences": 2} in [{k: p[k] for k in ("context", "n_sequences")} for p in read
                                                 if "the atlas norm was pruned by" in p["sources"]]
    assert len(read) == 4  # norm's and rand's atlas read the same windows: one entry, both named
    taken = [(w["document"], w["start_token"], w["tokens"]) for p in read for w in p["windows"]]
    chosen = [(w["document"], w["start_token"], w["tokens"]) for w in record["windows"]]
    for i, a in enumerate(chosen):
        for b in taken + chosen[:i]:
            assert not (a[0] == b[0] and a[1] < b[1] + b[2] and b[1] < a[1] + a[2]), (a, b)
    # The same settings give the same windows (no hidden randomness).
    ids, again = held_out_text(tok, profile_text_probes(None, "the default profile settings"),
                               CompareSettings(heldout_windows=3, heldout_context=40))
    assert ids.shape == (3, 40) and again == held_out_text(tok, profile_text_probes(None, "the default profile "
                                                                                         "settings"),
                                                           CompareSettings(heldout_windows=3, heldout_context=40))[1]


def test_a_pruned_directory_of_another_model_is_refused_in_one_line(run, tmp_path, capsys):
    root, argv, _ = run
    other = save_model(tmp_path / "other", seed=3)
    capsys.readouterr()
    code = main(["compare", "--model", str(other), *argv[3:], "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "was pruned from another model" in err, err
    assert "compare it with --model" in err and not (tmp_path / "x.json").exists()


def test_an_interrupted_run_keeps_the_models_it_finished(run, tmp_path, monkeypatch, capsys):
    root, argv, full = run
    out = tmp_path / "c.json"
    (tmp_path / "c.png").write_bytes(b"an older plot")
    real, calls = compare_module.measure, []

    def measure(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third model is measured
        return real(*args, **kwargs)

    monkeypatch.setattr(compare_module, "measure", measure)
    assert main([*argv, "--out", str(out)]) == 130
    assert capsys.readouterr().err.startswith("headwise: interrupted")
    doc = json.loads(out.read_text())
    assert not doc["complete"] and doc["models_done"] == 2 and doc["speed"] is None
    assert [m["name"] for m in doc["models"]] == ["base", "norm"]
    for kept, reference in zip(doc["models"], full["models"]):  # deterministic: the same numbers as the full run
        for key in ("parameters", "perplexity", "in_context_loss", "tasks", "passkey"):
            assert kept[key] == reference[key], key
    assert not (tmp_path / "c.png").exists()  # the older plot went with the older result


def test_every_model_is_compared_in_the_dtype_asked_for(run):
    root, argv, _ = run
    assert main(["--dtype", "bfloat16", *argv, "--out", str(root / "bf16.json")]) == 0
    models = json.loads((root / "bf16.json").read_text())["models"]
    assert len(models) == 3 and {m["model"]["dtype"] for m in models} == {"bfloat16"}


def test_settings_are_checked_before_any_model_loads(tmp_path):
    for kwargs, message in ((dict(limit=0), "--limit must be a whole number >= 1"),
                            (dict(speed_new_tokens=1), "--speed-new-tokens must be"),
                            (dict(tasks=("antonyms", "antonyms")), "names a task twice")):
        with pytest.raises(headwise.HeadwiseError, match=message):
            CompareSettings(**kwargs).check()
    with pytest.raises(headwise.HeadwiseError, match="no such directory"):
        compare_module.check_pruned_dirs([tmp_path / "none"])
    with pytest.raises(headwise.HeadwiseError, match="not a model directory"):
        compare_module.check_pruned_dirs([tmp_path])
