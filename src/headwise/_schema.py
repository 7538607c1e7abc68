"""Check JSON documents on load, so a broken file fails with one line naming the field.

Schemas are plain JSON Schema (Draft 2020-12) dicts, read by the small checker below rather
than the jsonschema package: an atlas is mostly big number matrices, and checking those cell
by cell through a general validator costs ~10 us a number (seconds for a large model's atlas),
while the loop here tests a row of plain cells in one pass. It also lets the message say
"field scores.induction.heads[3][2] must be a number or null (got 'abc')" directly, and it
stops at the first error instead of collecting them all.

Keywords understood: type, const, enum, minLength, maxLength, minimum, maximum,
exclusiveMinimum, minItems, maxItems, items, properties, required, additionalProperties,
propertyNames (maxLength only), maxProperties, anyOf, if/then/else, description.
Two departures from the standard, both stricter: "number" refuses NaN, infinities and integers
too large for a float64 (10**400 is valid JSON, but every reader turns numbers into floats), and
"integer" refuses 1.0 (every size here is used as a count).

Every list, string and mapping a schema describes has a size bound, and the file itself has
one (load_json_file), so a hostile file cannot make a loader or the code after it spend
unbounded memory or time.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from .errors import HeadwiseError

# The schema ids: the "schema" field of each kind of file.
ATLAS = "headwise.atlas/1"
POLICY = "headwise.kv-policy/1"
EVAL = "headwise.kv-eval/1"
SAMPLES = "headwise.attention_samples/1"
MANIFEST_SCHEMA = "headwise.manifest/1"  # the id inside headwise-manifest.json (_io.MANIFEST_FILE)

# Bounds: generous for any real model and run, small enough that code looping over them is safe.
MAX_NAME = 256  # score, profile, role and key names
MAX_TEXT = 1 << 16  # descriptions, paths, policy specs, replies
MAX_ENTRIES = 4096  # entries of a mapping or of a list not tied to the geometry
MAX_LAYERS = MAX_HEADS = 1024
MAX_BINS = 1 << 16  # values per head in a profile (a 128 x 128 patch grid's relative-position map)
MAX_RECORDS = 1 << 20  # retrieval trial records, eval rows
MAX_TOKENS = 1 << 22  # tokens of a sample prompt
MAX_INT = 1 << 53  # token counts, windows, byte sizes (exact in a float)
MAX_FLOAT = sys.float_info.max  # a "number" is a finite float64

NUMBER = {"type": ["number", "null"]}  # a score cell; null = not measured


# ---- schema builders ---------------------------------------------------------------------------
def _str(max_len: int = MAX_NAME, *, null: bool = False) -> dict[str, Any]:
    return {"type": ["string", "null"] if null else "string", "maxLength": max_len}


def _int(lo: int = 0, hi: int = MAX_INT, *, null: bool = False) -> dict[str, Any]:
    return {"type": ["integer", "null"] if null else "integer", "minimum": lo, "maximum": hi}


def _list(items: dict[str, Any], n: int | None = None, *, max_items: int = MAX_ENTRIES) -> dict[str, Any]:
    """A list of `items`: exactly n of them when n is given."""
    bounds = {"minItems": n, "maxItems": n} if n is not None else {"maxItems": max_items}
    return {"type": "array", **bounds, "items": items}


def _matrix(rows: int, cols: int, cell: dict[str, Any]) -> dict[str, Any]:
    # The descriptions end a wrong size's message: "... (got 2), so it is not a 3 x 4 matrix".
    row = {**_list(cell, cols), "description": f"a row of a {rows} x {cols} matrix"}
    return {**_list(row, rows), "description": f"a {rows} x {cols} matrix"}


def _obj(props: dict[str, Any] | None = None, required: list[str] | tuple[str, ...] = (), *,
         values: dict[str, Any] | None = None) -> dict[str, Any]:
    """A mapping with known `props` (others allowed) or, with `values`, name -> value."""
    s: dict[str, Any] = {"type": "object", "maxProperties": MAX_ENTRIES, "propertyNames": {"maxLength": MAX_NAME}}
    if props:
        s["properties"] = props
    if required:
        s["required"] = list(required)
    if values is not None:
        s["additionalProperties"] = values
    return s


def model_schema() -> dict[str, Any]:
    """The model record of every output (load.ModelInfo)."""
    props = {"spec": _str(MAX_TEXT), "kind": _str(), "path": _str(MAX_TEXT, null=True),
             "weights_sha256": _str(), "config_sha256": _str()}
    # Files written before headwise recorded the dtype have none.
    return _obj({**props, "dtype": _str(null=True)}, list(props))


def geometry_schema(n_layers: int | None = None) -> dict[str, Any]:
    """geometry.Geometry.to_dict; with n_layers, the per-layer lists must have that length."""
    per_layer = {"minItems": n_layers, "maxItems": n_layers} if n_layers else {"minItems": 1, "maxItems": MAX_LAYERS}
    props = {
        "model_type": _str(), "n_layers": _int(1, MAX_LAYERS), "n_heads": _int(1, MAX_HEADS),
        "n_kv_heads": _int(1, MAX_HEADS), "head_dim": _int(1, 1 << 16),
        "layer_types": {"type": "array", **per_layer, "items": {"enum": ["full", "sliding"]}},
        "sliding_window": {"type": "array", **per_layer, "items": _int(1, null=True)},
        "max_positions": _int(1, null=True), "vocab_size": _int(0, 1 << 24),
        "patch_grid": {**_list(_int(1, 1 << 12), 2), "description": "[rows, columns] of an image model's patches"},
        "prefix_tokens": _int(0, 1 << 12), "suffix_tokens": _int(0, 1 << 12),
    }
    # Geometry.from_dict defaults max_positions; text geometries have no patch fields
    return _obj(props, [k for k in props if k not in ("max_positions", "patch_grid", "prefix_tokens",
                                                      "suffix_tokens")])  # Geometry.from_dict defaults max_positions


def _versions() -> dict[str, Any]:
    return _obj(values=_str())


def atlas_schema(n_layers: int, n_heads: int, n_kv_heads: int) -> dict[str, Any]:
    """atlas.json once its geometry is known (see validate_atlas for the two steps)."""
    L, H, KV = n_layers, n_heads, n_kv_heads
    score = _obj({"family": _str(), "probe": _str(null=True), "description": _str(MAX_TEXT), "settings": _obj(),
                  "needs_full": {"enum": ["high", "low", None]},  # optional: older atlases lack it
                  "heads": _matrix(L, H, NUMBER), "kv_max": _matrix(L, KV, NUMBER),
                  "kv_mean": _matrix(L, KV, NUMBER)},
                 ["family", "probe", "description", "settings", "heads", "kv_max", "kv_mean"])
    def profile(bins: dict[str, Any]) -> dict[str, Any]:
        s = _obj({"values": _matrix(L, H, _list(NUMBER, max_items=MAX_BINS)), "bins": _list(bins, max_items=MAX_BINS),
                  "description": _str(MAX_TEXT), "probe": _str(), "records": _list(_obj(), max_items=MAX_RECORDS)})
        # Per-head profiles have values, one per bin (validate_atlas checks the counts); the retrieval
        # trials profile has records instead.
        s.update({"anyOf": [{"required": ["values"]}, {"required": ["records"]}],
                  "description": "an object with 'values' or 'records'",
                  "if": {"required": ["values"]}, "then": {"required": ["bins"]}})
        return s

    # The distance profile's bins are what the report and the pattern map read: token distances [lo, hi].
    pair = {**_list(_int(0), 2), "description": "a [lo, hi] pair of token distances"}
    profiles = _obj({"distance": profile(pair)}, values=profile({}))
    rule = _obj({"role": _str(), "score": _str(), "op": {"enum": [">", ">=", "<", "<="]},
                 "threshold": {"type": "number"}, "source": _str(MAX_TEXT)},
                ["role", "score", "op", "threshold", "source"])
    labels = {"type": "array", "anyOf": [{"maxItems": 0}, _matrix(L, H, _list(_str(), max_items=64))],
              "description": f"[] or a {L} x {H} matrix of lists of role names"}  # [] while there are no scores
    props = {
        "schema": {"const": ATLAS}, "model": model_schema(), "geometry": geometry_schema(L),
        "settings": _obj({"scores": _list(_str()), "probes": _obj()}), "versions": _versions(),
        "scores": _obj(values=score), "profiles": profiles,
        "roles": _obj({"rules": _list(rule), "labels": labels}, ["rules", "labels"]),
        "validation": _obj(values=_obj()),
    }
    return _obj(props, list(props))


def policy_schema(n_layers: int | None = None, n_kv_heads: int | None = None) -> dict[str, Any]:
    """A KV policy file; with the sizes, `full` must be n_layers x n_kv_heads (see validate_policy).

    `kind` is optional ("heads" when absent). Only head policies' own fields are checked here;
    other kinds (e.g. "snapkv") carry fields their policy class checks.
    """
    bit = {"enum": [0, 1]}
    full = _matrix(n_layers, n_kv_heads, bit) if n_layers and n_kv_heads else _list(
        _list(bit, max_items=MAX_HEADS), max_items=MAX_LAYERS)
    heads = {"properties": {"full": full, "sink": _int(0), "window": _int(1), "compensate": {"type": "boolean"},
                            "prefill": {"enum": ["window", "whole", "bounded", "tail"]}, "middle": _int(0),
                            "tail": _int(0), "early": _int(0), "stride": _int(0), "blocks": _int(0),
                            "quant": {"enum": [0, 2, 4, 8]}},
             # prefill, middle and source came later: Policy.from_dict has defaults for them
             "required": ["full", "sink", "window", "compensate"]}
    s = _obj({"schema": {"const": POLICY}, "kind": _str(), "name": _str(MAX_TEXT),
              "geometry": geometry_schema(n_layers), "source": _obj()}, ["schema", "name", "geometry"])
    s.update({"if": {"properties": {"kind": {"const": "heads"}}}, "then": heads, "else": {"required": ["source"]}})
    return s


def eval_schema() -> dict[str, Any]:
    """The result of `headwise eval` (kv/evaluate.py evaluate)."""
    row = _obj({"task": _str(), "context": _int(0), "policy": _str(MAX_TEXT), "correct": {"type": "boolean"},
                "kv_bytes": _int(0)}, ["task", "context", "policy", "correct", "kv_bytes"])
    share = {"type": "number", "minimum": 0, "maximum": 1}
    # summary: task -> context -> policy -> cell (kv/evaluate.py summarize), with the fields its readers use
    cell = _obj({"correct": _int(0), "n": _int(1), "kv_bytes": _int(0), "accuracy": share,
                 "kv_ratio": {"type": ["number", "null"], "minimum": 0}, "answer_logprob": NUMBER,
                 "key_recall": {**share, "type": ["number", "null"]},
                 "peak_rss_above_start_bytes": {"type": ["integer", "null"], "minimum": 0}},
                ["correct", "n", "kv_bytes", "accuracy", "kv_ratio"])
    props = {
        "schema": {"const": EVAL}, "model": model_schema(), "geometry": geometry_schema(), "settings": _obj(),
        "versions": _versions(), "policies": _obj(values=_obj()),
        "atlas": {**_obj({"path": _str(MAX_TEXT, null=True), "model": model_schema()}), "type": ["object", "null"]},
        "summary": _obj(values=_obj(values=_obj(values=cell))), "rows": _list(row, max_items=MAX_RECORDS),
        "perplexity": _obj(), "speed": _obj(), "seconds": {"type": "number", "minimum": 0},
        "complete": {"type": "boolean"},  # false: an interrupted run, written with the rows it had
    }
    return _obj(props, [k for k in props if k not in ("perplexity", "speed", "complete")])


def samples_meta_schema() -> dict[str, Any]:
    """attention_samples.json (report/samples.py collect_samples)."""
    tokens = _list(_str(MAX_TEXT), max_items=MAX_TOKENS)
    short = _obj({"probe": _str(MAX_TEXT), "block_len": _int(1), "prefix_len": _int(0), "length": _int(1),
                  "side": _int(1), "tokens": tokens}, ["length", "side", "tokens"])
    long = _obj({"probe": _str(MAX_TEXT), "length": _int(1), "side": _int(1), "row_bins": _int(1),
                 "regions": _list(_str(), max_items=16), "sink_tokens": _int(0), "window": _int(1),
                 "needle_span": _list(_int(0), 2), "region_queries": _int(0), "tokens": tokens,
                 "needle": _str(MAX_TEXT, null=True), "question": _str(MAX_TEXT, null=True)},
                ["length", "side", "row_bins", "regions", "window", "needle_span", "tokens"])
    # An image model's samples (report/samples.py sample_images): its first images instead of the two prompts.
    few = 64  # images of the samples (report.samples.SAMPLE_IMAGES is 4)
    classes = {**_list(_int(0), max_items=few), "type": ["array", "null"]}
    images = _obj({"probe": _str(MAX_TEXT), "count": _int(1, few), "tokens": _int(1, MAX_TOKENS),
                   "sources": _list(_str(MAX_TEXT), max_items=few), "labels": classes, "predictions": classes,
                   "class_names": _obj(values=_str(MAX_TEXT)), "prefix_names": _list(_str(), max_items=1 << 12),
                   "queries": _list(_int(0), max_items=MAX_TOKENS),
                   "query_grid": _list(_list(_int(0), max_items=1 << 12), 2), "thumbnail_side": _int(1, 4096),
                   "note": _str(MAX_TEXT)},
                  ["count", "tokens", "sources", "labels", "predictions", "prefix_names", "queries", "query_grid",
                   "thumbnail_side"])
    props = {"schema": {"const": SAMPLES}, "model": model_schema(), "geometry": geometry_schema(),
             "short": short, "long": long, "images": images}
    # What binds the samples to their atlas (optional here: older files lack them, and the report
    # refuses those with its own message): the sha256 of the .safetensors file they describe and
    # the profile settings they depend on.
    bound = {"tensors_sha256": {**_str(64), "minLength": 64}, "profile": _obj()}
    s = _obj({**props, **bound}, ["schema", "model", "geometry"])
    # A language model's samples hold the short and long prompts, an image model's the images.
    s.update({"if": {"required": ["images"]}, "else": {"required": ["short", "long"]}})
    return s


def manifest_schema() -> dict[str, Any]:
    """headwise-manifest.json: the files an output directory's last unit holds (_io.staged_outputs)."""
    entry = _obj({"sha256": {**_str(64), "minLength": 64}, "size": _int(0)}, ["sha256", "size"])
    return _obj({"schema": {"const": MANIFEST_SCHEMA}, "what": _str(MAX_TEXT), "files": _obj(values=entry),
                 "meta": _obj(), "complete": {"type": "boolean"}}, ["schema", "files"])


