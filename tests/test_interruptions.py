"""Ctrl-C (and a hard crash) at every file write of every command that writes (issue 18).

Each scenario runs a command over the outputs of an earlier run. A hook counts the writes (a file
staged, a file written atomically, a rename) and, at the n-th, either sends the process a real
SIGINT, as Ctrl-C does, or raises there and then, as a crash would (no deferral). After Ctrl-C the
directory must hold the complete old outputs or the complete new ones, byte for byte, and the run
must end with one line and exit 130. After a crash it may hold neither, but `headwise report` must
then refuse it in one line or render a report whose files belong together, never pair two runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import types
from pathlib import Path

import pytest

from headwise import _io
from headwise import prune as prune_module
from headwise.cli import main
from headwise.kv import evaluate as kv_evaluate
from tests.conftest import tiny_model, tiny_tokenizer

PROFILE = ["--context", "96", "--text-sequences", "1", "--block-len", "8", "--repeated-sequences", "1",
           "--scores", "previous_token,sink"]
EVAL = ["--contexts", "100", "--depths", "0.5", "--sink", "4", "--window", "16", "--policies", "streaming"]
COMPARE = ["--tasks", "none", "--passkey-trials", "1", "--passkey-context", "100", "--heldout-context", "32",
           "--speed-repeats", "1", "--speed-prompt", "8", "--speed-new-tokens", "2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model, a text, and the old outputs each scenario starts from."""
    root = tmp_path_factory.mktemp("interruptions")
    tiny_model("llama-gqa").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "text.txt").write_text(" ".join(f"t{(i * 7) % 90}" for i in range(3000)))
    (root / "data.jsonl").write_text('{"prompt": "t5 t9 t5"}\n{"prompt": "t20 t21 t20"}\n')
    assert main(profile_argv(root, root / "old-full")) == 0
    assert main(profile_argv(root, root / "old-bare", "--no-report")) == 0
    (root / "old-eval").mkdir()
    assert main(["eval", "--model", str(root / "model"), *EVAL, "--trials", "1",
                 "--out", str(root / "old-eval" / "kv.json")]) == 0
    assert main(prune_argv(root, root / "old-pruned", "sink")) == 0
    (root / "old-compare").mkdir()
    assert main(compare_argv(root, root / "old-compare", "1")) == 0
    return root


def prune_argv(root: Path, out: Path, score: str) -> list[str]:
    return ["prune", "--model", str(root / "model"), "--atlas", str(root / "old-full"), "--score", score,
            "--fraction", "0.5", "--out", str(out)]


def compare_argv(root: Path, out: Path, windows: str) -> list[str]:
    return ["compare", "--model", str(root / "model"), "--pruned", str(root / "old-pruned"), *COMPARE,
            "--heldout-windows", windows, "--out", str(out / "c.json")]


def profile_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["profile", "--model", str(root / "model"), *PROFILE, "--text", str(root / "text.txt"), "--out", str(out),
            *extra]


# scenario -> (the old outputs it starts from, the command over them)
SCENARIOS = {
    "profile": ("old-full", lambda r, d: profile_argv(r, d, "--seed", "1")),
    "profile --no-report": ("old-full", lambda r, d: profile_argv(r, d, "--no-report", "--seed", "1")),
    "report --model": ("old-bare", lambda r, d: ["report", str(d), "--model", str(r / "model")]),
    "validate": ("old-full", lambda r, d: ["validate", "--role", "previous-token", "--k", "1", "--atlas", str(d),
                                           "--model", str(r / "model")]),
    "attribute": ("old-full", lambda r, d: ["attribute", "--model", str(r / "model"), "--data", str(r / "data.jsonl"),
                                            "--name", "copying", "--atlas", str(d)]),
    "plot": ("old-full", lambda r, d: ["plot", str(d)]),  # into d/figures, as part of the atlas's unit
    "eval": ("old-eval", lambda r, d: ["eval", "--model", str(r / "model"), *EVAL, "--trials", "2",
                                       "--out", str(d / "kv.json")]),
    "prune": ("old-pruned", lambda r, d: prune_argv(r, d, "random")),  # over an older pruned model: replaced whole
    "compare": ("old-compare", lambda r, d: compare_argv(r, d, "2")),
}
# The writes each scenario makes (staged files, atomic writes, renames): counted by test_write_counts.
WRITES = {"profile": 12, "profile --no-report": 6, "report --model": 10, "validate": 12, "attribute": 12,
          "plot": 10, "eval": 8, "prune": 2, "compare": 10}


