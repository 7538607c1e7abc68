"""Bad input to every command, as a hostile user would give it (issue 18): each case runs
`headwise.cli.main` in-process on a tiny model and must end with exit 2 and exactly one stderr line
`headwise: error: ...` (no traceback, nothing half-written), or succeed with a correct result.

A case is (id, argv built from the workspace, expected text of the error or a check of the result).
Cases marked `early` must be refused before the model loads (loading it fails the test).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from headwise import _io
from headwise.cli import main
from tests.conftest import tiny_model, tiny_tokenizer

PROFILE = ["--context", "96", "--text-sequences", "1", "--block-len", "8", "--repeated-sequences", "1",
           "--scores", "previous_token,sink,mean_distance"]


def swap_model(argv: list[str], w: W) -> list[str]:
    """The same command with the tiny image classifier as its --model."""
    argv[argv.index("--model") + 1] = str(w.root / "vit")
    return argv


def vit(w: W, *extra: str) -> list[str]:
    """Profile the tiny image classifier of the workspace."""
    return ["profile", "--model", str(w.root / "vit"), "--scores", "attention_distance", *extra,
            "--out", str(w.tmp / "p")]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two tiny models, a text, and an atlas directory (atlas, samples, report) profiled from the first."""
    root = tmp_path_factory.mktemp("bad-inputs")
    for name, seed in (("model", 0), ("other", 1)):
        tiny_model("llama-gqa", seed=seed).save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    from tests.conftest import tiny_vision_model

    tiny_vision_model("vit").save_pretrained(root / "vit")
    tiny_vision_model("vit").vit.save_pretrained(root / "vit-bare")  # the encoder alone: no classifier
    (root / "text.txt").write_text(" ".join(f"t{(i * 7) % 90}" for i in range(3000)))
    for name, model, context in (("atlas", "model", "96"), ("atlas-other", "other", "96"),
                                 ("atlas-ctx", "model", "80")):
        argv = ["profile", "--model", str(root / model), *PROFILE, "--text", str(root / "text.txt"),
                "--out", str(root / name)]
        argv[argv.index("--context") + 1] = context
        assert main(argv) == 0
    return root


@dataclass
class W:
    """A case's workspace: fresh copies of what it may damage."""

    root: Path
    tmp: Path
    monkeypatch: Any

    @property
    def model(self) -> str:
        return str(self.root / "model")

    @property
    def other(self) -> str:
        return str(self.root / "other")

    @property
    def text(self) -> str:
        return str(self.root / "text.txt")

    def atlas(self, source: str = "atlas") -> Path:
        """A copy of an atlas directory (atlas.json, samples, report, manifest)."""
        out = self.tmp / f"copy-{source}"
        if not out.exists():
            shutil.copytree(self.root / source, out)
        return out

    def edited(self, change: Callable[[dict], Any], name: str = "atlas.json") -> Path:
        """A copy of the atlas directory whose JSON file `name` was edited by `change` (manifest dropped,
        as after a hand edit of an older directory)."""
        out = self.atlas()
        doc = json.loads((out / name).read_text())
        change(doc)  # in place
        (out / name).write_text(json.dumps(doc))
        (out / _io.MANIFEST_FILE).unlink()
        return out

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def policy(self, change: Callable[[dict], Any] | None = None) -> str:
        """A head policy file saved by headwise, then edited."""
        from headwise.geometry import Geometry
        from headwise.kv import HeadPolicy

        g = Geometry.from_dict(json.loads((self.root / "atlas" / "atlas.json").read_text())["geometry"])
        path = HeadPolicy.random(g, 0.5, sink=4, window=16).save(self.tmp / "p.json")
        doc = json.loads(path.read_text())
        if change is not None:
            change(doc)  # in place
        path.write_text(json.dumps(doc))
        return str(path)

    def no_space(self) -> None:
        """A disk with 1 KiB free."""
        usage = namedtuple("usage", "total used free")(2**30, 2**30 - 1024, 1024)
        self.monkeypatch.setattr(_io.shutil, "disk_usage", lambda path: usage)

    def read_only(self, directory: Path) -> Path:
        """Writes into `directory` fail as on a read-only mount (root ignores permission bits)."""
        real = _io._probe

        def probe(d):
            if Path(d).resolve() == directory.resolve():
                raise PermissionError(13, "Permission denied")
            real(d)

        self.monkeypatch.setattr(_io, "_probe", probe)
        return directory


@dataclass
class Case:
    id: str
    argv: Callable[[W], list[str]]
    expect: str | Callable[[W], None]  # text of the one-line error, or a check of a successful run
    early: bool = False  # refused before the model loads


def setp(path: tuple, value: Any) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        target = doc
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = value
    return change


def gen(w: W, *extra: str, prompt: str = " ".join(f"t{i % 90}" for i in range(40))) -> list[str]:
    return ["generate", "--model", w.model, "--prompt-file", w.file("prompt.txt", prompt), "--max-new-tokens", "2",
            *extra]


def ev(w: W, *extra: str, out: str | None = None) -> list[str]:
    return ["eval", "--model", w.model, "--contexts", "100", "--depths", "0.5", "--trials", "1", "--sink", "4",
            "--window", "16", "--out", out or str(w.tmp / "e.json"), *extra]


def prof(w: W, *extra: str, out: str | None = None) -> list[str]:
    return ["profile", "--model", w.model, *PROFILE, "--text", w.text, "--out", out or str(w.tmp / "p"), *extra]


def attr(w: W, *extra: str, data: str | None = None) -> list[str]:
    data = data or w.file("d.jsonl", '{"prompt": "t5 t9 t5"}\n{"prompt": "t20 t21 t20"}\n')
    return ["attribute", "--model", w.model, "--data", data, *extra]