# ---- two-step checks: the geometry first, then the shapes it implies -----------------------------
def _geometry_first(doc: Any, schema_name: str, *, source: str, fix: str) -> dict[str, Any]:
    head = _obj({"schema": {"const": schema_name}, "geometry": geometry_schema()}, ["schema", "geometry"])
    validate_json(doc, head, source=source, fix=fix)
    g = doc["geometry"]
    # What a schema cannot say: the query heads split evenly over the KV heads, and a sliding layer has a window.
    if g["n_heads"] % g["n_kv_heads"]:
        raise _error(("geometry", "n_heads"), f"({g['n_heads']}) must be a multiple of geometry.n_kv_heads "
                                              f"({g['n_kv_heads']})", source, fix)
    for layer, (kind, window) in enumerate(zip(g["layer_types"], g["sliding_window"])):
        if kind == "sliding" and window is None:
            raise _error(("geometry", "sliding_window", layer), "must be the window of this sliding layer (got null)",
                         source, fix)
    return g


def validate_atlas(doc: Any, *, source: str, fix: str) -> None:
    """Check an atlas in two steps: its geometry, then every matrix against the geometry's sizes."""
    g = _geometry_first(doc, ATLAS, source=source, fix=fix)
    validate_json(doc, atlas_schema(g["n_layers"], g["n_heads"], g["n_kv_heads"]), source=source, fix=fix)
    for name, profile in doc["profiles"].items():  # every head's profile has one value per bin
        values = profile.get("values") or []
        want = len(profile.get("bins", ()))
        for layer, row in enumerate(values):
            for head, cell in enumerate(row):
                if len(cell) != want:
                    raise _error(("profiles", name, "values", layer, head),
                                 f"must have {want} values, one per bin (got {len(cell)})", source, fix)


