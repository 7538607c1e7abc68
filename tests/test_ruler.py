"""RULER's synthetic tasks: seeded, sized to the context, answers that really follow from the prompt,
RULER's scoring, and `headwise eval --tasks ruler` end to end on a tiny model."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch

from headwise.errors import HeadwiseError
from headwise.probes.ruler import NOISE, RULER_TASKS, TOKENS_TO_GENERATE, ruler_case, ruler_score, string_match_all

CHAT = "{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}<|assistant|>\n"


def byte_tokenizer(chat: bool = False, bos: bool = True):
    """One token per byte (no merges), so token counts are byte counts and any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<bos>": len(vocab), "<eos>": len(vocab) + 1})
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    if bos:
        raw.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                           special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>")
    if chat:
        tok.chat_template = CHAT
    return tok


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _task_part(case) -> str:
    """The prompt from the last task instruction on (vt and cwe put a worked example first)."""
    starts = {"vt": "Memorize and track", "cwe": "Below is a numbered list"}
    return case.text[case.text.rindex(starts[case.task]):] if case.task in starts else case.text


@pytest.mark.parametrize("task", RULER_TASKS)
def test_cases_are_seeded_and_fill_the_context(tok, task):
    a = ruler_case(tok, task, context=3000, seed=3)
    b = ruler_case(tok, task, context=3000, seed=3)
    c = ruler_case(tok, task, context=3000, seed=4)
    assert torch.equal(a.input_ids, b.input_ids) and a.text == b.text and a.answers == b.answers
    assert a.answers != c.answers
    assert a.task == task and a.max_new_tokens == TOKENS_TO_GENERATE[task] and a.until == "eos"
    # the ids are the text (after BOS), and the prompt stops short of the context by less than one more
    # haystack unit: a noise line, an essay word, a numbered word, or the few coded words one more draw adds
    assert a.input_ids.dtype == torch.long and a.input_ids[0, 0].item() == tok.bos_token_id
    assert tok.decode(a.input_ids[0, 1:]) == a.text and a.length == len(a.text.encode()) + 1
    slack = {"niah_single_1": len(NOISE) + 1, "vt": len(NOISE) + 1, "fwe": 60}.get(task, 40)
    assert context_gap(a, 3000) < slack and a.length <= 3000


def context_gap(case, context: int) -> int:
    return context - case.length


def test_niah_needles_hold_the_answers(tok):
    numbers = {"niah_single_1": (1, 1, 1), "niah_single_2": (1, 1, 1), "niah_single_3": (1, 1, 1),
               "niah_multikey_1": (4, 1, 1), "niah_multivalue": (1, 4, 1), "niah_multiquery": (4, 1, 4)}
    for task, (keys, values, asked) in numbers.items():
        for seed in range(3):
            case = ruler_case(tok, task, context=2000, seed=seed)
            kind = "uuids" if task == "niah_single_3" else "numbers"
            found = re.findall(rf"One of the special magic {kind} for (\S+) is: (\S+)\.(?:\s|$)", case.text)
            by_key: dict[str, list[str]] = {}
            for key, value in found:
                by_key.setdefault(key, []).append(value)
            assert len(by_key) == keys and all(len(v) == values for v in by_key.values())
            question = re.search(r"What (?:is|are all) the special magic \w+ for (.+) mentioned in the provided text\?",
                                 case.text).group(1)
            queried = re.split(r", and |, ", question)
            assert len(queried) == asked
            assert sorted(case.answers) == sorted(v for k in queried for v in by_key[k])
            uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
            pattern = uuid if kind == "uuids" else r"\d{7}"
            assert all(re.fullmatch(pattern, a) for a in case.answers)
    single = ruler_case(tok, "niah_single_1", context=1500, seed=0).text
    assert single.count(NOISE) > 5 and "A special magic number is hidden" in single
    assert single.endswith("mentioned in the provided text? The special magic number for "
                           + single.split("special magic number for ")[-1].split(" mentioned")[0]
                           + " mentioned in the provided text is")
    essay = ruler_case(tok, "niah_multivalue", context=1500, seed=0).text
    assert "It is a truth universally acknowledged" in essay and NOISE not in essay
    assert essay.endswith("mentioned in the provided text are")


def _resolve(lines: list[str]) -> dict[str, str]:
    """Follow every assignment "VAR X = 12345" / "VAR Y = VAR X" to a number."""
    direct = {}
    for line in lines:
        m = re.fullmatch(r"VAR ([A-Z]+) = (VAR ([A-Z]+)|\d+) ?", line)
        if m:
            direct[m.group(1)] = m.group(2)
    def value(name: str, depth: int = 0) -> str:
        v = direct[name]
        return value(v[4:], depth + 1) if v.startswith("VAR ") and depth < 50 else v
    return {name: value(name) for name in direct}