def val(w: W, *extra: str, atlas: Path | None = None, role: str = "previous-token", model: str | None = None
        ) -> list[str]:
    return ["validate", "--role", role, "--atlas", str(atlas or w.atlas()), "--model", model or w.model, *extra]


def prn(w: W, *extra: str, out: str | None = None, atlas: Path | None = None, model: str | None = None
        ) -> list[str]:
    return ["prune", "--model", model or w.model, "--atlas", str(atlas or w.atlas()), "--score", "sink",
            "--fraction", "0.5", "--out", out or str(w.tmp / "pruned"), *extra]


def pruned_dir(w: W, source: str = "model") -> str:
    """A model pruned from the workspace's model (or the other one, with its own atlas), in the case's copy."""
    out = w.tmp / f"pruned-{source}"
    if not out.exists():
        model, atlas = (w.model, w.atlas()) if source == "model" else (w.other, w.atlas("atlas-other"))
        assert main(prn(w, out=str(out), atlas=atlas, model=model)) == 0
    return str(out)


def cmp(w: W, *extra: str, pruned: list[str] | None = None, out: str | None = None) -> list[str]:
    return ["compare", "--model", w.model, "--pruned", *(pruned or [pruned_dir(w)]), "--tasks", "none",
            "--passkey-trials", "1", "--passkey-context", "100", "--heldout-windows", "2", "--heldout-context", "32",
            "--speed-repeats", "1", "--speed-prompt", "8", "--speed-new-tokens", "2",
            "--out", out or str(w.tmp / "c.json"), *extra]


# ---- checks of runs that must succeed ------------------------------------------------------------
def atlas_unit_at(path_of: Callable[[W], Path]) -> Callable[[W], None]:
    def check(w: W) -> None:
        from headwise import Atlas

        d = path_of(w)
        assert Atlas.load(d).score_names
        _io.verify_unit(d, ["atlas.json"])
    return check


def report_ok(w: W) -> None:
    d = w.atlas()
    page = (d / "report.html").read_text()
    assert "headwise-data" in page
    _io.verify_unit(d, ["atlas.json", "attention_samples.safetensors", "attention_samples.json", "report.html"])


def figures_in(path_of: Callable[[W], Path]) -> Callable[[W], None]:
    def check(w: W) -> None:
        d = path_of(w)
        assert sorted(p.name for p in d.glob("*.png")) == ["grid.png", "layer_trends.png", "pattern_map.png"]
        _io.verify_unit(d, ["grid.png", "layer_trends.png", "pattern_map.png"])
    return check


def pruned_ok(w: W) -> None:
    from transformers import AutoModelForCausalLM

    d = w.tmp / "pruned"
    record = json.loads((d / "headwise-pruned.json").read_text())
    assert record["score"] == "sink" and record["heads_per_layer"] == {"before": 4, "after": 2}
    assert AutoModelForCausalLM.from_pretrained(d, local_files_only=True).config.num_attention_heads == 2
    assert not [p for p in w.tmp.iterdir() if p.name.startswith(".")]  # no staging or older copy left


def replaced_ok(w: W) -> None:
    record = json.loads((w.tmp / "pruned-model" / "headwise-pruned.json").read_text())
    assert record["score"] == "random" and not [p for p in w.tmp.iterdir() if p.name.startswith(".")]


def compare_ok(w: W) -> None:
    doc = json.loads((w.tmp / "new" / "c.json").read_text())
    assert doc["complete"] and [m["name"] for m in doc["models"]] == ["base", "pruned-model"]
    assert doc["models"][0]["ratios"]["decode_tok_s"] == 1.0 and (w.tmp / "new" / "c.png").is_file()


def eval_ok(w: W, name: str = "e.json") -> None:
    from headwise.kv.evaluate import load_eval

    result = load_eval(w.tmp / "new" / "dir" / name)
    assert result["complete"] and result["cases"] == {"done": 1, "total": 1} and len(result["rows"]) == 2


def only_atlas(d: Path) -> None:
    """A profile without report: atlas.json alone, an older run's samples and report removed with it."""
    assert sorted(p.name for p in d.iterdir()) == ["atlas.json", _io.MANIFEST_FILE]
    atlas_unit_at(lambda w: d)(None)


def null_scores_validated(w: W) -> None:
    """Validating a role whose scores are all null stores NaN numbers: the atlas must still load and report."""
    from headwise import Atlas

    atlas = Atlas.load(w.atlas())
    assert atlas.data["validation"]["induction@k1"]["targeted_heads"][0][2] is None  # NaN, written as null
    assert main(["report", str(w.atlas())]) == 0
    report_ok(w)


def figures_of_the_unit(w: W, names=("grid.png", "layer_trends.png", "pattern_map.png")) -> None:
    """The default figures (ATLAS/figures) belong to the atlas's unit, beside its samples and report."""
    d = w.atlas()
    assert sorted(p.name for p in (d / "figures").iterdir()) == sorted(names)
    assert sorted(n for n in _io.read_manifest(d)["files"] if n.startswith("figures/")) == \
        sorted(f"figures/{n}" for n in names)
    _io.verify_unit(d, [f"figures/{n}" for n in names])
    report_ok(w)


def profiled_by_the_other_model(w: W) -> None:
    """A new atlas in a directory removes the figures of the old one (they showed the old atlas)."""
    from headwise import Atlas

    d = w.atlas()
    other = json.loads((w.root / "atlas-other" / "atlas.json").read_text())["model"]["weights_sha256"]
    assert not (d / "figures").exists() and Atlas.load(d).model["weights_sha256"] == other
    assert not any(n.startswith("figures/") for n in _io.read_manifest(d)["files"])
    report_ok(w)


NaN_ATLAS = '{"schema": "headwise.atlas/1", "x": NaN}'
DEEP = {"v": {}}
_d = DEEP["v"]
for _ in range(80):
    _d["x"] = {}
    _d = _d["x"]