class Hook:
    """Counts the writes; at write `at`, Ctrl-C (a real SIGINT) or a crash (KeyboardInterrupt raised in place)."""

    def __init__(self, monkeypatch, at: int | None, crash: bool = False):
        self.count, self.at, self.crash = 0, at, crash
        real_path, real_atomic, real_replace = _io.Stage.reserve, _io.write_bytes_atomic, os.replace

        def staged(stage, name):
            self.hit()
            return real_path(stage, name)

        def atomic(path, data):
            self.hit()
            return real_atomic(path, data)

        def replace(src, dst):
            self.hit()
            return real_replace(src, dst)

        monkeypatch.setattr(_io.Stage, "reserve", staged)
        monkeypatch.setattr(_io, "write_bytes_atomic", atomic)
        monkeypatch.setattr(kv_evaluate, "write_bytes_atomic", atomic)
        monkeypatch.setattr(_io, "os", types.SimpleNamespace(**{**vars(os), "replace": replace}))
        monkeypatch.setattr(prune_module, "os", types.SimpleNamespace(**{**vars(os), "replace": replace}))

    def hit(self) -> None:
        self.count += 1
        if self.count == self.at:
            if self.crash:
                raise KeyboardInterrupt  # no handler runs: like kill -9 or a power cut at this point
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: Python raises KeyboardInterrupt where it is not held off


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def run(base: Path, tmp: Path, scenario: str, monkeypatch, at: int | None, crash: bool = False):
    """(exit code, stderr, the directory afterwards, the old snapshot, the hook)."""
    source, argv = SCENARIOS[scenario]
    d = tmp / "out"
    shutil.copytree(base / source, d)
    old = snapshot(d)
    with monkeypatch.context() as m:
        hook = Hook(m, at, crash)
        code = main(argv(base, d))
    return code, d, old, hook


@pytest.fixture(scope="module")
def new_outputs(base, tmp_path_factory):
    """Each scenario's outputs when it is not interrupted."""
    out = {}
    for scenario in SCENARIOS:
        tmp = tmp_path_factory.mktemp("reference")
        code, d, _, _ = run(base, tmp, scenario, pytest.MonkeyPatch(), None)
        assert code == 0
        out[scenario] = snapshot(d)
    return out


def test_write_counts(base, tmp_path, monkeypatch):
    counts = {}
    for scenario in SCENARIOS:
        code, _, _, hook = run(base, tmp_path / scenario.replace(" ", "_"), scenario, monkeypatch, None)
        assert code == 0
        counts[scenario] = hook.count
    assert counts == WRITES


