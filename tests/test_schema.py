"""JSON checks on load: every broken document is refused with one line naming the field."""

import copy
import json

import pytest

from headwise import _schema as S
from headwise.errors import HeadwiseError

L, H, KV = 2, 4, 2
SOURCE, FIX = "x/atlas.json", "re-run headwise profile"
DELETE = object()


def geometry():
    return {"model_type": "llama", "n_layers": L, "n_heads": H, "n_kv_heads": KV, "head_dim": 16,
            "layer_types": ["full", "sliding"], "sliding_window": [None, 8], "max_positions": 1024, "vocab_size": 96}


def model():
    return {"spec": "tiny", "kind": "in-memory", "path": None, "weights_sha256": "ab" * 32, "config_sha256": "cd" * 32}


def atlas():
    grid = lambda cols: [[0.5, None, 1, 0.25][:cols] for _ in range(L)]
    return {
        "schema": "headwise.atlas/1", "model": model(), "geometry": geometry(),
        "settings": {"seed": 0, "scores": ["induction"], "probes": {"repeated": {"block_len": 10}}},
        "versions": {"python": "3.11", "torch": "2.13"},
        "scores": {"induction": {"family": "pattern", "probe": "repeated", "description": "d", "settings": {},
                                 "needs_full": "high", "heads": grid(H), "kv_max": grid(KV), "kv_mean": grid(KV)}},
        "profiles": {"distance": {"bins": [[0, 0], [1, 4], [5, 9]], "description": "d", "probe": "text",
                                  "values": [[[0.1, 0.2, None] for _ in range(H)] for _ in range(L)]},
                     "retrieval_trials": {"records": [{"depth": 0.5, "reply": "x"}]}},
        "roles": {"rules": [{"role": "induction", "score": "induction", "op": ">", "threshold": 0.4, "source": "s"}],
                  "labels": [[["induction"], [], [], ["induction", "sink"]] for _ in range(L)]},
        "validation": {"retrieval@k10": {"verdict": "confirmed"}},
    }


def policy(**changes):
    d = {"schema": "headwise.kv-policy/1", "name": "headwise:induction@0.5", "geometry": geometry(),
         "full": [[1, 0], [1, 1]], "sink": 64, "window": 256, "compensate": False, "prefill": "window", "middle": 0,
         "source": {"method": "atlas"}}
    return {**d, **changes}


def eval_result():
    row = {"task": "passkey", "context": 1024, "depth": 0.5, "policy": "full", "correct": True, "kv_bytes": 1000,
           "reply": "1234"}
    return {"schema": "headwise.kv-eval/1", "model": model(), "geometry": geometry(), "settings": {"trials": 2},
            "versions": {"python": "3.11"}, "policies": {"full": {"description": "full"}}, "atlas": None,
            "summary": {"passkey": {"1024": {"full": summary_cell()}}}, "rows": [row], "seconds": 1.5}


def summary_cell():
    """One cell of an eval summary as kv/evaluate.py summarize writes it."""
    return {"correct": 1, "n": 1, "kv_bytes": 1000, "accuracy": 1.0, "kv_ratio": 1.0, "answer_logprob": -0.25,
            "key_recall": None}


def samples_meta():
    return {"schema": "headwise.attention_samples/1", "model": model(), "geometry": geometry(),
            "short": {"probe": "repeated random tokens", "block_len": 4, "length": 9, "side": 9,
                      "tokens": ["<bos>"] + ["t1"] * 8},
            "long": {"probe": "needle in a haystack", "length": 3, "side": 3, "row_bins": 3,
                     "regions": ["sink", "needle", "recent", "other"], "sink_tokens": 4, "window": 256,
                     "needle_span": [1, 2], "region_queries": 1, "tokens": ["a", "b", "c"], "needle": "n",
                     "question": "q"}}


def changed(doc, path, value):
    """A deep copy of doc with the field at path set to value (or deleted)."""
    doc = copy.deepcopy(doc)
    *parents, last = path
    target = doc
    for p in parents:
        target = target[p]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return doc


def refused(check, doc, expected):
    with pytest.raises(HeadwiseError) as e:
        check(doc, source=SOURCE, fix=FIX)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(SOURCE + ": ") and msg.endswith("; " + FIX), msg
    assert expected in msg, msg
    return msg