CASES = [
    # ---- profile --------------------------------------------------------------------------------
    Case("profile unknown score", lambda w: prof(w, "--scores", "bogus"), "unknown score 'bogus'", early=True),
    Case("profile empty scores", lambda w: prof(w, "--scores", " , "), "--scores is empty", early=True),
    Case("profile probe shared by sink and streamable_mass too short",
         lambda w: ["profile", "--model", w.model, "--scores", "sink,streamable_mass", "--context", "256",
                    "--out", str(w.tmp / "p")], "streamable_mass needs a context longer than sink + window"),
    Case("profile context 0", lambda w: prof(w, "--context", "0"), "--context must be a positive integer",
         early=True),
    Case("profile context negative", lambda w: prof(w, "--context", "-5"), "--context must be a positive", early=True),
    Case("profile context not a number", lambda w: prof(w, "--context", "abc"), "invalid int value", early=True),
    Case("profile context beyond the model", lambda w: prof(w, "--context", "5000"), "longer than this model allows"),
    Case("profile window 0", lambda w: prof(w, "--window", "0"), "--window must be a positive integer", early=True),
    Case("profile chunk bytes too small", lambda w: prof(w, "--chunk-bytes", "10"), "at least 1024", early=True),
    Case("profile seed negative", lambda w: prof(w, "--seed", "-1"), "--seed", early=True),
    Case("profile duo lr nan", lambda w: prof(w, "--duo-lr", "nan"), "must be a finite number", early=True),
    Case("profile unknown grid", lambda w: prof(w, "--grid", "huge"), "invalid choice", early=True),
    Case("profile missing text file", lambda w: prof(w, "--text", str(w.tmp / "none.txt")), "none.txt"),
    Case("profile out is a file", lambda w: prof(w, out=w.file("f", "x")), "it is a file, not a directory",
         early=True),
    Case("profile out under a file", lambda w: prof(w, out=str(Path(w.file("f", "x")) / "sub")), "is a file",
         early=True),
    Case("profile out read-only", lambda w: prof(w, out=str(w.read_only(w.tmp / "ro"))), "is not writable",
         early=True),
    Case("profile disk full", lambda w: w.no_space() or prof(w), "not enough free space"),
    # ---- profile: images ------------------------------------------------------------------------
    Case("profile image score on a language model", lambda w: prof(w, "--scores", "attention_distance"),
         "cannot measure text models"),
    Case("profile importance_accuracy on a language model", lambda w: prof(w, "--scores", "importance_accuracy"),
         "importance_accuracy measures image classifiers"),
    Case("profile image count 0", lambda w: prof(w, "--image-count", "0"), "--image-count must be a positive",
         early=True),
    Case("profile images dir missing", lambda w: vit(w, "--images", str(w.tmp / "none")), "no such directory"),
    Case("profile images dir without images", lambda w: vit(w, "--images", str(w.tmp)), "holds no .png"),
    Case("profile unreadable image", lambda w: vit(w, "--images", str(Path(w.file("bad.png", "not a png")).parent)),
         "cannot read image"),
    Case("generate with an image model", lambda w: swap_model(gen(w), w), "headwise generate needs a language model"),
    Case("eval with an image model", lambda w: swap_model(ev(w), w), "headwise eval needs a language model"),
    Case("attribute with an image model", lambda w: swap_model(attr(w, "--name", "x", "--atlas", str(w.tmp / "a")), w),
         "headwise attribute needs a language model"),
    Case("profile importance of an encoder without a classifier",
         lambda w: ["profile", "--model", str(w.root / "vit-bare"), "--scores", "importance_accuracy",
                    "--out", str(w.tmp / "p")], "has no image classifier"),
    Case("validate important on a language-model atlas",
         lambda w: ["validate", "--atlas", str(w.atlas()), "--model", w.model, "--role", "important", "--k", "2"],
         "needs an image model"),
    Case("profile unknown model", lambda w: prof(w, out=str(w.tmp / "q")) + ["--model", str(w.tmp / "none")],
         "none"),
    Case("profile model with a corrupt config",
         lambda w: prof(w) + ["--model", str(Path(w.file("config.json", "{oops")).parent)], "config.json"),
    Case("profile refused leaves no directory", lambda w: prof(w, "--context", "5000", out=str(w.tmp / "a" / "b")),
         "longer than this model allows"),
    Case("profile missing parents are made", lambda w: prof(w, out=str(w.tmp / "new" / "dir")),
         atlas_unit_at(lambda w: w.tmp / "new" / "dir")),
    Case("profile no-report into an atlas dir drops its samples and report",
         lambda w: prof(w, "--no-report", out=str(w.atlas())), lambda w: only_atlas(w.atlas())),
    # ---- report ---------------------------------------------------------------------------------
    Case("report missing atlas", lambda w: ["report", str(w.tmp / "nothing")], "no atlas at", early=True),
    Case("report truncated atlas",
         lambda w: ["report", str(_truncate(w.atlas() / "atlas.json"))], "corrupt or truncated", early=True),
    Case("report binary atlas", lambda w: ["report", str(Path(w.file("atlas.json", b"\xff\xfe\x00")).parent)],
         "not UTF-8", early=True),
    Case("report atlas holding NaN", lambda w: ["report", str(Path(w.file("atlas.json", NaN_ATLAS)).parent)],
         "holds NaN", early=True),
    Case("report atlas null scores", lambda w: ["report", str(w.edited(setp(("scores",), None)))],
         "field scores must be an object (got null)", early=True),
    Case("report atlas null roles", lambda w: ["report", str(w.edited(setp(("roles",), None)))],
         "field roles must be an object (got null)", early=True),
    Case("report atlas non-string role label", lambda w: ["report", str(w.edited(
        setp(("roles", "labels", 0, 1), [3])))], "roles.labels[0][1][0] must be a string (got 3)", early=True),
    Case("report atlas zero KV heads", lambda w: ["report", str(w.edited(setp(("geometry", "n_kv_heads"), 0)))],
         "geometry.n_kv_heads must be >= 1", early=True),
    Case("report atlas wrong shape", lambda w: ["report", str(w.edited(
        lambda d: d["scores"]["sink"]["heads"].pop()))], "not a 3 x 4 matrix", early=True),
    Case("report atlas score cell mistyped", lambda w: ["report", str(w.edited(
        setp(("scores", "sink", "heads", 0, 0), "high")))], "must be a number or null", early=True),
    Case("report atlas without model spec", lambda w: ["report", str(w.edited(
        lambda d: d["model"].pop("spec")))], "field model.spec is missing", early=True),
    Case("report atlas nested too deeply", lambda w: ["report", str(w.edited(setp(("validation",), DEEP)))],
         "nested too deeply", early=True),
    Case("report samples of another model", lambda w: ["report", str(_swap_samples(w, "atlas-other"))],
         "another model", early=True),
    Case("report samples of other settings", lambda w: ["report", str(_swap_samples(w, "atlas-ctx"))],
         "other profile settings than its atlas (context 80 vs 96)", early=True),
    Case("report samples tensors of another run", lambda w: ["report", str(_swap_samples(
        w, "atlas-ctx", names=("attention_samples.safetensors",)))], "is not the file attention_samples.json "
                                                                       "describes", early=True),
    Case("report samples without binding", lambda w: ["report", str(w.edited(
        lambda d: d.pop("profile"), "attention_samples.json"))], "older headwise", early=True),
    Case("report samples meta mistyped", lambda w: ["report", str(w.edited(
        setp(("short", "tokens", 0), 5), "attention_samples.json"))], "short.tokens[0] must be a string",
         early=True),
    Case("report samples tokens of another length", lambda w: ["report", str(w.edited(
        lambda d: d["long"]["tokens"].pop(), "attention_samples.json"))], "tokens", early=True),
    Case("report samples half missing", lambda w: ["report", str(_unlink(w.atlas(),
                                                                        "attention_samples.safetensors"))],
         "has attention_samples.json but no attention_samples.safetensors", early=True),
    Case("report samples truncated", lambda w: ["report", str(_truncate(
        w.atlas() / "attention_samples.safetensors", keep=100).parent)], "unreadable", early=True),
    Case("report atlas edited after writing", lambda w: ["report", str(_append_space(w.atlas() / "atlas.json"))],
         "was changed after headwise wrote it", early=True),
    Case("report half-written unit", lambda w: ["report", str(_half_written(w.atlas()))], "half-written",
         early=True),
    Case("report read-only directory", lambda w: ["report", str(w.read_only(w.atlas()))], "is not writable",
         early=True),
    Case("report disk full", lambda w: w.no_space() or ["report", str(w.atlas())], "not enough free space",
         early=True),
    Case("report with another model", lambda w: ["report", str(w.atlas()), "--model", w.other],
         "profile this model first"),
    Case("report re-renders a good unit", lambda w: ["report", str(w.atlas())], report_ok),
    Case("report a lone atlas file", lambda w: ["report", str(_lone(w))], "report and plot work on an atlas "
                                                                           "directory", early=True),
    Case("report after a figure was deleted", lambda w: ["report", str(_plotted(w, delete="grid.png"))],
         lambda w: figures_of_the_unit(w, ("layer_trends.png", "pattern_map.png"))),
    Case("report after a figure plotted beside the atlas was deleted", lambda w: [
        "report", str(_plotted(w, delete="grid.png", out=""))], lambda w: [
            report_ok(w), _io.verify_unit(w.atlas(), ["layer_trends.png", "pattern_map.png"]),
            _refused(lambda: _io.verify_unit(w.atlas(), ["grid.png"]), "not one of the files last written")]),
    Case("report atlas score cell beyond float64", lambda w: ["report", str(w.edited(
        setp(("scores", "sink", "heads", 0, 0), 10**400)))], "must be a number or null within +-1.798e+308",
         early=True),
    Case("report atlas rule threshold beyond float64", lambda w: ["report", str(w.edited(
        setp(("roles", "rules", 0, "threshold"), -(10**400))))], "roles.rules[0].threshold must be a number within",
         early=True),
    Case("report atlas distance bins of three", lambda w: ["report", str(w.edited(
        lambda d: d["profiles"]["distance"]["bins"][1].append(9)))], "is not a [lo, hi] pair of token distances",
         early=True),
    Case("report atlas distance bins as strings", lambda w: ["report", str(w.edited(
        lambda d: d["profiles"]["distance"].update(bins=[str(b) for b in d["profiles"]["distance"]["bins"]])))],
         "profiles.distance.bins[0] must be a list (got '[0, 0]')", early=True),
    Case("report atlas distance profile without bins", lambda w: ["report", str(w.edited(
        lambda d: d["profiles"]["distance"].pop("bins")))], "field profiles.distance.bins is missing", early=True),
    Case("report atlas distance profile of records only", lambda w: ["report", str(w.edited(
        setp(("profiles", "distance"), {"records": [{"trial": 1}]})))], report_ok),
    Case("report samples row bins 0", lambda w: ["report", str(w.edited(
        setp(("long", "row_bins"), 0), "attention_samples.json"))], "long.row_bins must be >= 1 (got 0)",
         early=True),
    Case("report re-collects with its model", lambda w: ["report", str(w.atlas()), "--model", w.model], report_ok),
    # ---- plot -----------------------------------------------------------------------------------
    Case("plot out is a file", lambda w: ["plot", str(w.atlas()), "--out", w.file("f", "x")], "it is a file"),
    Case("plot unknown score", lambda w: ["plot", str(w.atlas()), "--score", "bogus"], "has no score 'bogus'"),
    Case("plot atlas without scores", lambda w: ["plot", str(w.edited(lambda d: d.update(
        scores={}, roles={"rules": [], "labels": []})))], "no scores to plot"),
    Case("plot samples of another model", lambda w: ["plot", str(_swap_samples(w, "atlas-other"))], "another model"),
    Case("plot corrupt atlas", lambda w: ["plot", str(_truncate(w.atlas() / "atlas.json"))], "corrupt or truncated"),
    Case("plot into new nested dir", lambda w: ["plot", str(w.atlas()), "--out", str(w.tmp / "f" / "g")],
         figures_in(lambda w: w.tmp / "f" / "g")),
    Case("plot into the atlas dir keeps its unit", lambda w: ["plot", str(w.atlas()), "--out", str(w.atlas())],
         lambda w: [check(w) for check in (figures_in(lambda w: w.atlas()), report_ok)]),
    Case("plot by default joins the atlas unit", lambda w: ["plot", str(w.atlas())], figures_of_the_unit),
    Case("plot into ATLAS/figures joins the atlas unit", lambda w: ["plot", str(w.atlas()), "--out",
                                                                    str(w.atlas() / "figures")], figures_of_the_unit),
    Case("plot a lone atlas file", lambda w: ["plot", str(_lone(w))], "report and plot work on an atlas directory",
         early=True),
    Case("plot atlas edited after writing", lambda w: ["plot", str(_append_space(w.atlas() / "atlas.json"))],
         "was changed after headwise wrote it", early=True),
    Case("plot atlas score cell beyond float64", lambda w: ["plot", str(w.edited(
        setp(("scores", "mean_distance", "heads", 2, 3), 10**400)))], "must be a number or null within", early=True),
    Case("plot atlas distance profile of records only", lambda w: ["plot", str(w.edited(
        setp(("profiles", "distance"), {"records": [{"trial": 1}]})))], figures_of_the_unit),
    Case("profile with another model over a plotted atlas drops its figures", lambda w: [
        "profile", "--model", w.other, *PROFILE, "--text", w.text, "--out", str(_plotted(w))],
         profiled_by_the_other_model),
    # ---- validate -------------------------------------------------------------------------------
    Case("validate missing atlas", lambda w: val(w, atlas=w.tmp / "none"), "no atlas at", early=True),
    Case("validate corrupt atlas", lambda w: val(w, atlas=_truncate(w.atlas() / "atlas.json")),
         "corrupt or truncated", early=True),
    Case("validate unknown role", lambda w: val(w, role="bogus"), "no validation task for role 'bogus'"),
    Case("validate too few draws", lambda w: val(w, "--draws", "3"), "--draws must be at least 5", early=True),
    Case("validate k 0", lambda w: val(w, "--k", "0"), "--k must be a positive", early=True),
    Case("validate k all heads", lambda w: val(w, "--k", "12"), "--k must be between 1 and 11"),
    Case("validate seed negative", lambda w: val(w, "--seed", "-1"), "--seed must be", early=True),
    Case("validate short retrieval context", lambda w: ["validate", "--role", "retrieval", "--atlas",
                                                        str(w.atlas()), "--context", "10"], "at least 64",
         early=True),
    Case("validate read-only atlas dir", lambda w: val(w, "--k", "1", atlas=w.read_only(w.atlas())),
         "is not writable", early=True),
    Case("validate with another model", lambda w: val(w, "--k", "1", model=w.other), "profile this model first"),
    Case("validate writes into the unit", lambda w: val(w, "--k", "1"), report_ok),
    Case("validate a role whose scores are all null", lambda w: val(w, "--k", "1", role="induction", atlas=w.edited(
        lambda d: d["scores"].update(induction=null_score(d)))), null_scores_validated),
    Case("validate a role beside a broken attribution", lambda w: val(w, "--k", "1", atlas=w.edited(
        attribution("copying", data=w.file("d.jsonl", '{"prompt": "t5 t9 t5"}\n'), metric=5))), report_ok),
    Case("validate a broken attribution", lambda w: val(w, role="copying", atlas=w.edited(
        attribution("copying", data=w.file("d.jsonl", '{"prompt": "t5 t9 t5"}\n'), metric=5))),
         "atlas.json: field scores.copying.settings.metric must be one of 'auto', 'kl', 'loss' (got 5)", early=True),
    Case("validate an attribution without data", lambda w: val(w, role="copying", atlas=w.edited(
        attribution("copying", metric="kl"))), "atlas.json: field scores.copying.settings.data is missing",
         early=True),
    Case("validate an attribution whose data is gone", lambda w: val(w, role="copying", atlas=w.edited(
        attribution("copying", data=str(w.tmp / "gone.jsonl"), metric="kl"))),
         "atlas.json: field scores.copying.settings.data names", early=True),
    Case("validate an attribution named like a role", lambda w: val(w, role="induction", atlas=w.edited(
        attribution("induction", data=w.file("d.jsonl", '{"prompt": "t5 t9 t5"}\n'), metric="kl"))),
         "atlas.json: field scores.induction.family is 'attribute', but 'induction' is a role with a validation task",
         early=True),
    # ---- attribute ------------------------------------------------------------------------------
    Case("attribute missing data", lambda w: attr(w, "--name", "x", data=str(w.tmp / "none.jsonl")),
         "data file not found", early=True),
    Case("attribute empty data", lambda w: attr(w, "--name", "x", data=w.file("e.jsonl", "")), "holds no examples",
         early=True),
    Case("attribute data not JSON", lambda w: attr(w, "--name", "x", data=w.file("b.jsonl", "{nope\n")), "line 1",
         early=True),
    Case("attribute data without prompt", lambda w: attr(w, "--name", "x", data=w.file("b.jsonl", '{"q": 1}\n')),
         'has no "prompt" string', early=True),
    Case("attribute bad name", lambda w: attr(w, "--name", "my name", "--atlas", str(w.tmp / "a")),
         "must be letters"),
    Case("attribute built-in name", lambda w: attr(w, "--name", "induction", "--atlas", str(w.tmp / "a")),
         "built-in score name"),
    Case("attribute name of a role", lambda w: attr(w, "--name", "previous-token", "--atlas", str(w.tmp / "a")),
         "'previous-token' is a role with a validation task of its own"),
    Case("attribute top negative", lambda w: attr(w, "--name", "x", "--top", "-1"), "--top must be", early=True),
    Case("attribute atlas path is a file", lambda w: attr(w, "--name", "x", "--atlas", w.file("f", "x")),
         "it is a file", early=True),
    Case("attribute atlas of another model", lambda w: attr(w, "--name", "x", "--atlas", str(w.atlas("atlas-other"))),
         "profile this model first"),
    Case("attribute corrupt atlas", lambda w: attr(w, "--name", "x", "--atlas",
                                                   str(_truncate(w.atlas() / "atlas.json").parent)),
         "corrupt or truncated"),
    Case("attribute loss without targets", lambda w: attr(w, "--name", "x", "--metric", "loss", "--atlas",
                                                          str(w.tmp / "a")), "needs a target"),
    Case("attribute into the unit", lambda w: attr(w, "--name", "copying", "--atlas", str(w.atlas())), report_ok),
    # ---- generate -------------------------------------------------------------------------------
    Case("generate empty prompt", lambda w: gen(w, prompt=" \n"), "is empty", early=True),
    Case("generate missing prompt file", lambda w: gen(w)[:4] + [str(w.tmp / "none.txt")] + gen(w)[5:],
         "cannot read prompt file", early=True),
    Case("generate max new tokens 0", lambda w: gen(w)[:-2] + ["--max-new-tokens", "0"], "--max-new-tokens",
         early=True),
    Case("generate prefill chunk 0", lambda w: gen(w, "--prefill-chunk", "0"), "--prefill-chunk", early=True),
    Case("generate empty policy", lambda w: gen(w, "--policy", " "), "empty policy spec"),
    Case("generate unknown policy", lambda w: gen(w, "--policy", "streamingXYZ"), "unknown policy 'streamingXYZ'"),
    Case("generate nan amount", lambda w: gen(w, "--policy", "streaming@nan"), "finite number"),
    Case("generate inf amount", lambda w: gen(w, "--policy", "random@inf"), "finite number"),
    Case("generate seed not a number", lambda w: gen(w, "--policy", "random@0.5:x"), "the seed 'x'"),
    Case("generate mid without number", lambda w: gen(w, "--policy", "streaming+whole+mid"), "+mid takes a number"),
    Case("generate unknown option", lambda w: gen(w, "--policy", "streaming+fast"), "unknown option '+fast'"),
    Case("generate streaming at 0", lambda w: gen(w, "--policy", "streaming@0"), "must be above 0"),
    Case("generate full with amount", lambda w: gen(w, "--policy", "full@0.5"), "full takes no argument"),
    Case("generate huge sink", lambda w: gen(w, "--sink", "100000000"), "--sink must be a whole number", early=True),
    Case("generate window beyond the model", lambda w: gen(w, "--window", "5000"), "--window must be a whole number"),
    Case("generate streaming window beyond the model", lambda w: gen(w, "--policy", "streaming@5000"),
         "up to 1024"),
    Case("generate snapkv beyond the model", lambda w: gen(w, "--policy", "snapkv@5000"), "up to 1024"),
    Case("generate headwise without atlas", lambda w: gen(w, "--policy", "headwise:sink@0.5"), "needs an atlas"),
    Case("generate corrupt policy file", lambda w: gen(w, "--policy", w.file("p.json", '{"schema": ')),
         "corrupt or truncated"),
    Case("generate policy zero KV heads", lambda w: gen(w, "--policy", w.policy(setp(("geometry", "n_kv_heads"), 0))),
         "geometry.n_kv_heads must be >= 1"),
    Case("generate policy wrong shape", lambda w: gen(w, "--policy", w.policy(lambda d: d["full"].pop())),
         "field full must have exactly 3 items"),
    Case("generate policy nan", lambda w: gen(w, "--policy", w.file("p.json", '{"schema": "x", "sink": NaN}')),
         "holds NaN"),
    Case("generate policy unknown kind", lambda w: gen(w, "--policy", w.policy(setp(("kind",), "magic"))),
         "not a known policy kind"),
    Case("generate policy of another geometry", lambda w: gen(w, "--policy", w.policy(lambda d: d.update(
        geometry={**d["geometry"], "head_dim": 8}))), "was built for"),
    Case("generate prompt too long", lambda w: gen(w, prompt=" ".join(["t5"] * 1100)), "exceed this model's 1024"),
    Case("generate chat without template", lambda w: gen(w, "--chat"), "no chat template"),
    Case("generate corrupt atlas", lambda w: gen(w, "--atlas", str(_truncate(w.atlas() / "atlas.json"))),
         "corrupt or truncated"),
    Case("generate works", lambda w: gen(w, "--policy", "streaming", "--sink", "4", "--window", "8"), lambda w: None),
    # ---- eval -----------------------------------------------------------------------------------
    Case("eval depth 2", lambda w: ev(w, "--depths", "2"), "--depths are fractions of the prompt in [0, 1], got 2",
         early=True),
    Case("eval depth nan", lambda w: ev(w, "--depths", "nan"), "--depths are fractions", early=True),
    Case("eval depth not a number", lambda w: ev(w, "--depths", "half"), "--depths takes comma-separated numbers",
         early=True),
    Case("eval trials 0", lambda w: ev(w, "--trials", "0"), "--trials must be a whole number >= 1", early=True),
    Case("eval unknown filler", lambda w: ev(w, "--fillers", "lorem"), "unknown filler(s) lorem", early=True),
    Case("eval unknown task", lambda w: ev(w, "--tasks", "nope"), "unknown task(s) nope", early=True),
    Case("eval context 0", lambda w: ev(w, "--contexts", "0"), "--contexts must be a whole number >= 1", early=True),
    Case("eval context not a number", lambda w: ev(w, "--contexts", "1k"), "comma-separated integers", early=True),
    Case("eval context beyond the model", lambda w: ev(w, "--contexts", "5000"), "longer than this model allows"),
    Case("eval speed context 0", lambda w: ev(w, "--tasks", "speed", "--speed-context", "0"), "--speed-context",
         early=True),
    Case("eval perplexity context 0", lambda w: ev(w, "--tasks", "perplexity", "--perplexity-context", "0"),
         "--perplexity-context", early=True),
    Case("eval window 0", lambda w: ev(w) + ["--window", "0"], "--window must be a whole number", early=True),
    Case("eval sink negative", lambda w: ev(w) + ["--sink", "-1"], "--sink must be a whole number", early=True),
    Case("eval seed negative", lambda w: ev(w, "--seed", "-1"), "--seed must be", early=True),
    Case("eval missing text", lambda w: ev(w, "--text", str(w.tmp / "none.txt")), "is not a file", early=True),
    Case("eval empty policies", lambda w: ev(w, "--policies", ","), "--policies is empty", early=True),
    Case("eval bad policy", lambda w: ev(w, "--policies", "streaming@nan"), "finite number"),
    Case("eval out is a directory", lambda w: ev(w, out=str(w.tmp)), "it is a directory", early=True),
    Case("eval out read-only", lambda w: ev(w, out=str(w.read_only(w.tmp / "ro") / "e.json")), "is not writable",
         early=True),
    Case("eval out names the plot", lambda w: ev(w, out=str(w.tmp / "e.png")), "names the plot's file", early=True),
    Case("eval refused leaves no directory", lambda w: ev(w, "--contexts", "5000", out=str(w.tmp / "x" / "e.json")),
         "longer than this model allows"),
    Case("eval missing parents are made", lambda w: ev(w, out=str(w.tmp / "new" / "dir" / "e.json")), eval_ok),
    Case("eval out name too long", lambda w: ev(w, out=str(w.tmp / ("\u4e2d" * 90 + ".json"))),
         "is 275 bytes long, and this file system allows 255", early=True),
    Case("eval out name long but allowed", lambda w: ev(w, out=str(w.tmp / "new" / "dir" / ("\u4e2d" * 80 + ".json"))),
         lambda w: eval_ok(w, "\u4e2d" * 80 + ".json")),
    Case("profile out name too long", lambda w: prof(w, out=str(w.tmp / ("a" * 300))), "is 300 bytes long",
         early=True),
    # ---- prune ----------------------------------------------------------------------------------
    Case("prune fraction 0", lambda w: prn(w, "--fraction", "0"), "--fraction must be between 0 and 1", early=True),
    Case("prune fraction nan", lambda w: prn(w, "--fraction", "nan"), "--fraction must be between 0 and 1",
         early=True),
    Case("prune fraction that rounds to no unit", lambda w: prn(w, "--fraction", "0.1"),
         "prunes none of the 2 KV groups per layer (it rounds to 0); this model can prune 1/2 (0.5)"),
    Case("prune fraction that rounds to every unit", lambda w: prn(w, "--fraction", "0.8"), "prunes every one"),
    Case("prune seed negative", lambda w: prn(w, "--seed", "-1"), "--seed must be", early=True),
    Case("prune unknown score", lambda w: prn(w, "--score", "bogus"), "no score 'bogus'"),
    Case("prune missing atlas", lambda w: prn(w, atlas=w.tmp / "none"), "no atlas at", early=True),
    Case("prune corrupt atlas", lambda w: prn(w, atlas=_truncate(w.atlas() / "atlas.json")), "corrupt or truncated",
         early=True),
    Case("prune atlas of another model", lambda w: prn(w, atlas=w.atlas("atlas-other")), "atlas was made for model"),
    Case("prune out is a file", lambda w: prn(w, out=w.file("f", "x")), "it is a file", early=True),
    Case("prune out holds other files", lambda w: prn(w, out=str(Path(w.file("notes.txt", "mine")).parent)),
         "not a pruned model headwise wrote", early=True),
    Case("prune out read-only", lambda w: prn(w, out=str(w.read_only(w.tmp / "ro"))), "is not writable", early=True),
    Case("prune works", lambda w: prn(w), pruned_ok),
    Case("prune replaces an older pruned model", lambda w: prn(w, "--score", "random", out=pruned_dir(w)),
         lambda w: replaced_ok(w)),
    # ---- compare --------------------------------------------------------------------------------
    Case("compare missing pruned dir", lambda w: cmp(w, pruned=[str(w.tmp / "none")]), "no such directory",
         early=True),
    Case("compare pruned dir that is no model", lambda w: cmp(w, pruned=[str(w.tmp)]), "is not a model directory",
         early=True),
    Case("compare pruned dir given twice", lambda w: cmp(w, pruned=[pruned_dir(w)] * 2), "is given twice",
         early=True),
    Case("compare pruned dir with a corrupt record", lambda w: cmp(w, pruned=[_spoil(pruned_dir(w))]),
         "headwise-pruned.json is unreadable or not JSON", early=True),
    Case("compare pruned dir of another model", lambda w: cmp(w, pruned=[pruned_dir(w, "other")]),
         "was pruned from another model"),
    Case("compare image model", lambda w: swap_model(cmp(w), w), "headwise compare needs a language model"),
    Case("compare limit 0", lambda w: cmp(w, "--limit", "0"), "--limit must be a whole number >= 1", early=True),
    Case("compare limit not a number", lambda w: cmp(w, "--limit", "all"), "invalid int value", early=True),
    Case("compare shots negative", lambda w: cmp(w, "--shots", "-1"), "--shots must be", early=True),
    Case("compare unknown task", lambda w: cmp(w, "--tasks", "nope"), "unknown task 'nope'", early=True),
    Case("compare empty tasks", lambda w: cmp(w, "--tasks", " , "), "--tasks is empty", early=True),
    Case("compare passkey context beyond the model", lambda w: cmp(w, "--passkey-context", "5000"),
         "longer than this model allows"),
    Case("compare out is a directory", lambda w: cmp(w, out=str(w.tmp)), "it is a directory", early=True),
    Case("compare out read-only", lambda w: cmp(w, out=str(w.read_only(w.tmp / "ro") / "c.json")),
         "is not writable", early=True),
    Case("compare out names the plot", lambda w: cmp(w, "--plot", str(w.tmp / "c.json")), "names the plot's file",
         early=True),
    Case("compare missing parents are made", lambda w: cmp(w, out=str(w.tmp / "new" / "c.json")), compare_ok),
    # ---- any command --------------------------------------------------------------------------
    Case("unknown flag", lambda w: ["report", str(w.atlas()), "--bogus"], "unrecognized arguments: --bogus",
         early=True),
    Case("threads 0", lambda w: ["--threads", "0", "report", str(w.atlas())], "--threads must be", early=True),
    Case("threads too many", lambda w: ["--threads", "999999", "report", str(w.atlas())],
         "--threads must be at most", early=True),
]
# Runs refused after the work started must still have left nothing behind.
LEAVES_NOTHING = {"profile probe shared by sink and streamable_mass too short": "p",
                  "profile refused leaves no directory": "a", "eval refused leaves no directory": "x"}


