"""In-context tasks: the bundled data, loading and splitting a user's file, few-shot prompts, scoring."""

from __future__ import annotations

import json
from importlib.resources import files
from types import SimpleNamespace

import numpy as np
import pytest

import headwise
from headwise.errors import HeadwiseError
from headwise.instrument import HeadEdits
from headwise.tasks import (
    TEST_SHARE,
    Pair,
    bundled_tasks,
    example,
    few_shot_prompt,
    is_right,
    load_task,
    query,
    task_accuracy,
)
from tests.conftest import tiny_model, tiny_tokenizer

BUNDLED = ("antonyms", "country_capital", "country_currency", "english_french", "first_letter", "lower_upper",
           "next_month", "next_weekday", "number_word", "singular_plural")


def _lines(name: str) -> list[dict]:
    raw = (files("headwise") / "data" / "tasks" / f"{name}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in raw.splitlines()]


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _good(n: int = 30) -> list[dict]:
    return [{"prompt": f"word{i}", "target": f"answer{i}"} for i in range(n)]


# --- the bundled tasks -------------------------------------------------------------------------

def test_bundled_names():
    assert bundled_tasks() == BUNDLED


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_task_loads_with_a_clean_split(name):
    task = load_task(name)
    assert task.name == name and task.source == "bundled"
    assert len(task.train) >= 11 and len(task.test) >= 5
    train, test = {p.prompt for p in task.train}, {p.prompt for p in task.test}
    assert not train & test
    assert len(train) + len(test) == len(task.train) + len(task.test)
    assert load_task(name).digest == task.digest
    assert task.record() == {"name": name, "source": "bundled", "digest": task.digest, "train": len(task.train),
                             "test": len(task.test)}


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_file_format_and_seeded_split(name):
    """Every line carries its split, drawn as SOURCES.md says: numpy default_rng(0), 30% held out."""
    rows = _lines(name)
    for r in rows:
        assert set(r) == {"prompt", "target", "split"}
        for key in ("prompt", "target"):
            assert r[key] == r[key].strip() and r[key] and "\n" not in r[key]
    n = len(rows)
    drawn = set(np.random.default_rng(0).choice(n, size=round(TEST_SHARE * n), replace=False).tolist())
    assert {i for i, r in enumerate(rows) if r["split"] == "test"} == drawn


def test_bundled_conventions():
    by = {name: {r["prompt"]: r["target"] for r in _lines(name)} for name in BUNDLED}
    assert by["country_capital"]["France"] == "Paris"
    assert by["country_currency"]["Japan"] == "yen" and by["country_currency"]["United Kingdom"] == "pound"
    assert by["number_word"].get("512", "five hundred twelve") == "five hundred twelve"
    for digits, words in by["number_word"].items():
        assert " and " not in words and 0 <= int(digits) <= 999
    assert all(t == p.upper() and p == p.lower() for p, t in by["lower_upper"].items())
    assert all(t == p[0].lower() for p, t in by["first_letter"].items())
    assert by["next_weekday"]["Sunday"] == "Monday" and by["next_weekday"]["SATURDAY"] == "SUNDAY"
    assert by["next_weekday"]["Sat"] == "Sun" and by["next_weekday"]["friday"] == "saturday"
    assert len(by["next_weekday"]) == 28
    assert by["next_month"]["December"] == "January" and by["next_month"]["may"] == "june"
    assert by["next_month"]["May"] == "June" and by["next_month"]["Apr"] == "May"
    assert by["singular_plural"]["child"] == "children" and by["english_french"]["egg"] == "œuf"


# --- a user's file -----------------------------------------------------------------------------

def test_user_file_without_split_is_split_by_prompt_hash(tmp_path):
    rows = _good(60)
    task = load_task(_write(tmp_path / "mine.jsonl", rows))
    reordered = load_task(_write(tmp_path / "shuffled.jsonl", rows[::-1]))
    assert task.name == "mine" and task.source == str((tmp_path / "mine.jsonl").resolve())
    assert {p.prompt for p in task.test} == {p.prompt for p in reordered.test}
    assert 0 < len(task.test) < len(rows) and len(task.train) + len(task.test) == len(rows)
    # a prompt's side does not depend on its neighbours either
    fewer = load_task(_write(tmp_path / "fewer.jsonl", rows[:40]))
    assert {p.prompt for p in fewer.test} == {p.prompt for p in task.test} & {r["prompt"] for r in rows[:40]}


def test_user_file_split_column_is_obeyed(tmp_path):
    rows = [dict(r, split="test" if i < 3 else "train") for i, r in enumerate(_good(20))]
    task = load_task(_write(tmp_path / "split.jsonl", rows))
    assert [p.prompt for p in task.test] == ["word0", "word1", "word2"]
    assert len(task.train) == 17
    assert task.digest == load_task(str(tmp_path / "split.jsonl")).digest


@pytest.mark.parametrize("bad", [
    "not json",
    {"prompt": "lonely"},
    {"prompt": "x", "target": 3},
    ["prompt", "target"],
    {"prompt": "word0", "target": "again"},
    {"prompt": "two\nlines", "target": "y"},
    {"prompt": "x", "target": "two\nlines"},
    {"prompt": "   ", "target": "y"},
    {"prompt": "x", "target": "y", "split": "dev"},
    {"prompt": "x" * 3000, "target": "y"},
], ids=["not-json", "no-target", "target-not-text", "not-an-object", "duplicate", "multiline-prompt",
        "multiline-target", "blank-prompt", "bad-split", "too-long"])
def test_bad_line_is_one_line_error(tmp_path, bad):
    path = _write(tmp_path / "bad.jsonl", _good() + [bad])
    with pytest.raises(HeadwiseError) as err:
        load_task(path)
    assert "\n" not in str(err.value) and "line 31" in str(err.value)


def test_too_few_pairs(tmp_path):
    with pytest.raises(HeadwiseError) as err:
        load_task(_write(tmp_path / "small.jsonl", _good(5)))
    assert "\n" not in str(err.value) and "at least 11" in str(err.value)
    only_train = [dict(r, split="train") for r in _good(20)]
    with pytest.raises(HeadwiseError, match="1 test pair"):
        load_task(_write(tmp_path / "no_test.jsonl", only_train))


def test_unreadable_file_and_unknown_name(tmp_path):
    cases = [str(tmp_path / "missing.jsonl"), "no_such_task", str(tmp_path)]
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9", "target": "x"}\n')
    cases.append(str(latin))
    for spec in cases:
        with pytest.raises(HeadwiseError) as err:
            load_task(spec)
        assert "\n" not in str(err.value), spec
    with pytest.raises(HeadwiseError, match="unknown task 'no_such_task'.*antonyms"):
        load_task("no_such_task")


# --- prompts and scoring -----------------------------------------------------------------------

def test_few_shot_prompt_leaves_out_the_query_and_is_seeded():
    task = load_task("antonyms")
    for pair in task.train[:30]:
        text = few_shot_prompt(task, pair.prompt, 5, np.random.default_rng(7))
        blocks = text.split("\n\n")
        assert len(blocks) == 6 and blocks[-1] == query(pair.prompt)
        assert all(b.startswith("Q: ") and "\nA: " in b for b in blocks[:-1])
        assert example(pair) not in blocks and f"Q: {pair.prompt}\n" not in "\n\n".join(blocks[:-1]) + "\n"
        assert text == few_shot_prompt(task, pair.prompt, 5, np.random.default_rng(7))
    test_pair = task.test[0]
    a = few_shot_prompt(task, test_pair.prompt, 10, np.random.default_rng(0))
    b = few_shot_prompt(task, test_pair.prompt, 10, np.random.default_rng(1))
    assert a != b and a.count("Q: ") == b.count("Q: ") == 11
    assert few_shot_prompt(task, test_pair.prompt, 0, np.random.default_rng(0)) == f"Q: {test_pair.prompt}\nA:"
    assert example(Pair("hot", "cold")) == "Q: hot\nA: cold"


def test_few_shot_prompt_refuses_too_many_shots():
    task = load_task("next_weekday")
    pair = task.train[0]
    few_shot_prompt(task, pair.prompt, len(task.train) - 1, np.random.default_rng(0))
    for shots in (len(task.train), -1):
        with pytest.raises(HeadwiseError) as err:
            few_shot_prompt(task, pair.prompt, shots, np.random.default_rng(0))
        assert "\n" not in str(err.value)


def test_is_right():
    for reply in ("Paris", " Paris.", "Paris\nmore", "  Paris  \n\nQ: x", "Paris."):
        assert is_right(reply, "Paris"), reply
    for reply in ("paris", "Paris, France", "", "The capital is Paris", "Paris!"):
        assert not is_right(reply, "Paris"), reply
    assert is_right("Washington, D.C.", "Washington, D.C.") and is_right(" Washington, D.C.\n", "Washington, D.C.")
    assert not is_right("Washington", "Washington, D.C.")


# --- accuracy on a tiny random model -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm():
    return headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer(), name="tiny-llama")