ATLAS_CASES = [
    ((), None, "the document must be an object (got null)"),
    (("schema",), "headwise.atlas/0", "field schema must be 'headwise.atlas/1' (got 'headwise.atlas/0')"),
    (("schema",), DELETE, "field schema is missing"),
    (("model",), None, "field model must be an object (got null)"),
    (("model", "path"), 3, "field model.path must be a string or null (got 3)"),
    (("model", "spec"), "m" * 100_000, "field model.spec must be at most 65536 characters long (got 100000)"),
    (("geometry",), None, "field geometry must be an object (got null)"),
    (("geometry", "n_kv_heads"), 0, "field geometry.n_kv_heads must be >= 1 (got 0)"),
    (("geometry", "n_kv_heads"), 3, "field geometry.n_heads (4) must be a multiple of geometry.n_kv_heads (3)"),
    (("geometry", "n_layers"), "2", "field geometry.n_layers must be an integer (got '2')"),
    (("geometry", "n_layers"), 2.0, "field geometry.n_layers must be an integer (got 2.0)"),
    (("geometry", "layer_types"), ["full"], "field geometry.layer_types must have exactly 2 items (got 1)"),
    (("geometry", "layer_types", 1), "local", "field geometry.layer_types[1] must be one of 'full', 'sliding'"),
    (("geometry", "sliding_window", 1), None, "field geometry.sliding_window[1] must be the window of this sliding "
                                              "layer (got null)"),
    (("scores",), None, "field scores must be an object (got null)"),
    (("scores", "induction", "heads", 1, 2), "abc",
     "field scores.induction.heads[1][2] must be a number or null (got 'abc')"),
    (("scores", "induction", "heads", 0, 0), True, "field scores.induction.heads[0][0] must be a number or null "
                                                   "(got true)"),
    (("scores", "induction", "heads", 0, 3), float("nan"), "heads[0][3] must be a number or null (got nan)"),
    (("scores", "induction", "heads", 0, 3), [1.0], "heads[0][3] must be a number or null (got a list of 1 item)"),
    (("scores", "induction", "heads"), [[0.0] * H] * 3, "field scores.induction.heads must have exactly 2 items"),
    (("scores", "induction", "kv_max", 1), [0.5], "field scores.induction.kv_max[1] must have exactly 2 items (got 1)"),
    (("scores", "induction", "kv_mean"), DELETE, "field scores.induction.kv_mean is missing"),
    (("scores", "induction", "needs_full"), "sometimes", "field scores.induction.needs_full must be one of 'high', "
                                                         "'low', null (got 'sometimes')"),
    (("scores", "s" * 300), {}, "field scores has a name longer than 256 characters"),
    (("settings", "scores"), ["induction"] * 5000, "field settings.scores must have at most 4096 items (got 5000)"),
    (("versions", "torch"), 2, "field versions.torch must be a string (got 2)"),
    (("profiles",), DELETE, "field profiles is missing"),
    (("profiles", "distance"), {"bins": []}, "field profiles.distance must be an object with 'values' or 'records'"),
    (("profiles", "distance", "values", 1, 3), [0.1, 0.2], "field profiles.distance.values[1][3] must have 3 "
                                                           "values, one per bin (got 2)"),
    (("profiles", "retrieval_trials", "records", 0), "trial", "field profiles.retrieval_trials.records[0] must be "
                                                              "an object"),
    (("roles", "labels", 0, 1), [3], "field roles.labels[0][1][0] must be a string (got 3)"),
    (("roles", "labels"), [[[]] * H], "field roles.labels must be [] or a 2 x 4 matrix of lists of role names"),
    (("roles", "rules", 0, "op"), "=>", "field roles.rules[0].op must be one of '>', '>=', '<', '<=' (got '=>')"),
    (("roles", "rules", 0, "threshold"), "0.4", "field roles.rules[0].threshold must be a number (got '0.4')"),
    # numbers must fit a float64, everywhere (10**400 is valid JSON; every reader makes floats of them)
    (("scores", "induction", "heads", 0, 1), 10**400, "field scores.induction.heads[0][1] must be a number or null "
                                                      "within +-1.798e+308, the range of a float64 (got 1000"),
    (("scores", "induction", "kv_mean", 1, 0), -(10**309), "field scores.induction.kv_mean[1][0] must be a number"),
    (("roles", "rules", 0, "threshold"), 10**400, "field roles.rules[0].threshold must be a number within"),
    (("profiles", "distance", "values", 0, 0, 0), 10**400, "field profiles.distance.values[0][0][0] must be a number"),
    # profiles: values come with one bin each; the distance profile's bins are [lo, hi] token distances
    (("profiles", "distance", "bins"), DELETE, "field profiles.distance.bins is missing"),
    (("profiles", "distance", "bins", 1), "1-4", "field profiles.distance.bins[1] must be a list (got '1-4')"),
    (("profiles", "distance", "bins", 2), [5, 9, 12], "field profiles.distance.bins[2] must have exactly 2 items "
                                                      "(got 3), so it is not a [lo, hi] pair of token distances"),
    (("profiles", "distance", "bins", 0, 1), 0.5, "field profiles.distance.bins[0][1] must be an integer (got 0.5)"),
    (("profiles", "distance", "bins"), [[0, 0], [1, 4]], "field profiles.distance.values[0][0] must have 2 values, "
                                                         "one per bin (got 3)"),
    (("profiles", "successor_tasks"), {"values": [[[0.5]] * H] * L}, "field profiles.successor_tasks.bins is "
                                                                      "missing"),
    (("validation", "retrieval@k10"), 3, "field validation.retrieval@k10 must be an object (got 3)"),
]