def null_score(doc: dict) -> dict:
    """A score entry whose every cell is null (not measured), shaped as the atlas's sink score."""
    entry = json.loads(json.dumps(doc["scores"]["sink"]))
    for key in ("heads", "kv_max", "kv_mean"):
        entry[key] = [[None] * len(row) for row in entry[key]]
    return entry


def attribution(name: str, **settings: Any) -> Callable[[dict], None]:
    """Store an attribution entry `name` (family attribute) with these settings, shaped as the sink score."""
    def change(doc: dict) -> None:
        doc["scores"][name] = {**doc["scores"]["sink"], "family": "attribute", "probe": f"attribute:{name}",
                               "settings": settings}
    return change


def _lone(w: W) -> Path:
    """A lone atlas file, as Atlas.save, validate and attribute write one (a copy of the atlas)."""
    path = w.atlas() / "validated.json"
    shutil.copy(w.atlas() / "atlas.json", path)
    return path


def _plotted(w: W, delete: str | None = None, out: str = "figures") -> Path:
    """The atlas directory after `headwise plot --out ATLAS/out` (default ATLAS/figures), a figure deleted by hand."""
    assert main(["plot", str(w.atlas()), "--out", str(w.atlas() / out)]) == 0
    if delete is not None:
        (w.atlas() / out / delete).unlink()
    return w.atlas()


