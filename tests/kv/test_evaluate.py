"""The evaluation harness and the CLI on a tiny model saved to disk (the speed runs load it by path)."""

from __future__ import annotations

import json

import pytest

from headwise.cli import main
from headwise.kv.evaluate import EvalSettings, evaluate, run_speed, summarize


def test_summarize_counts_and_ratios():
    rows = [{"task": "passkey", "context": 100, "policy": p, "correct": c, "kv_bytes": b, "answer_logprob": lp,
             "key_recalled": k}
            for p, c, b, lp, k in (("full", True, 100, -0.5, True), ("full", False, 100, -1.5, True),
                                   ("streaming", True, 30, None, None), ("streaming", True, 50, None, None))]
    s = summarize(rows)["passkey"]["100"]
    assert s["full"]["accuracy"] == 0.5 and s["full"]["n"] == 2 and s["full"]["answer_logprob"] == -1.0
    assert s["full"]["key_recall"] == 1.0 and s["streaming"]["key_recall"] is None
    assert s["streaming"]["accuracy"] == 1.0 and s["streaming"]["kv_ratio"] == 0.4
    assert s["streaming"]["answer_logprob"] is None


def test_evaluate_runs_every_policy_on_the_same_cases(tiny_dir):
    import headwise

    loaded = headwise.load(str(tiny_dir))
    settings = EvalSettings(tasks=("passkey",), contexts=(120,), depths=(0.5,), trials=2, max_new_tokens=3, sink=4,
                            window=16)
    result = evaluate(loaded, ["streaming@0.3", "random@0.5", "snapkv@0.3"], settings)
    cells = result["summary"]["passkey"]["120"]
    assert set(cells) == {"full", "streaming@0.3", "random@0.5", "snapkv@0.3"}
    assert all(c["n"] == 2 for c in cells.values())
    assert cells["full"]["kv_ratio"] == 1.0 and all(c["kv_ratio"] < 0.75 for k, c in cells.items() if k != "full")
    assert json.dumps(result)  # JSON-ready
    for row in result["rows"]:  # every row carries its costs: bytes, prefill and decode time, peak memory
        assert row["prefill_s"] > 0 and row["decode_s"] >= 0 and row["kv_bytes"] > 0
        if row["peak_rss_bytes"] is not None:  # Linux
            assert row["peak_rss_bytes"] >= row["peak_rss_above_start_bytes"] >= 0
    per_cell = [c["peak_rss_above_start_bytes"] for c in cells.values()]
    assert all(x is None for x in per_cell) or all(isinstance(x, int) for x in per_cell)


def test_speed_runs_in_subprocesses(tiny_dir):
    settings = EvalSettings(speed_context=200, speed_new_tokens=4, sink=4, window=16)
    out = run_speed(str(tiny_dir), ["full", "streaming"], settings)["policies"]
    assert out["full"]["peak_rss_bytes"] > 0 and out["streaming"]["kv_bytes"] < out["full"]["kv_bytes"]
    assert out["full"]["decode_speedup_vs_full"] == 1.0