def validate_policy(doc: Any, *, source: str, fix: str) -> None:
    """Check a KV policy file in two steps: its geometry, then its `full` matrix against the geometry."""
    g = _geometry_first(doc, POLICY, source=source, fix=fix)
    validate_json(doc, policy_schema(g["n_layers"], g["n_kv_heads"]), source=source, fix=fix)


# ---- the checker --------------------------------------------------------------------------------
class _Invalid(Exception):
    def __init__(self, path: tuple[str | int, ...], what: str):
        self.path, self.what = path, what


_PY_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
_TYPE_NAMES = {"object": "an object", "array": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "true or false", "null": "null"}


def _is(x: Any, t: str) -> bool:
    if t == "number":  # what a float64 holds: finite, and an integer no larger than the largest float
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return False
        return math.isfinite(x) if isinstance(x, float) else -MAX_FLOAT <= x <= MAX_FLOAT
    if t == "integer":
        return isinstance(x, int) and not isinstance(x, bool)
    return isinstance(x, _PY_TYPES[t])


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _show(x: Any) -> str:
    if isinstance(x, dict):
        return "an object"
    if isinstance(x, list):
        return f"a list of {len(x)} item{'' if len(x) == 1 else 's'}"
    text = "null" if x is None else ("true" if x else "false") if isinstance(x, bool) else repr(x)
    return text if len(text) <= 40 else text[:36] + "..." + text[-1]


