"""The atlas: every head's scores and roles for one model, saved as one JSON file.

Layout of atlas.json (schema "headwise.atlas/1"):
  model      spec, kind, path, weights_sha256, config_sha256
  geometry   layers, heads, KV heads, head dim, per-layer attention type and window
  settings   profile settings and seed; probes: each probe's own settings
  versions   headwise, torch, transformers, numpy, python
  scores     name -> {family, probe, description, settings, needs_full ("high", "low" or null: which
             end of the scale marks a head that needs the full KV cache), heads [L][H], kv_max/kv_mean [L][KV]}
  profiles   name -> {bins, values [L][H][bins], ...}  (e.g. the distance profile)
  roles      rules (the thresholds used) and labels [L][H] -> [role, ...]
  validation causal tests of the labels (written by `headwise validate`)
No timestamps: the same model, settings and seed give a byte-identical file. Checked on load
against its schema (headwise._schema.validate_atlas: types, shapes against the geometry, bounds),
so a damaged file fails there in one line, not later in the report, a plot or a KV policy.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ._io import check_output_file, staged_outputs, unit_version, write_text_atomic
from ._schema import ATLAS as SCHEMA
from ._schema import load_json_file, one_line, samples_meta_schema, validate_atlas, validate_json
from .errors import HeadwiseError
from .geometry import Geometry
from .roles import RoleRule, assign_roles

FILENAME = "atlas.json"
# What an atlas directory holds besides atlas.json (headwise.report writes them): the attention
# samples, bound to the atlas by its model and settings, and the views of the atlas, stale once it changes.
SAMPLES_FILES = ("attention_samples.safetensors", "attention_samples.json")
VIEW_FILES = ("report.html",)


# ---- where an atlas is -------------------------------------------------------------------------
def is_lone_file(path: str | Path) -> bool:
    """Whether `path` names a lone atlas file (any name ending in .json but atlas.json, as Atlas.save,
    `headwise validate` and `headwise attribute` write one) rather than an atlas directory DIR (or
    DIR/atlas.json), the unit of the atlas with its samples, report and figures."""
    path = Path(path)
    return path.suffix == ".json" and path.name != FILENAME and not _is(Path.is_dir, path)


def atlas_file(path: str | Path) -> Path:
    """The atlas file `path` names: a lone file itself, DIR/atlas.json for DIR or DIR/atlas.json."""
    path = Path(path)
    return path if is_lone_file(path) or (path.name == FILENAME and not _is(Path.is_dir, path)) else path / FILENAME


def _is(test: Callable[[Path], bool], path: Path) -> bool:
    try:
        return test(path)
    except OSError:  # e.g. a name too long to look up: nothing is there
        return False


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("headwise", "torch", "transformers", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _num(x: float) -> float | None:
    x = float(x)
    return None if not math.isfinite(x) else float(f"{x:.6g}")


def _matrix(a: np.ndarray) -> list:
    a = np.asarray(a, dtype=float)
    if a.ndim == 0:
        return _num(a)  # type: ignore[return-value]
    return [_matrix(row) for row in a]


def _dumps(obj: Any, indent: int = 0) -> str:
    """JSON with dicts indented and lists of numbers kept on one line (readable diffs, small files)."""
    pad = " " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f'{pad} {json.dumps(str(k))}: {_dumps(v, indent + 1)}' for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, list) and obj and all(isinstance(x, list) for x in obj):
        return "[\n" + ",\n".join(f"{pad} {_dumps(x, indent + 1)}" for x in obj) + f"\n{pad}]"
    return json.dumps(_finite(obj), ensure_ascii=False, allow_nan=False)


def _finite(obj: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers (a validation of a NaN score stores one)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(x) for x in obj]
    return obj


# ---- the attention samples beside an atlas (written by headwise.report; read here for Atlas.save) ----
BOUND_SETTINGS = ("context", "seed", "text", "block_len", "window")  # the profile settings the samples depend on
# An image model's samples are the first images of its image probe: they depend on these instead (a text
# atlas's binding stays as it was, so samples written before images existed still belong to their atlas).
IMAGE_BOUND_SETTINGS = ("seed", "images", "image_count")
MAX_TENSOR_BYTES = 2**30


def bound_names(modality: str | None = None) -> tuple[str, ...]:
    """The profile settings the samples of a kind of model ("text" or "image") depend on; None: those of
    either kind (binding_problem compares only the ones of its atlas's kind)."""
    if modality is None:
        return tuple(dict.fromkeys(BOUND_SETTINGS + IMAGE_BOUND_SETTINGS))
    return IMAGE_BOUND_SETTINGS if modality == "image" else BOUND_SETTINGS


def bound_settings(values: Any, modality: str | None = None) -> dict[str, Any]:
    """The settings the samples of a kind of model depend on (bound_names), from ProfileSettings or an
    atlas's settings record (defaults filled in, as ProfileSettings.from_dict fills them)."""
    from .scores import all_settings

    known = all_settings()
    out = {k: values[k] if k in values else known[k].default if k in known else None for k in bound_names(modality)}
    if "text" in out:
        out["text"] = "bundled" if out["text"] is None else out["text"]
    return out


def recollect(directory: Any) -> str:
    return f"re-collect them: headwise report {directory} --model MODEL"


def binding_problem(atlas_data: dict[str, Any], meta: dict[str, Any]) -> str | None:
    """Why samples with metadata `meta` do not belong to the atlas `atlas_data` (None: they do)."""
    made_for, atlas_for = meta["model"].get("weights_sha256"), atlas_data["model"].get("weights_sha256")
    if made_for != atlas_for:
        return f"were made with another model than its atlas (weights {str(made_for)[:12]} vs {str(atlas_for)[:12]})"
    if Geometry.from_dict(meta["geometry"]) != Geometry.from_dict(atlas_data["geometry"]):
        return "were made for another model geometry than its atlas"
    if "profile" not in meta or "tensors_sha256" not in meta:
        return "were collected by an older headwise that did not record which profile settings they belong to"
    modality = Geometry.from_dict(atlas_data["geometry"]).modality
    want, have = bound_settings(atlas_data.get("settings", {}), modality), meta["profile"]
    differ = [f"{k} {have.get(k)!r} vs {want[k]!r}" for k in bound_names(modality) if have.get(k) != want[k]]
    if differ:
        return f"were collected with other profile settings than its atlas ({', '.join(differ)})"
    return None


def read_samples_files(directory: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any], bytes, bytes] | None:
    """The attention samples in `directory`: (arrays, metadata, the .safetensors bytes, the .json bytes),
    checked to be readable and to describe each other (the metadata's schema, the tensors' sha256), or
    None when there are none. headwise.report.read_samples checks the arrays' shapes too."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    directory = Path(directory)
    tensors, meta_path = (directory / name for name in SAMPLES_FILES)
    if not tensors.exists() and not meta_path.exists():
        return None
    fix = recollect(directory)
    if not tensors.is_file() or not meta_path.is_file():
        present, absent = (tensors, meta_path) if tensors.is_file() else (meta_path, tensors)
        raise HeadwiseError(f"{directory} has {present.name} but no {absent.name}; {fix}")
    meta = load_json_file(meta_path, what="attention samples metadata", fix=fix)
    validate_json(meta, samples_meta_schema(), source=str(meta_path), fix=fix)
    try:
        if tensors.stat().st_size > MAX_TENSOR_BYTES:
            raise HeadwiseError(f"{tensors} is larger than {MAX_TENSOR_BYTES} bytes, too large for attention "
                                f"samples; {fix}")
        data = tensors.read_bytes()
        arrays = load(data)
        meta_bytes = meta_path.read_bytes()
    except (SafetensorError, ValueError, OSError) as e:
        raise HeadwiseError(one_line(f"attention samples in {directory} are unreadable ({e}); {fix}")) from None
    if "tensors_sha256" in meta and hashlib.sha256(data).hexdigest() != meta["tensors_sha256"]:
        raise HeadwiseError(f"{tensors} is not the file {meta_path.name} describes (its sha256 differs from the one "
                            f"recorded): the two come from different runs; {fix}")
    return arrays, meta, data, meta_bytes


def bound_samples(atlas_data: dict[str, Any], directory: str | Path,
                  read: Callable[[Path], Any] = read_samples_files) -> Any:
    """What `read` (read_samples_files or a stricter reader) returns for the samples in `directory` if
    they may stay beside the atlas `atlas_data`: readable, and of its model, geometry and profile
    settings. Otherwise None, with a note on stderr saying why they go (None too when there are none).
    The one rule of every command that writes a new atlas into a directory."""
    try:
        found = read(Path(directory))
        problem = binding_problem(atlas_data, found[1]) if found is not None else None
    except HeadwiseError as e:
        found, problem = None, str(e)
    if problem is not None:
        print(one_line(f"headwise: note: the attention samples in {directory} are removed: {problem}; "
                       f"{recollect(directory)}"), file=sys.stderr)
        return None
    return found


class Atlas:
    """A loaded or freshly profiled atlas. Scores come back as numpy [layers, heads] arrays."""

    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.geometry = Geometry.from_dict(data["geometry"])
        self.directory: Path | None = None  # where it was loaded from (the report finds its samples there)
        self.path: Path | None = None  # the file it was loaded from or last written to
        # The directory's unit when this atlas was read (_io.unit_version): a command that keeps this
        # atlas.json beside new files refuses to commit if another command committed since.
        self.unit_version: str | None = None
        # The role rules of the scores it holds, as they were when each score was set.
        self._rules = [RoleRule.from_dict(r) for r in data["roles"].get("rules", [])]

    # ---- building -------------------------------------------------------------------------
    @classmethod
    def new(cls, model: dict[str, Any], geometry: Geometry, settings: dict[str, Any]) -> Atlas:
        return cls({"schema": SCHEMA, "model": model, "geometry": geometry.to_dict(),
                    "settings": {**settings, "probes": {}}, "versions": versions(), "scores": {}, "profiles": {},
                    "roles": {"rules": [], "labels": []}, "validation": {}})

    def set_score(self, name: str, values: np.ndarray, *, family: str, probe: str | None, description: str,
                  settings: dict[str, Any] | None = None, needs_full: str | None = None,
                  rule: RoleRule | None = None) -> None:
        """Store a [layers, heads] score; `needs_full` says which end ("high"/"low") marks a head that
        needs the full KV cache, `rule` the role label it gives (both None when the score says nothing)."""
        if needs_full not in (None, "high", "low"):
            raise HeadwiseError(f"score '{name}': needs_full must be 'high', 'low' or None, not {needs_full!r}")
        values = np.asarray(values, dtype=float)
        g = self.geometry
        if values.shape != (g.n_layers, g.n_heads):
            raise HeadwiseError(f"score '{name}' has shape {values.shape}, expected ({g.n_layers}, {g.n_heads})")
        grouped = values.reshape(g.n_layers, g.n_kv_heads, g.group_size)
        self.data["scores"][name] = {
            "family": family, "probe": probe, "description": description, "settings": settings or {},
            "needs_full": needs_full, "heads": _matrix(values), "kv_max": _matrix(grouped.max(-1)),
            "kv_mean": _matrix(grouped.mean(-1)),
        }
        self._rules = [r for r in self._rules if r.score != name] + ([rule] if rule is not None else [])
        self._relabel()

    def set_profile(self, name: str, profile: dict[str, Any]) -> None:
        self.data["profiles"][name] = {k: (_matrix(v) if isinstance(v, np.ndarray) else v) for k, v in profile.items()}

    def set_probe(self, name: str, settings: dict[str, Any]) -> None:
        self.data["settings"]["probes"][name] = settings

    def set_validation(self, key: str, result: dict[str, Any]) -> None:
        """Store a causal test of a role label (headwise.validate) under e.g. "retrieval@k10"."""
        self.data["validation"][key] = result

    def _relabel(self) -> None:
        scores = {name: self.score(name) for name in self.score_names}
        # The rule that leads a head's labels comes first (stable: equal precedence keeps the order they came in).
        rules = sorted((r for r in self._rules if r.score in scores), key=lambda r: r.precedence)
        self.data["roles"] = {"rules": [r.to_dict() for r in rules],
                              "labels": assign_roles(scores, rules) if scores else []}

    # ---- reading --------------------------------------------------------------------------
    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def score_names(self) -> list[str]:
        return list(self.data["scores"])

    def score(self, name: str, aggregate: str = "heads") -> np.ndarray:
        """[layers, heads] (aggregate="heads") or [layers, kv_heads] ("kv_max", "kv_mean")."""
        if name not in self.data["scores"]:
            raise HeadwiseError(f"this atlas has no score '{name}' (it has: {', '.join(self.score_names) or 'none'}); "
                                f"run headwise profile --scores {name}")
        values = self.data["scores"][name][aggregate]
        return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)

    def needs_full(self, name: str) -> str | None:
        """"high" or "low": which end of the score marks a head that needs the full KV cache (None: not recorded)."""
        self.score(name)  # a one-line error for a score the atlas lacks
        value = self.data["scores"][name].get("needs_full")
        return value if value in ("high", "low") else None

    def profile(self, name: str) -> dict[str, Any]:
        if name not in self.data["profiles"]:
            raise HeadwiseError(f"this atlas has no '{name}' profile")
        return self.data["profiles"][name]

    def roles(self, layer: int, head: int) -> list[str]:
        labels = self.data["roles"]["labels"]
        return list(labels[layer][head]) if labels else []

    def heads_with_role(self, role: str) -> list[tuple[int, int]]:
        return [(layer, head) for layer, row in enumerate(self.data["roles"]["labels"])
                for head, roles in enumerate(row) if role in roles]

    def role_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.data["roles"]["labels"]:
            for roles in row:
                for role in roles:
                    counts[role] = counts.get(role, 0) + 1
        return counts

    def top(self, name: str, k: int = 5, largest: bool = True) -> list[tuple[int, int, float]]:
        values = self.score(name)
        flat = np.nan_to_num(values, nan=-np.inf if largest else np.inf).ravel()
        order = np.argsort(-flat if largest else flat, kind="stable")[:k]
        return [(int(i // values.shape[1]), int(i % values.shape[1]), float(values.flat[i])) for i in order]

    def check_model(self, model_info: Any, geometry: Geometry) -> None:
        """Refuse to apply this atlas to a model it was not made for."""
        if geometry != self.geometry:
            raise HeadwiseError(f"atlas geometry ({self.geometry.n_layers} layers x {self.geometry.n_heads} heads, "
                                f"{self.geometry.model_type}) does not match the model ({geometry.n_layers} x "
                                f"{geometry.n_heads}, {geometry.model_type}); profile this model first")
        if model_info.weights_sha256 != self.model.get("weights_sha256"):
            raise HeadwiseError(f"atlas was made for model '{self.model.get('spec')}' (weights "
                                f"{str(self.model.get('weights_sha256'))[:12]}), not '{model_info.spec}' (weights "
                                f"{model_info.weights_sha256[:12]}); profile this model first")

    # ---- files ----------------------------------------------------------------------------
    def to_json(self) -> str:
        return _dumps(self.data) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the atlas atomically; returns the file written.

        path DIR or DIR/atlas.json (an atlas directory): DIR/atlas.json, as one unit with the files beside
        it, by the rule headwise.report.write_unit follows for a new atlas, as far as this layer can:
        the attention samples stay if they still belong to this atlas (bound_samples: readable, of its
        model, geometry and profile settings), else they are removed with a note; report.html is removed
        (only the report can render the new one: `headwise report DIR`), and so are the figures and any
        other file of the old unit, which showed the old atlas. Any other name ending in .json: that file
        alone (is_lone_file).
        """
        target = atlas_file(path)
        if is_lone_file(target):
            check_output_file(target, what="the atlas")
            write_text_atomic(target, self.to_json())
            self.located_at(target)
            return target
        directory = target.parent
        samples = bound_samples(self.data, directory)
        with staged_outputs(directory, what="the atlas") as stage:
            stage.write_text(FILENAME, self.to_json())
            kept = dict(zip(SAMPLES_FILES, samples[2:])) if samples is not None else {}
            for name in SAMPLES_FILES:
                if name in kept:  # rewritten from the bytes checked, not kept: a stale manifest does not matter
                    stage.write_bytes(name, kept[name])
                else:
                    stage.remove(name)
            for name in {*stage.old_files(), *VIEW_FILES} - {FILENAME, *SAMPLES_FILES}:
                stage.remove(name)
        self.located_at(target)
        return target

    def located_at(self, path: Path) -> None:
        """Record that this atlas is now the file at `path` (loaded from it or written to it)."""
        self.path, self.directory = path, path.parent
        self.unit_version = None if is_lone_file(path) else unit_version(path.parent)

    @classmethod
    def load(cls, path: str | Path) -> Atlas:
        """Read and check an atlas (DIR, DIR/atlas.json or a lone file): any fault is one line naming the field
        (schema _schema.validate_atlas)."""
        path = atlas_file(path)
        if not _is(Path.is_file, path):
            raise HeadwiseError(f"no atlas at {path}; run `headwise profile --out {path.parent}` first")
        version = None if is_lone_file(path) else unit_version(path.parent)  # read before the atlas, not after
        fix = "re-run headwise profile"
        data = load_json_file(path, what="a headwise atlas", fix=fix)
        validate_atlas(data, source=str(path), fix=fix)
        atlas = cls(data)
        atlas.path, atlas.directory, atlas.unit_version = path, path.parent, version
        return atlas


__all__ = ["Atlas", "BOUND_SETTINGS", "FILENAME", "IMAGE_BOUND_SETTINGS", "SAMPLES_FILES", "SCHEMA", "VIEW_FILES",
           "atlas_file", "binding_problem", "bound_names", "bound_samples", "bound_settings", "is_lone_file",
           "read_samples_files", "recollect", "versions"]