@pytest.mark.parametrize("path, value, expected", ATLAS_CASES, ids=[c[2][:60] for c in ATLAS_CASES])
def test_broken_atlas_is_refused_naming_the_field(path, value, expected):
    doc = changed(atlas(), path, value) if path else value
    refused(S.validate_atlas, doc, expected)


def test_valid_atlases_are_accepted():
    S.validate_atlas(atlas(), source=SOURCE, fix=FIX)
    named_bins = changed(atlas(), ("profiles", "successor_tasks"), {"bins": ["a"], "values": [[[0.5]] * H] * L})
    S.validate_atlas(named_bins, source=SOURCE, fix=FIX)  # other profiles' bins are any names
    big = changed(changed(atlas(), ("scores", "induction", "heads", 0, 1), 10**308), ("roles", "rules", 0, "threshold"),
                  -1.5e308)
    S.validate_atlas(big, source=SOURCE, fix=FIX)  # large, but a float64
    old = changed(atlas(), ("scores", "induction", "needs_full"), DELETE)  # written before needs_full existed
    S.validate_atlas(old, source=SOURCE, fix=FIX)
    fresh = {**atlas(), "scores": {}, "profiles": {}, "roles": {"rules": [], "labels": []}}  # Atlas.new's
    S.validate_atlas(fresh, source=SOURCE, fix=FIX)
    S.validate_atlas(json.loads(json.dumps(atlas())), source=SOURCE, fix=FIX)


def test_what_atlas_writes_is_valid():
    import numpy as np

    from headwise.atlas import Atlas
    from headwise.geometry import Geometry

    a = Atlas.new(model(), Geometry.from_dict(geometry()), {"seed": 0, "scores": ["induction"]})
    a.set_score("induction", np.arange(L * H, dtype=float).reshape(L, H) / 10, family="pattern", probe="repeated",
                description="d")
    a.set_profile("distance", {"bins": [[0, 0], [1, 4]], "values": np.zeros((L, H, 2)), "probe": "text"})
    S.validate_atlas(json.loads(json.dumps(a.data)), source=SOURCE, fix=FIX)


def test_first_error_is_the_earliest_field():
    doc = changed(changed(atlas(), ("model",), None), ("roles",), None)
    refused(S.validate_atlas, doc, "field model must be")