@pytest.fixture
def word_task(tmp_path):
    """Pairs over the tiny tokenizer's words, so that prompts are real tokens rather than unknowns."""
    rows = [{"prompt": " ".join(f"t{3 + i + 40 * k}" for k in range(1 + i % 2)), "target": f"t{10 + (i * 5) % 30}"}
            for i in range(40)]
    return load_task(_write(tmp_path / "words.jsonl", rows))


def test_task_accuracy_on_a_tiny_model(tiny_lm, word_task):
    score = task_accuracy(tiny_lm, word_task, shots=3)
    assert score.n == len(word_task.test) == len(score.replies)
    assert 0.0 <= score.accuracy <= 1.0 and score.correct == round(score.accuracy * score.n)
    assert score.correct == sum(is_right(r, p.target) for r, p in zip(score.replies, word_task.test))
    assert score.prompt_tokens > 0
    assert set(score.record()) == {"accuracy", "correct", "n", "mean_prompt_tokens"}
    limited = task_accuracy(tiny_lm, word_task, shots=3, limit=2)
    assert limited.n == 2 and limited.replies == score.replies[:2]
    on_train = task_accuracy(tiny_lm, word_task, shots=2, split="train", limit=5, batch=2)
    assert on_train.n == 5


def test_identity_edit_changes_nothing(tiny_lm, word_task):
    plain = task_accuracy(tiny_lm, word_task, shots=2)
    calls = []

    def same(layer, out):
        calls.append(layer)
        return out

    edited = task_accuracy(tiny_lm, word_task, shots=2, edits=HeadEdits(output=same))
    again = task_accuracy(tiny_lm, word_task, shots=2, edits=HeadEdits(output=same))
    assert calls, "the edit never ran"
    assert edited.replies == plain.replies == again.replies
    assert edited.accuracy == plain.accuracy