def test_cli_generate_and_errors(tiny_dir, tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text(" ".join(f"t{i % 90}" for i in range(150)))
    assert main(["generate", "--model", str(tiny_dir), "--policy", "streaming@0.2", "--prompt-file", str(prompt),
                 "--max-new-tokens", "3", "--sink", "4", "--window", "8"]) == 0
    out = capsys.readouterr().out
    assert "KV cache:" in out and "tok/s" in out and "peak RSS" in out
    assert main(["generate", "--model", str(tiny_dir), "--policy", "bogus", "--prompt-file", str(prompt)]) == 2
    assert "unknown policy" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), "--tasks", "nope", "--out", str(tmp_path / "e.json")]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_cli_dtype_reaches_the_model_the_bytes_and_the_speed_runs(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bf16.json"
    assert main(["--dtype", "bfloat16", "eval", "--model", str(tiny_dir), "--policies", "streaming@0.3",
                 "--tasks", "passkey,speed", "--contexts", "120", "--depths", "0.5", "--trials", "1",
                 "--speed-context", "150", "--sink", "4", "--window", "16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"]["dtype"] == "bfloat16"
    per_token = 3 * 2 * 16 * 2 * 2  # layers x KV heads x head_dim x (K, V) x 2 bytes of bfloat16
    assert result["policies"]["full"]["kv_bytes"] == 120 * per_token  # the prediction
    row = next(r for r in result["rows"] if r["policy"] == "full")
    assert row["kv_bytes"] == (row["tokens"] + row["new_tokens"]) * per_token  # measured
    speed = result["speed"]["policies"]["full"]  # its own process, loaded in bfloat16 too
    assert speed["kv_bytes"] == (150 + speed["new_tokens"]) * per_token
    assert main(["--dtype", "int8", "eval", "--model", str(tiny_dir), "--out", str(out)]) == 2
    assert "argument --dtype: invalid choice: 'int8'" in capsys.readouterr().err


def test_plot_accuracy_against_bytes(tmp_path):
    pytest.importorskip("matplotlib")
    from headwise.kv.evaluate import plot

    result = {"model": {"spec": "tiny"}, "summary": {"passkey": {"1024": {
        "full": {"kv_bytes": 2 ** 21, "accuracy": 1.0}, "streaming": {"kv_bytes": 2 ** 20, "accuracy": 0.25}}}}}
    path = plot(result, tmp_path / "kv.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"


def test_needle_replies_get_room_for_the_needle_sentence(tiny_dir):
    import headwise
    from headwise.kv.evaluate import run_retrieval

    loaded = headwise.load(str(tiny_dir))
    settings = EvalSettings(tasks=("needle", "passkey"), contexts=(160,), depths=(0.5,), trials=1, max_new_tokens=3,
                            fillers=("words",))
    rows = run_retrieval(loaded, ["full"], settings)
    by_task = {r["task"]: r["new_tokens"] for r in rows}
    assert by_task["passkey"] <= 3 < by_task["needle"]
    # the passkey prompt ends in "The pass key is": its answer is scored teacher-forced; a free-form needle reply is not
    scored = {r["task"]: r for r in rows}
    assert scored["passkey"]["answer_logprob"] < 0 and scored["needle"]["answer_logprob"] is None
    assert isinstance(scored["passkey"]["key_recalled"], bool) and scored["needle"]["key_recalled"] is None


def test_needle_near_the_model_limit_warns_that_replies_may_be_cut(tiny_dir, capsys):
    import headwise
    from headwise.kv.evaluate import run_retrieval

    loaded = headwise.load(str(tiny_dir))
    limit = loaded.geometry.max_positions
    settings = EvalSettings(tasks=("needle",), contexts=(limit - 12,), depths=(0.5,), trials=1, max_new_tokens=3,
                            fillers=("words",))
    rows = run_retrieval(loaded, ["full", "streaming@64"], settings)
    assert all(r["reply_budget"] == 12 for r in rows)
    assert capsys.readouterr().err.count("reply tokens") == 1


def test_key_recall_ignores_the_space_before_the_key():
    from headwise.kv.evaluate import _answer_scores
    from headwise.kv.generate import GenerationResult

    def res(argmax):
        return GenerationResult(tokens=[], text="", prompt_tokens=1, prefill_seconds=0, decode_seconds=0, kv_bytes=0,
                                answer_logprobs=[-2.0, -0.1, -0.1], answer_argmax=argmax)

    assert _answer_scores(res([False, True, True]), key_tokens=[1, 2])["key_recalled"]  # " " lost, "12" recalled
    assert not _answer_scores(res([True, True, False]), key_tokens=[1, 2])["key_recalled"]
    assert _answer_scores(res([True, True, True]), key_tokens=[1, 2])["answer_logprob"] == pytest.approx(-0.7333, 1e-3)


def test_needle_seeds_beyond_the_bundled_needles_wrap_around(tiny_dir):
    import headwise
    from headwise.kv.evaluate import _cases
    from headwise.probes.needle import bundled_needles

    lm = headwise.load(str(tiny_dir))
    n = len(bundled_needles())
    cases = _cases(lm, "needle", EvalSettings(tasks=("needle",), depths=(0.5,), trials=2, seed=n - 1), 200)
    assert [c.needles[0] for _, c in cases] == [bundled_needles()[n - 1], bundled_needles()[0]]