POLICY_CASES = [
    (policy(schema="headwise.atlas/1"), "field schema must be 'headwise.kv-policy/1'"),
    (policy(full=[[1, 0], [1, 1], [0, 0]]), "field full must have exactly 2 items (got 3)"),
    (policy(full=[[1, 0, 1], [1, 1, 1]]), "field full[0] must have exactly 2 items (got 3)"),
    (policy(full=[[1, 2], [1, 1]]), "field full[0][1] must be one of 0, 1 (got 2)"),
    (policy(full=[[1, True], [1, 1]]), "field full[0][1] must be one of 0, 1 (got true)"),
    (policy(sink=-1), "field sink must be >= 0 (got -1)"),
    (policy(window=0), "field window must be >= 1 (got 0)"),
    (policy(compensate="yes"), "field compensate must be true or false (got 'yes')"),
    (policy(prefill="sometimes"),
     "field prefill must be one of 'window', 'whole', 'bounded', 'tail' (got 'sometimes')"),
    (policy(middle=-4), "field middle must be >= 0 (got -4)"),
    (changed(policy(), ("full",), DELETE), "field full is missing"),
    (changed(policy(kind="heads"), ("sink",), DELETE), "field sink is missing"),
    (changed(policy(kind="snapkv", budget=0.3), ("source",), DELETE), "field source is missing"),
    (policy(kind=3), "field kind must be a string (got 3)"),
    (changed(policy(), ("name",), DELETE), "field name is missing"),
    (changed(policy(), ("geometry", "n_kv_heads"), 0), "field geometry.n_kv_heads must be >= 1 (got 0)"),
    ([policy()], "the document must be an object (got a list of 1 item)"),
]


@pytest.mark.parametrize("doc, expected", POLICY_CASES, ids=[c[1][:60] for c in POLICY_CASES])
def test_broken_policy_is_refused_naming_the_field(doc, expected):
    refused(S.validate_policy, doc, expected)


def test_valid_policies_are_accepted():
    S.validate_policy(policy(), source=SOURCE, fix=FIX)
    S.validate_policy(policy(kind="heads"), source=SOURCE, fix=FIX)
    old = {k: v for k, v in policy().items() if k not in ("prefill", "middle", "source")}
    S.validate_policy(old, source=SOURCE, fix=FIX)
    snap = {k: v for k, v in policy().items() if k not in ("full", "sink", "window", "compensate", "prefill")}
    S.validate_policy({**snap, "kind": "snapkv", "budget": 0.3, "observation": 32, "kernel": 7}, source=SOURCE,
                      fix=FIX)  # the snapkv fields are its policy class's to check


EVAL_CASES = [
    (("rows", 0, "correct"), "yes", "field rows[0].correct must be true or false (got 'yes')"),
    (("rows", 0, "kv_bytes"), -1, "field rows[0].kv_bytes must be >= 0 (got -1)"),
    (("rows", 0, "task"), DELETE, "field rows[0].task is missing"),
    (("rows",), {}, "field rows must be a list (got an object)"),
    (("atlas",), 3, "field atlas must be an object or null (got 3)"),
    (("atlas",), {"path": "a", "model": None}, "field atlas.model must be an object (got null)"),
    (("complete",), "no", "field complete must be true or false (got 'no')"),
    (("seconds",), DELETE, "field seconds is missing"),
    (("summary", "passkey"), [], "field summary.passkey must be an object (got a list of 0 items)"),
    (("policies", "headwise:induction@0.5"), "p", "field policies['headwise:induction@0.5'] must be an object"),
    # the summary's cells, as plot() and the CLI read them
    (("summary", "passkey", "1024", "full", "kv_bytes"), DELETE, "field summary.passkey.1024.full.kv_bytes is missing"),
    (("summary", "passkey", "1024", "full", "accuracy"), "1", "field summary.passkey.1024.full.accuracy must be a "
                                                              "number (got '1')"),
    (("summary", "passkey", "1024", "full", "accuracy"), 2, "field summary.passkey.1024.full.accuracy must be <= 1"),
    (("summary", "passkey", "1024", "full", "kv_ratio"), DELETE, "field summary.passkey.1024.full.kv_ratio is "
                                                                 "missing"),
    (("summary", "passkey", "1024", "full", "kv_ratio"), "x", "kv_ratio must be a number or null (got 'x')"),
    (("summary", "passkey", "1024", "full", "n"), 0, "field summary.passkey.1024.full.n must be >= 1 (got 0)"),
    (("summary", "passkey", "1024", "full", "correct"), 1.0, "field summary.passkey.1024.full.correct must be an "
                                                             "integer (got 1.0)"),
    (("summary", "passkey", "1024", "full"), 3, "field summary.passkey.1024.full must be an object (got 3)"),
    (("summary", "passkey", "1024"), [], "field summary.passkey.1024 must be an object (got a list of 0 items)"),
    (("seconds",), 10**400, "field seconds must be a number within"),
]