def test_vt_chain_resolves_to_the_answers(tok):
    for seed in range(4):
        case = ruler_case(tok, "vt", context=3000, seed=seed)
        example, task = case.text[:case.text.rindex("Memorize and track")], _task_part(case)
        query = re.search(r"Find all variables that are assigned the value (\d+) in the text above", task).group(1)
        values = _resolve(task.split("\n"))
        assert sorted(case.answers) == sorted(k for k, v in values.items() if v == query) and len(case.answers) == 5
        assert f"5 variables are assigned the value {query}, they are: " in task
        # the worked example: its shown answer is its own chain, none of the real one's names
        shown = example.rstrip().rsplit("they are: ", 1)[1].split()
        ex_query = re.search(r"assigned the value (\d+) in the text above", example).group(1)
        assert sorted(shown) == sorted(k for k, v in _resolve(example.split("\n")).items() if v == ex_query)
        assert not set(shown) & set(case.answers) and "12345" not in example


def test_cwe_answers_are_the_ten_commonest_words(tok):
    for context, repeats in ((3000, (6, 1)), (9000, (30, 3))):  # RULER switches at 4096
        case = ruler_case(tok, "cwe", context=context, seed=1)
        listed = _task_part(case).split("\n")[1]
        entries = re.findall(r"(\d+)\. (\S+)", listed)
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(w for _, w in entries).most_common()
        assert sorted(w for w, _ in counts[:10]) == sorted(case.answers)
        assert {c for _, c in counts[:10]} == {repeats[0]} and {c for _, c in counts[10:]} == {repeats[1]}
        assert case.text.rindex("Answer: The top 10 words") > case.text.rindex("Question: What are the 10")


def test_fwe_answers_are_the_three_most_frequent_coded_words(tok):
    for seed in range(3):
        case = ruler_case(tok, "fwe", context=1500, seed=seed)
        coded = case.text.split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
        counts = Counter(w for w in coded if w != "...").most_common()
        assert sorted(w for w, _ in counts[:3]) == sorted(case.answers)
        assert counts[2][1] > counts[3][1]  # no tie with the fourth
        assert Counter(coded).most_common(1)[0][0] == "..."


def reference_string_match_all(preds, refs):
    """RULER's scripts/eval/synthetic/constants.py, verbatim."""
    score = sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref)
                 for pred, ref in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


def test_scoring_is_rulers_string_match_all():
    uuid = "960f4d86-0ca5-47f9-8fb6-9de1033c6ab2"
    cases = [(" 1234567, 7654321 and 1111111.", ["1234567", "7654321", "2222222"], 2 / 3),
             (f"is: {uuid.upper()}", [uuid], 1.0),
             ("1. Apple 2. pear\n3. plum", ["apple", "plum", "fig", "pear"], 0.75),
             ("nothing here", ["ABCDE"], 0.0),
             ("they are: abcde fghij", ["ABCDE", "FGHIJ", "KLMNO"], 2 / 3)]
    for reply, answers, expected in cases:
        assert ruler_score(reply, answers) == pytest.approx(expected)
    preds, refs = [c[0] for c in cases], [c[1] for c in cases]
    assert string_match_all(preds, refs) == reference_string_match_all(preds, refs) == 61.67
    with pytest.raises(HeadwiseError, match="at least one reference"):
        ruler_score("x", [])


def test_chat_template_frames_the_task_and_the_answer_prefix():
    chat = byte_tokenizer(chat=True)
    case = ruler_case(chat, "niah_single_2", context=900, seed=0)
    assert case.text.startswith("<|user|>\nA special magic number is hidden")
    assert re.search(r"provided text\?<\|end\|>\n<\|assistant\|> The special magic number for \S+ mentioned in the "
                     r"provided text is$", case.text)
    assert case.input_ids[0, 0].item() != chat.bos_token_id  # the template says where BOS goes, not the tokenizer
    plain = ruler_case(chat, "niah_single_2", context=900, seed=0, chat=False)
    assert plain.text.startswith("A special magic") and plain.answers == case.answers
    no_bos = ruler_case(byte_tokenizer(bos=False), "fwe", context=900, seed=0)
    assert no_bos.length == len(no_bos.text.encode())


def test_bad_inputs(tok):
    with pytest.raises(HeadwiseError, match="unknown RULER task 'qa_1'"):
        ruler_case(tok, "qa_1", context=1000, seed=0)
    for task in ("vt", "cwe", "niah_multikey_1"):
        with pytest.raises(HeadwiseError, match=f"{task} needs more than 200 tokens"):
            ruler_case(tok, task, context=200, seed=0)
    with pytest.raises(HeadwiseError, match=r"longer than this model allows \(1024\); use a context of at most 896"):
        ruler_case(tok, "niah_single_1", context=1000, seed=0, max_positions=1024)
    with pytest.raises(HeadwiseError, match="chat template"):
        ruler_case(tok, "vt", context=1000, seed=0, chat=True)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(HeadwiseError, match="context must be"):
            ruler_case(tok, "fwe", context=bad, seed=0)
    with pytest.raises(HeadwiseError, match="seed must be"):
        ruler_case(tok, "fwe", context=1000, seed=-1)
    with pytest.raises(HeadwiseError, match="distinct words at this context but the bundled text has"):
        ruler_case(tok, "cwe", context=400_000, seed=0)  # more words than the bundled text has: refused, not cut