def check_report_afterwards(d: Path, capsys) -> None:
    """`headwise report` refuses in one line, or works and its files belong together."""
    from headwise.report.samples import binding_problem

    capsys.readouterr()
    code = main(["report", str(d)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("headwise: error: "), err
        return
    assert code == 0, err
    _io.verify_unit(d, ["atlas.json", "report.html"])
    meta_path = d / "attention_samples.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        tensors = (d / "attention_samples.safetensors").read_bytes()
        assert hashlib.sha256(tensors).hexdigest() == meta["tensors_sha256"]
        assert binding_problem(json.loads((d / "atlas.json").read_text()), meta) is None


def eval_rows(doc: dict) -> list[tuple]:
    return [(r["task"], r["context"], r["trial"], r["policy"], r["reply"], r["correct"], r["kv_bytes"])
            for r in doc["rows"]]


def check_eval(d: Path, old: dict[str, bytes], new: dict[str, bytes]) -> None:
    """Old results and plot; or this run's results so far (a prefix of the full run's), never beside the old plot."""
    now = snapshot(d)
    if now == old:
        return
    from headwise.kv.evaluate import load_eval

    doc = load_eval(d / "kv.json")
    full = json.loads(new["kv.json"])
    assert eval_rows(doc) == eval_rows(full)[:len(doc["rows"])]
    assert len(doc["rows"]) == 2 * doc["cases"]["done"]  # full and streaming per case
    assert doc["cases"]["total"] == 2 and (not doc["complete"] or doc["cases"]["done"] == 2)
    if "kv.png" in now:
        assert doc["complete"] and now["kv.png"] == new["kv.png"]


def check_compare(d: Path, old: dict[str, bytes], new: dict[str, bytes]) -> None:
    """Old results and plot; or this run's finished models (the full run's first ones), never beside the old plot."""
    now = snapshot(d)
    if now == old:
        return
    doc, full = json.loads(now["c.json"]), json.loads(new["c.json"])
    assert doc["models_done"] == len(doc["models"]) and (doc["complete"] or doc["speed"] is None or
                                                         doc["models_done"] == 2)
    for kept, reference in zip(doc["models"], full["models"], strict=False):  # deterministic except timings
        assert {k: kept[k] for k in ("name", "parameters", "perplexity", "in_context_loss", "passkey")} == \
            {k: reference[k] for k in ("name", "parameters", "perplexity", "in_context_loss", "passkey")}
    if "c.png" in now:
        assert doc["complete"] and now["c.png"][:4] == b"\x89PNG" and now["c.png"] != old["c.png"]


def check_pruned(d: Path) -> None:
    """Nothing staged beside the pruned model's directory (its build directory, the older copy)."""
    assert not [p.name for p in d.parent.iterdir() if p.name.startswith(f".{d.name}.")]


CASES = [(s, n) for s in SCENARIOS for n in range(1, WRITES[s] + 1)]


@pytest.mark.parametrize("scenario, at", CASES, ids=[f"{s}@{n}" for s, n in CASES])
def test_ctrl_c_at_each_write_leaves_old_or_new_outputs(scenario, at, base, new_outputs, tmp_path, monkeypatch,
                                                        capsys):
    capsys.readouterr()
    code, d, old, hook = run(base, tmp_path, scenario, monkeypatch, at)
    err = capsys.readouterr().err
    assert hook.count >= at and code == 130, (code, err)
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith("headwise: interrupted"), err
    assert not list(d.glob(".headwise-*")) and not list(d.glob(".*.tmp"))  # nothing staged or temporary left
    if scenario == "eval":
        check_eval(d, old, new_outputs[scenario])
        return
    if scenario == "compare":
        check_compare(d, old, new_outputs[scenario])
        return
    now = snapshot(d)
    assert now in (old, new_outputs[scenario]), sorted(now)
    if scenario == "prune":  # a model directory: no report to render
        check_pruned(d)
        return
    check_report_afterwards(d, capsys)


CRASHES = [(s, n) for s in SCENARIOS if s not in ("eval", "compare") for n in range(1, WRITES[s] + 1)]


@pytest.mark.parametrize("scenario, at", CRASHES, ids=[f"{s}@{n}" for s, n in CRASHES])
def test_a_crash_at_any_write_is_refused_or_whole_never_mixed(scenario, at, base, tmp_path, monkeypatch, capsys):
    code, d, old, _ = run(base, tmp_path, scenario, monkeypatch, at, crash=True)
    assert code == 130
    if scenario == "prune":  # a crash between the renames puts the older pruned model back
        assert snapshot(d) == old
        check_pruned(d)
        return
    check_report_afterwards(d, capsys)