@pytest.mark.parametrize("path, value, expected", EVAL_CASES, ids=[c[2][:60] for c in EVAL_CASES])
def test_broken_eval_is_refused_naming_the_field(path, value, expected):
    refused(lambda doc, **kw: S.validate_json(doc, S.eval_schema(), **kw), changed(eval_result(), path, value),
            expected)


def test_valid_eval_results_are_accepted():
    S.validate_json(eval_result(), S.eval_schema(), source=SOURCE, fix=FIX)
    no_full = changed(eval_result(), ("summary", "passkey", "1024", "full", "kv_ratio"), None)  # no full-cache run
    S.validate_json(no_full, S.eval_schema(), source=SOURCE, fix=FIX)
    interrupted = {**eval_result(), "complete": False, "atlas": {"path": "a", "model": model()}, "speed": {}}
    S.validate_json(interrupted, S.eval_schema(), source=SOURCE, fix=FIX)


SAMPLES_CASES = [
    (("long", "needle_span"), [1, 2, 3], "field long.needle_span must have exactly 2 items (got 3)"),
    (("short", "tokens", 0), 5, "field short.tokens[0] must be a string (got 5)"),
    (("long", "window"), 0, "field long.window must be >= 1 (got 0)"),
    (("short",), DELETE, "field short is missing"),
    (("schema",), "headwise.atlas/1", "field schema must be 'headwise.attention_samples/1'"),
    (("long", "row_bins"), 0, "field long.row_bins must be >= 1 (got 0)"),
    (("long", "side"), 0, "field long.side must be >= 1 (got 0)"),
]


@pytest.mark.parametrize("path, value, expected", SAMPLES_CASES, ids=[c[2][:60] for c in SAMPLES_CASES])
def test_broken_samples_meta_is_refused_naming_the_field(path, value, expected):
    refused(lambda doc, **kw: S.validate_json(doc, S.samples_meta_schema(), **kw),
            changed(samples_meta(), path, value), expected)
    S.validate_json(samples_meta(), S.samples_meta_schema(), source=SOURCE, fix=FIX)


KNOWN = {"type", "const", "enum", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "minItems",
         "maxItems", "items", "properties", "required", "additionalProperties", "propertyNames", "maxProperties",
         "anyOf", "if", "then", "else", "description"}


def test_schemas_use_only_keywords_the_checker_knows():
    """A misspelt keyword would be ignored silently, as JSON Schema ignores unknown keywords."""
    def walk(s):
        assert set(s) <= KNOWN, set(s) - KNOWN
        for key in ("items", "additionalProperties", "propertyNames", "if", "then", "else"):
            if key in s:
                walk(s[key])
        for sub in [*s.get("properties", {}).values(), *s.get("anyOf", [])]:
            walk(sub)

    for schema in (S.atlas_schema(L, H, KV), S.policy_schema(), S.policy_schema(L, KV), S.eval_schema(),
                   S.samples_meta_schema()):
        walk(schema)


# ---- reading the file ---------------------------------------------------------------------------
@pytest.mark.parametrize("content, expected", [
    (None, "no atlas at"),
    ("dir", "is a directory, not atlas"),
    (b"{" + b" " * 200, "larger than 100 bytes"),
    (b'{"a": "\xff"}', "is not UTF-8 text (byte 7)"),
    (b'{"a": [1, 2,\n', "is not valid JSON (Expecting value at line 2, column 1)"),
    (b'{"a": NaN}', "holds NaN, which JSON does not allow"),
    (b'{"a": [-Infinity]}', "holds -Infinity"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"1" * 5000, "holds a number with too many digits"),
])
def test_unreadable_json_files_are_refused_in_one_line(tmp_path, content, expected):
    path = tmp_path / "atlas.json"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    max_bytes = 100 if expected.startswith("larger") else 2**20
    with pytest.raises(HeadwiseError) as e:
        S.load_json_file(path, what="atlas", fix=FIX, max_bytes=max_bytes)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and expected in msg and msg.endswith(FIX), msg


def test_load_json_file_reads_valid_json(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(atlas()), encoding="utf-8")
    assert S.load_json_file(tmp_path / "a.json", what="atlas", fix=FIX) == atlas()


def test_messages_stay_on_one_line_when_a_name_holds_a_newline():
    doc = changed(atlas(), ("scores", "bad\nname"), 3)
    msg = refused(S.validate_atlas, doc, "must be an object (got 3)")
    assert "bad\\nname" in msg