_EXACT = {"object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,), "null": (type(None),),
          "integer": (int,), "number": (int, float)}


def _fast_type_test(s: dict[str, Any]) -> Any:
    """For a schema that only names types: a quick test for every item of a list (the matrix cells).
    Items it does not pass (wrong, or a subclass such as numpy's float64) get the full check."""
    if s.keys() != {"type"}:
        return None
    exact = frozenset(cls for t in (s["type"] if isinstance(s["type"], list) else [s["type"]]) for cls in _EXACT[t])
    # x - x is nan for nan and inf; an int passes only within a float64's range (a huge one gets the full check)
    return lambda x: type(x) in exact and (type(x) is not float or x - x == 0.0) and (
        type(x) is not int or -MAX_FLOAT <= x <= MAX_FLOAT)


def _check(x: Any, s: dict[str, Any], path: tuple[str | int, ...]) -> None:
    t = s.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        if not any(_is(x, one) for one in types):
            huge = "number" in types and isinstance(x, int) and not isinstance(x, bool)
            within = f" within +-{MAX_FLOAT:.4g}, the range of a float64" if huge else ""
            raise _Invalid(path, f"must be {' or '.join(_TYPE_NAMES[one] for one in types)}{within} (got {_show(x)})")
    if "const" in s and not _same(x, s["const"]):
        raise _Invalid(path, f"must be {_show(s['const'])} (got {_show(x)})")
    if "enum" in s and not any(_same(x, e) for e in s["enum"]):
        raise _Invalid(path, f"must be one of {', '.join(map(_show, s['enum']))} (got {_show(x)})")
    if isinstance(x, str):
        if len(x) > s.get("maxLength", len(x)):
            raise _Invalid(path, f"must be at most {s['maxLength']} characters long (got {len(x)})")
        if len(x) < s.get("minLength", 0):
            raise _Invalid(path, f"must be at least {s['minLength']} characters long (got {len(x)})")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        if "minimum" in s and x < s["minimum"]:
            raise _Invalid(path, f"must be >= {s['minimum']} (got {_show(x)})")
        if "exclusiveMinimum" in s and x <= s["exclusiveMinimum"]:
            raise _Invalid(path, f"must be > {s['exclusiveMinimum']} (got {_show(x)})")
        if "maximum" in s and x > s["maximum"]:
            raise _Invalid(path, f"must be <= {s['maximum']} (got {_show(x)})")
    elif isinstance(x, list):
        _check_list(x, s, path)
    elif isinstance(x, dict):
        _check_object(x, s, path)
    if "anyOf" in s:
        _check_any_of(x, s, path)
    if "if" in s:
        try:
            _check(x, s["if"], path)
            branch = s.get("then")
        except _Invalid:
            branch = s.get("else")
        if branch is not None:
            _check(x, branch, path)