# --- headwise eval --tasks ruler, on a tiny random model (replies are noise; the plumbing is what is tested)

def test_summary_scores_and_the_ruler_average_by_hand():
    from headwise.kv.evaluate import summarize

    rows = [{"task": t, "context": 512, "policy": p, "score": sc, "correct": sc == 1.0, "kv_bytes": b}
            for t, p, sc, b in (("vt", "full", 1.0, 100), ("vt", "full", 0.6, 100), ("vt", "streaming", 0.2, 40),
                                ("vt", "streaming", 0.0, 40), ("cwe", "full", 0.5, 120), ("cwe", "streaming", 1.0, 60))]
    s = summarize(rows)
    assert s["vt"]["512"]["full"]["score"] == 80.0 and s["vt"]["512"]["full"]["accuracy"] == 0.5
    assert s["vt"]["512"]["streaming"]["score"] == 10.0 and s["cwe"]["512"]["streaming"]["score"] == 100.0
    full, streaming = s["ruler"]["512"]["full"], s["ruler"]["512"]["streaming"]
    assert full["score"] == 65.0 and streaming["score"] == 55.0  # (80 + 50) / 2, (10 + 100) / 2: tasks weigh alike
    assert full["n"] == 3 and full["correct"] == 1 and full["tasks"] == 2
    assert full["kv_bytes"] == 106 and streaming["kv_ratio"] == round(46 / 106, 4)  # bytes pooled over the rows


def test_eval_runs_every_ruler_task_and_averages_them(tiny_dir):
    import headwise
    from headwise.kv.evaluate import EvalSettings, evaluate

    settings = EvalSettings(tasks=("passkey", "ruler"), contexts=(850,), depths=(0.5,), trials=1, sink=4, window=16)
    assert settings.tasks == ("passkey", *RULER_TASKS)
    result = evaluate(headwise.load(str(tiny_dir)), ["streaming@0.3"], settings)
    rows = [r for r in result["rows"] if r["task"] in RULER_TASKS]
    assert len(rows) == len(RULER_TASKS) * 2  # tasks x (full, streaming)
    for r in rows:
        assert {"task", "context", "seed", "trial", "policy", "reply", "answers", "score", "kv_bytes", "prefill_s",
                "decode_s"} <= set(r)
        assert r["score"] == ruler_score(r["reply"], r["answers"]) and r["correct"] == (r["score"] == 1.0)
        assert r["new_tokens"] <= TOKENS_TO_GENERATE[r["task"]] == r["reply_budget"] and r["tokens"] <= 850
    summary = result["summary"]
    for task in RULER_TASKS:
        cell = summary[task]["850"]["streaming@0.3"]
        mine = [r["score"] for r in rows if r["task"] == task and r["policy"] == "streaming@0.3"]
        assert cell["score"] == round(sum(mine) / len(mine) * 100, 2) and cell["n"] == 1
    avg = summary["ruler"]["850"]["full"]
    assert avg["tasks"] == len(RULER_TASKS) and avg["kv_ratio"] == 1.0
    assert avg["score"] == pytest.approx(sum(summary[t]["850"]["full"]["score"] for t in RULER_TASKS) / 9, abs=0.01)
    assert "score" not in summary["passkey"]["850"]["full"]
    # the same seed gives the same prompts: the same replies under the full cache
    again = evaluate(headwise.load(str(tiny_dir)), ["full"], EvalSettings(tasks=("vt",), contexts=(850,), trials=1))
    assert [r["reply"] for r in again["rows"]] == [r["reply"] for r in rows if r["task"] == "vt" and
                                                   r["policy"] == "full"]


def test_cli_eval_ruler_tasks_and_errors(tiny_dir, tmp_path, capsys):
    from headwise.cli import main
    from headwise.kv.evaluate import load_eval

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    helped = capsys.readouterr().out
    assert all(t in helped for t in ("ruler", *RULER_TASKS))
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_dir), "--tasks", "niah_multikey_1,vt", "--contexts", "850",
                 "--trials", "1", "--policies", "full", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "niah_multikey_1 @ 850: full: score" in printed and "ruler @ 850: full: score" in printed
    doc = load_eval(out)
    assert {r["task"] for r in doc["rows"]} == {"niah_multikey_1", "vt"} and json.dumps(doc)
    assert set(doc["summary"]) == {"niah_multikey_1", "vt", "ruler"}
    assert main(["eval", "--model", str(tiny_dir), "--tasks", "ruler,nope", "--out", str(out)]) == 2
    assert "unknown task(s) nope" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), "--tasks", "cwe", "--contexts", "150", "--policies", "full",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cwe needs more than 150 tokens" in err[0]
    assert main(["eval", "--model", str(tiny_dir), "--tasks", "vt", "--contexts", "1000", "--policies", "full",
                 "--out", str(out)]) == 2
    assert "longer than this model allows (1024)" in capsys.readouterr().err
