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

import json
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np

from ._io import check_output_file, staged_outputs, write_text_atomic
from ._schema import load_json_file, validate_atlas
from .errors import HeadwiseError
from .geometry import Geometry
from .roles import RoleRule, assign_roles

SCHEMA = "headwise.atlas/1"
FILENAME = "atlas.json"
# What an atlas directory holds besides atlas.json (headwise.report writes them): the attention
# samples, bound to the atlas by its model and settings, and the views of the atlas, stale once it changes.
SAMPLES_FILES = ("attention_samples.safetensors", "attention_samples.json")
VIEW_FILES = ("report.html",)


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
    return json.dumps(obj, ensure_ascii=False)


class Atlas:
    """A loaded or freshly profiled atlas. Scores come back as numpy [layers, heads] arrays."""

    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.geometry = Geometry.from_dict(data["geometry"])
        self.directory: Path | None = None  # where it was loaded from (the report finds its samples there)
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
        rules = [r for r in self._rules if r.score in scores]
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
        """Write DIR/atlas.json (path: DIR or DIR/atlas.json), atomically and as one unit with the files
        beside it: the attention samples stay (the report checks they belong to this atlas), views of
        the old atlas (report.html) are removed; `headwise report DIR` renders a new one
        (headwise.report.write_unit does both at once). Any other name ending in .json is written alone."""
        path = Path(path)
        if path.suffix == ".json" and path.name != FILENAME:
            check_output_file(path, what="the atlas")
            write_text_atomic(path, self.to_json())
            self.directory = path.parent
            return path
        directory = path.parent if path.suffix == ".json" else path
        with staged_outputs(directory, what="the atlas") as stage:
            stage.write_text(FILENAME, self.to_json())
            whole = all((directory / name).is_file() for name in SAMPLES_FILES)
            for name in SAMPLES_FILES:
                try:
                    stage.keep(name) if whole else stage.remove(name)
                except HeadwiseError:  # edited, or from an interrupted run: not to be trusted beside the atlas
                    stage.remove(name)
            for name in {*stage.old_files(), *VIEW_FILES} - {FILENAME, *SAMPLES_FILES}:
                stage.remove(name)
        self.directory = directory
        return directory / FILENAME

    @classmethod
    def load(cls, path: str | Path) -> Atlas:
        """Read and check an atlas: any fault is one line naming the field (schema _schema.validate_atlas)."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise HeadwiseError(f"no atlas at {path}; run `headwise profile --out {path.parent}` first")
        fix = "re-run headwise profile"
        data = load_json_file(path, what="a headwise atlas", fix=fix)
        validate_atlas(data, source=str(path), fix=fix)
        atlas = cls(data)
        atlas.directory = path.parent
        return atlas


__all__ = ["Atlas", "SCHEMA", "FILENAME", "SAMPLES_FILES", "VIEW_FILES", "versions"]