def _check_list(x: list, s: dict[str, Any], path: tuple[str | int, ...]) -> None:
    lo, hi = s.get("minItems", 0), s.get("maxItems", len(x))
    if not lo <= len(x) <= hi:  # before the items: a huge list is refused without walking it
        need = f"exactly {lo}" if lo == hi else f"at least {lo}" if len(x) < lo else f"at most {hi}"
        shape = f", so it is not {s['description']}" if "description" in s and "anyOf" not in s else ""
        raise _Invalid(path, f"must have {need} items (got {len(x)}){shape}")
    item = s.get("items")
    if item is not None:
        fast = _fast_type_test(item)
        for i, v in enumerate(x):
            if fast is None or not fast(v):
                _check(v, item, (*path, i))


def _check_object(x: dict, s: dict[str, Any], path: tuple[str | int, ...]) -> None:
    if len(x) > s.get("maxProperties", len(x)):
        raise _Invalid(path, f"must have at most {s['maxProperties']} entries (got {len(x)})")
    longest = s.get("propertyNames", {}).get("maxLength")
    if longest is not None:
        for key in x:
            if len(key) > longest:
                raise _Invalid(path, f"has a name longer than {longest} characters ({_show(key)})")
    props = s.get("properties", {})
    for key in s.get("required", ()):
        if key not in x:
            raise _Invalid((*path, key), "is missing")
    for key, sub in props.items():  # in the schema's order, so the first error is the earliest section's
        if key in x:
            _check(x[key], sub, (*path, key))
    extra = s.get("additionalProperties")
    if extra is not None:
        for key, v in x.items():
            if key not in props:
                _check(v, extra, (*path, key))