def _refused(call: Callable[[], Any], expected: str) -> None:
    from headwise.errors import HeadwiseError

    with pytest.raises(HeadwiseError, match=expected):
        call()


def _spoil(directory: str) -> str:
    """A pruned model directory whose headwise-pruned.json was cut short."""
    record = Path(directory) / "headwise-pruned.json"
    record.write_text(record.read_text()[:50])
    return directory


def _truncate(path: Path, keep: int = 300) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _unlink(directory: Path, name: str) -> Path:
    (directory / name).unlink()
    return directory


def _append_space(path: Path) -> Path:
    path.write_text(path.read_text() + " ")
    return path.parent


def _half_written(directory: Path) -> Path:
    manifest = json.loads((directory / _io.MANIFEST_FILE).read_text())
    (directory / _io.MANIFEST_FILE).write_text(json.dumps({**manifest, "complete": False}))
    return directory


def _swap_samples(w: W, source: str, names: tuple[str, ...] = ("attention_samples.safetensors",
                                                               "attention_samples.json")) -> Path:
    """The atlas directory with (some of) the samples files of another atlas directory copied in."""
    d = w.atlas()
    for name in names:
        shutil.copy(w.root / source / name, d / name)
    (d / _io.MANIFEST_FILE).unlink()  # as a directory from before manifests, or a copy by hand
    return d


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, base, tmp_path, monkeypatch, capsys):
    w = W(base, tmp_path, monkeypatch)
    argv = case.argv(w)
    capsys.readouterr()
    if case.early:
        def no_model(*a, **k):
            raise AssertionError("the model was loaded before the input was refused")
        monkeypatch.setattr(sys.modules["headwise.load"], "load", no_model)
    before = {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if isinstance(case.expect, str):
        lines = err.splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("headwise: error: "), err
        assert case.expect in lines[0], lines[0]
        if case.id in LEAVES_NOTHING:
            assert not (tmp_path / LEAVES_NOTHING[case.id]).exists()
    else:
        assert code == 0, err
        case.expect(w)
    assert {p: p.read_bytes() for p in base.rglob("*") if p.is_file()} == before  # cases work on copies


def test_the_table_covers_every_command():
    commands = {c.id.split()[0] for c in CASES}
    assert {"profile", "report", "plot", "validate", "attribute", "generate", "eval", "prune", "compare"} <= commands
    assert len(CASES) >= 60