def test_replies_are_scored_against_their_own_pairs(tiny_lm, word_task, monkeypatch):
    """Prompts are decoded in groups of equal length; each reply must come back to its own pair.

    A stand-in for greedy decoding answers every row with the target of the query it reads at the
    end of that row's prompt, so a right bookkeeping scores 1."""
    import headwise.tasks as tasks_module

    targets = {p.prompt: p.target for p in word_task.test}
    tok = tiny_lm.tokenizer
    seen_rows = []

    def oracle(loaded, ids, budget, **kwargs):
        texts = []
        for row in ids.tolist():
            words = row[:-2]  # drop "A" ":" (unknown words, id 0) and read back to the "Q" ":" before
            start = max(i for i, t in enumerate(words) if t == 0) + 1
            texts.append(targets[tok.decode(words[start:])])
        seen_rows.append(len(texts))
        return SimpleNamespace(texts=texts)

    monkeypatch.setattr(tasks_module, "greedy", oracle)
    score = task_accuracy(tiny_lm, word_task, shots=3, batch=2)
    assert score.accuracy == 1.0 and score.n == len(word_task.test)
    assert len(seen_rows) > 1 and max(seen_rows) <= 2  # several groups and chunks were decoded


def test_task_accuracy_refuses_bad_arguments(tiny_lm, word_task):
    for kwargs in ({"split": "dev"}, {"limit": 0}, {"batch": 0}):
        with pytest.raises(HeadwiseError) as err:
            task_accuracy(tiny_lm, word_task, **kwargs)
        assert "\n" not in str(err.value)