def _check_any_of(x: Any, s: dict[str, Any], path: tuple[str | int, ...]) -> None:
    errors = []
    for branch in s["anyOf"]:
        try:
            return _check(x, branch, path)
        except _Invalid as e:
            errors.append(e)
    # The branch that got deepest into the document is the one the file meant; a tie gets the summary.
    depth = max(len(e.path) for e in errors)
    deepest = [e for e in errors if len(e.path) == depth]
    if len(deepest) == 1 or "description" not in s:
        raise deepest[0]
    raise _Invalid(path, f"must be {s['description']} (got {_show(x)})")


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_@:+-]{1,64}")


def _where(path: tuple[str | int, ...]) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _PLAIN_KEY.fullmatch(p):
            out += f".{p}" if out else p
        else:
            out += f"[{_show(p)}]"
    return out


def one_line(text: str) -> str:
    """A HeadwiseError message is one line, even when a path or a value in it holds a newline."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _error(path: tuple[str | int, ...], what: str, source: str, fix: str) -> HeadwiseError:
    where = f"field {_where(path)}" if path else "the document"
    return HeadwiseError(one_line(f"{source}: {where} {what}; {fix}"))


def validate_json(doc: Any, schema: dict[str, Any], *, source: str, fix: str) -> None:
    """Raise a one-line HeadwiseError naming the first field of `doc` that `schema` refuses."""
    try:
        _check(doc, schema, ())
    except _Invalid as e:
        raise _error(e.path, e.what, source, fix) from None


def _depth(doc: Any) -> int:
    """How deeply lists and objects nest in `doc` (without recursion: the point is to refuse deep files)."""
    deepest, level = 0, [doc]
    while level:
        deepest += 1
        level = [v for x in level for v in (x.values() if isinstance(x, dict) else x) if isinstance(v, (dict, list))]
    return deepest if isinstance(doc, (dict, list)) else 0


def load_json_file(path: str | Path, *, what: str, fix: str, max_bytes: int = 512 * 2**20, max_depth: int = 64) -> Any:
    """Parse a JSON file, or raise a one-line HeadwiseError saying why it cannot be read.

    Nesting is bounded too, so code that walks the document recursively (the report) cannot overflow."""
    path = Path(path)

    def fail(why: str) -> HeadwiseError:
        return HeadwiseError(one_line(f"{why}; {fix}"))

    if path.is_dir():
        raise fail(f"{path} is a directory, not {what}")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # read one byte more than allowed, not the whole of a huge file
    except FileNotFoundError:
        raise fail(f"no {what} at {path}") from None
    except OSError as e:
        raise fail(f"cannot read {what} {path} ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise fail(f"{path} is larger than {max_bytes} bytes, too large for {what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"{path} is not UTF-8 text (byte {e.start}), so not {what}") from None

    def refuse(name: str) -> None:  # json.loads would accept NaN and Infinity, which are not JSON
        raise _NotJSON(f"{path} holds {name}, which JSON does not allow (a missing number is written null)")

    try:
        doc = json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as e:
        raise fail(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): it is corrupt or "
                   f"truncated") from None
    except _NotJSON as e:
        raise fail(str(e)) from None
    except RecursionError:
        raise fail(f"{path} is nested too deeply to be {what}") from None
    except ValueError:  # Python refuses to parse integers of more than 4300 digits
        raise fail(f"{path} holds a number with too many digits") from None
    if _depth(doc) > max_depth:
        raise fail(f"{path} is nested too deeply to be {what} (more than {max_depth} levels)")
    return doc


class _NotJSON(ValueError):
    pass


__all__ = ["ATLAS", "EVAL", "MANIFEST_SCHEMA", "POLICY", "SAMPLES", "atlas_schema", "eval_schema", "geometry_schema",
           "load_json_file", "manifest_schema", "model_schema", "one_line", "policy_schema", "samples_meta_schema",
           "validate_atlas", "validate_json", "validate_policy"]
