"""Build DIR/report.html: one self-contained page (inline JS and CSS, no network) over an atlas.

The data goes into a <script type="application/json"> element with '<', '>' and '&' written
as \\u003c, \\u003e and \\u0026, so no string in it (a token such as '</script>') can close the
element; the page's script reads it with JSON.parse and inserts every piece of text with
textContent, never as markup. Attention maps travel as base64 uint8 (sqrt-scaled per head).

An image model's page (geometry.patch_grid) swaps the text-only views (token maps, needle regions,
the KV-cache preview) for image ones: every head's attention over a sampled image from a query patch,
relative-position maps and strength-vs-distance curves, the pattern summary's layouts with each
group's maps, and the heads ranked by importance with their validation.
"""

from __future__ import annotations

import base64
import html
import json
import math
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from .._io import staged_outputs, verify_unit
from .._schema import one_line
from ..atlas import FILENAME, SAMPLES_FILES, VIEW_FILES, Atlas, atlas_file, bound_samples, is_lone_file
from ..errors import HeadwiseError
from ..scores import needs_full
from .layout import (
    PATTERN_LAYOUTS,
    distance_profile,
    pattern_layouts,
    pattern_map,
    relative_position_map,
    spatial_distance_profile,
)
from .samples import (
    SAMPLES_JSON,
    SAMPLES_TENSORS,
    binding_problem,
    load_samples,
    meta_text,
    read_samples,
    recollect,
)

REPORT_FILE = VIEW_FILES[0]  # report.html
UNIT_FILES = (FILENAME, *SAMPLES_FILES, REPORT_FILE)  # an atlas directory's files, written as one unit
_JSON_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def json_for_script(obj: Any) -> str:
    """JSON that is safe inside <script type="application/json">: no '<', '>' or '&' at all."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).translate(_JSON_ESCAPES)


def _asset(name: str) -> str:
    return files("headwise.report").joinpath("assets", name).read_text(encoding="utf-8")


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return None if not math.isfinite(v) else float(f"{v:.6g}")
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return _clean(v.item())
    return v


def _quantize(a: np.ndarray) -> dict[str, Any]:
    """uint8 of sqrt(a / per-head max), base64; the per-head max lets the page recover values."""
    a = np.nan_to_num(np.asarray(a, dtype=np.float64), nan=0.0).clip(min=0.0)
    lead = a.shape[:2]
    peak = a.reshape(*lead, -1).max(-1)
    scaled = np.sqrt(a / np.where(peak > 0, peak, 1.0).reshape(*lead, *([1] * (a.ndim - 2))))
    q = np.rint(scaled * 255).astype(np.uint8)
    return {"shape": list(a.shape), "max": [float(f"{v:.6g}") for v in peak.ravel()],
            "b64": base64.b64encode(q.tobytes()).decode("ascii")}


def _is_matrix(v: Any, L: int, H: int) -> bool:
    return (isinstance(v, list) and len(v) == L and all(isinstance(r, list) and len(r) == H for r in v)
            and all(x is None or isinstance(x, (int, float)) for r in v for x in r))


def _head_pairs(v: Any, L: int, H: int) -> list[list[int]] | None:
    """[[layer, head, ...], ...] (e.g. a validation's targeted heads) as [[layer, head], ...], else None."""
    if not isinstance(v, list) or not v:
        return None
    pairs = []
    for x in v:
        if not (isinstance(x, list) and len(x) >= 2 and all(isinstance(y, int) and not isinstance(y, bool)
                                                            for y in x[:2]) and 0 <= x[0] < L and 0 <= x[1] < H):
            return None
        pairs.append([x[0], x[1]])
    return pairs


def _validation(validation: Any, L: int, H: int) -> dict[str, Any]:
    """Any validation section, generically: per-head matrices, per-head records, lists of heads, verdicts,
    and the remaining model-level values."""
    matrices: dict[str, list] = {}
    records: list[dict[str, Any]] = []
    head_lists: dict[str, list] = {}
    summary: list[list[str]] = []

    def walk(v: Any, path: str, depth: int = 0) -> None:
        pairs = _head_pairs(v, L, H) if "head" in path.rsplit(".", 1)[-1] else None
        if depth > 16:  # deeper than any validation result: shown as text rather than walked
            if len(summary) < 300:
                summary.append([path, _short(v)])
        elif _is_matrix(v, L, H):
            matrices[path] = [x for r in v for x in r]
        elif pairs is not None:
            head_lists[path] = pairs
        elif isinstance(v, dict):
            if isinstance(v.get("layer"), int) and isinstance(v.get("head"), int):
                records.append({"path": path, "layer": v["layer"], "head": v["head"],
                                "fields": [[str(k), _short(x)] for k, x in v.items() if k not in ("layer", "head")]})
                return
            for k, x in v.items():
                walk(x, f"{path}.{k}" if path else str(k), depth + 1)
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                walk(x, f"{path}[{i}]", depth + 1)
        elif len(summary) < 300:
            summary.append([path, _short(v)])

    validation = validation if isinstance(validation, dict) else {}
    walk(validation, "")
    verdicts = [[str(name), entry["verdict"], entry.get("passes")] for name, entry in validation.items()
                if isinstance(entry, dict) and isinstance(entry.get("verdict"), str)]
    return {"matrices": _clean(matrices), "records": records, "head_lists": head_lists, "verdicts": verdicts,
            "summary": summary}


def _short(v: Any, limit: int = 160) -> str:
    text = v if isinstance(v, str) else json.dumps(_clean(v), ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def _flat_heads(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _images_payload(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, Any]:
    """An image model's samples: every head's rows per row max (layer-major heads, then images, then query
    rows: [L * H, images * queries, tokens]), the thumbnails as RGB bytes, and the metadata."""
    a = np.asarray(arrays["image_attention"], dtype=np.float64)  # [images, L, H, queries, tokens]
    n, L, H, Q, T = a.shape
    rows = a.transpose(1, 2, 0, 3, 4).reshape(L * H, n * Q, T)
    thumbnails = np.ascontiguousarray(arrays["thumbnails"], dtype=np.uint8)
    return {**meta["images"], "attention": _quantize(rows),
            "thumbnails": {"shape": list(thumbnails.shape), "b64": base64.b64encode(thumbnails.tobytes()).decode()}}


def _samples_payload(samples: tuple[dict, dict] | None) -> dict[str, Any] | None:
    if samples is None:
        return None
    arrays, meta = samples
    if "image_attention" in arrays and isinstance(meta.get("images"), dict):
        return _clean({"model": meta.get("model", {}), "images": _images_payload(arrays, meta)})
    short, long = dict(meta.get("short", {})), dict(meta.get("long", {}))
    out: dict[str, Any] = {"model": meta.get("model", {})}
    if "short_map" in arrays:
        out["short"] = {**short, "map": _quantize(arrays["short_map"])}
    if "long_map" in arrays:
        out["long"] = {**long, "map": _quantize(arrays["long_map"]),
                       # per head, layer-major: [L * H][regions]
                       "regions_mean": _clean(_flat_heads(arrays["long_regions_mean"]).round(5).tolist()),
                       "regions_last": _clean(_flat_heads(arrays["long_regions_last"]).round(5).tolist()),
                       "last_row": _quantize(arrays["long_last_row"])}
    return _clean(out)


def report_data(atlas_data: dict[str, Any], samples: tuple[dict, dict] | None) -> dict[str, Any]:
    """Everything the page shows, as plain JSON."""
    g = atlas_data["geometry"]
    L, H = int(g["n_layers"]), int(g["n_heads"])
    scores = [{"name": name, "description": e.get("description", ""), "family": e.get("family", ""),
               "probe": e.get("probe"), "needs_full": needs_full(name, e.get("needs_full")),
               "values": [x for row in e["heads"] for x in row]}
              for name, e in atlas_data.get("scores", {}).items()]
    # The image views (report.js) draw these profiles themselves; the detail lists any other profile's values.
    own = {"relative_position", *(name for name, _ in PATTERN_LAYOUTS)}
    profiles = {name: {"bins": p.get("bins"), "description": p.get("description", ""), "probe": p.get("probe"),
                       "values": [h for row in p["values"] for h in row]}
                for name, p in atlas_data.get("profiles", {}).items()
                if isinstance(p, dict) and isinstance(p.get("values"), list) and len(p["values"]) == L
                and all(isinstance(r, list) and len(r) == H for r in p["values"])
                and (name != "distance" or distance_profile(atlas_data) is not None)  # the page draws its bins
                and (name != "spatial_distance" or spatial_distance_profile(atlas_data) is not None)
                and name not in own}
    settings = {k: v for k, v in atlas_data.get("settings", {}).items() if k != "probes"}
    labels = atlas_data.get("roles", {}).get("labels") or [[[] for _ in range(H)] for _ in range(L)]
    model = atlas_data.get("model", {})
    return _clean({
        "model": {"spec": str(model.get("spec", "")), "kind": model.get("kind"),
                  "weights": str(model.get("weights_sha256") or "")[:12],
                  "dtype": str(model["dtype"]) if model.get("dtype") else None},
        "geometry": g, "settings": settings, "versions": atlas_data.get("versions", {}),
        "scores": scores, "profiles": profiles,
        "roles": {"rules": atlas_data.get("roles", {}).get("rules", []), "labels": [h for row in labels for h in row]},
        "validation": _validation(atlas_data.get("validation"), L, H),
        "samples": _samples_payload(samples), "layout": pattern_map(atlas_data, samples),
        "modality": "image" if g.get("patch_grid") is not None else "text",
        "pattern_layouts": [_layout_payload(x) for x in pattern_layouts(atlas_data)],
        "relative_position": _relative_position_payload(atlas_data),
        "importance": _importance(atlas_data, L, H),
    })


def _layout_payload(layout: dict[str, Any]) -> dict[str, Any]:
    """A pattern summary layout for the page: coordinates rounded as the report's own map's, group maps as
    uint8 (sqrt of the map over its max; the page shows their shape, hover gives the values)."""
    records = [{"group": r["group"], "heads": r["heads"], "side": r["side"],
                "decoded": _quantize(r["decoded"].clip(min=0)[None, None]),
                "mean_map": _quantize(r["mean_map"].clip(min=0)[None, None])} for r in layout["records"]]
    settings = layout["settings"]
    return {**layout, "x": [round(float(v), 5) for v in layout["x"]], "y": [round(float(v), 5) for v in layout["y"]],
            "records": records,
            "settings": {k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool)) or v is None}}


def _relative_position_payload(atlas_data: dict[str, Any]) -> dict[str, Any] | None:
    """Every head's relative-position map [L * H, 2R-1, 2C-1] as uint8 (sqrt per head; NaN cells as 0)."""
    maps = relative_position_map(atlas_data)
    if maps is None:
        return None
    p = atlas_data["profiles"]["relative_position"]
    return {"grid": atlas_data["geometry"]["patch_grid"], "description": str(p.get("description") or ""),
            "map": _quantize(maps.reshape(-1, 1, *maps.shape[2:]))}


def _importance(atlas_data: dict[str, Any], L: int, H: int) -> dict[str, Any] | None:
    """The heads ranked by importance_accuracy, and each validation of the "important" role
    (validate/__init__.py validate: the metric unablated, with the top-k heads zeroed, with random k)."""
    scores = atlas_data.get("scores", {})
    if "importance_accuracy" not in scores:
        return None
    checks = []
    for key, v in (atlas_data.get("validation") or {}).items():
        if not (str(key).startswith("important@") and isinstance(v, dict)):
            continue
        random = v.get("random") if isinstance(v.get("random"), list) else []
        checks.append({"key": str(key), "k": v.get("k"), "metric": _short(v.get("metric", "")),
                       "task": _short(v.get("task", "")), "higher_is_better": v.get("higher_is_better"),
                       "baseline": _number(v.get("baseline")), "targeted": _number(v.get("targeted")),
                       "random": [x for x in map(_number, random) if x is not None],
                       "passes": v.get("passes") if isinstance(v.get("passes"), bool) else None,
                       "verdict": _short(v.get("verdict", ""), 400),
                       "targeted_heads": _head_pairs(v.get("targeted_heads"), L, H) or []})
    names = [n for n in ("importance_accuracy", "importance_ablation", "importance_grad", "importance_norm")
             if n in scores]
    return {"score": "importance_accuracy", "columns": names, "validations": checks}


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def render_html(atlas_data: dict[str, Any], samples: tuple[dict, dict] | None = None) -> str:
    data = report_data(atlas_data, samples)
    title = f"headwise atlas: {data['model']['spec']}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title>\n<style>\n{_asset('report.css')}\n</style></head>\n"
        "<body>\n<div id=\"app\"><noscript>This report needs JavaScript.</noscript></div>\n"
        f"<script type=\"application/json\" id=\"headwise-data\">{json_for_script(data)}</script>\n"
        f"<script>\n{_asset('report.js')}\n</script>\n</body></html>\n"
    )


def matching_samples(atlas_data: dict[str, Any], directory: str | Path | None) -> tuple[dict, dict] | None:
    """The attention samples saved beside an atlas, refused (one line) unless they belong to it: written
    together with it (its manifest, where it has one), of its model and profile settings, and whole."""
    if directory is None:
        return None
    samples = load_samples(directory)
    if samples is not None:
        problem = binding_problem(atlas_data, samples[1])  # the most telling reason first
        if problem is not None:
            raise HeadwiseError(one_line(f"the attention samples in {directory} {problem}; {recollect(directory)}"))
        verify_unit(directory, [SAMPLES_TENSORS, SAMPLES_JSON])
    return samples


def atlas_directory(path: str | Path) -> Path:
    """The atlas directory `path` names (DIR or DIR/atlas.json). A lone atlas file is refused: a report,
    samples and figures belong to DIR/atlas.json, written as one unit with it."""
    if is_lone_file(path):
        raise HeadwiseError(f"headwise report and plot work on an atlas directory, and {path} is a lone atlas file; "
                            f"copy it into a directory of its own as atlas.json and run the command on that directory")
    return atlas_file(path).parent


def write_report(atlas_dir: str | Path) -> Path:
    """Write atlas_dir/report.html from atlas_dir/atlas.json and the attention samples beside it (refused
    unless they belong to the atlas), as one unit with them."""
    atlas = Atlas.load(atlas_directory(atlas_dir))
    verify_unit(atlas.directory, [FILENAME])
    write_unit(atlas.directory, atlas, keep_atlas=True, samples="keep", report=True, what="the report")
    return atlas.directory / REPORT_FILE


# ---- the atlas directory as one unit ---------------------------------------------------------
def unit_bytes(geometry: Any, n_scores: int, context: int, with_report: bool) -> int:
    """A generous estimate of an atlas directory's size, to refuse a too-full disk before profiling."""
    from .samples import LONG_SIDE, ROW_BINS, SHORT_SIDE, map_side

    heads = geometry.n_total_heads
    atlas = heads * (3 * n_scores + 16) * 14 + 2**20  # ~14 characters a number; the distance profile's 16 bins
    if getattr(geometry, "patch_grid", None) is not None:  # image models: relative-position maps in the atlas
        rows, cols = geometry.patch_grid
        atlas += heads * (2 * rows - 1) * (2 * cols - 1) * 14
    if not with_report:
        return atlas
    if getattr(geometry, "patch_grid", None) is not None:
        from .samples import IMAGE_BUDGET

        samples = 2 * IMAGE_BUDGET + 2**20  # float16 rows, thumbnails
        page = IMAGE_BUDGET * 4 // 3 + heads * (2 * rows - 1) * (2 * cols - 1) + atlas + 2**20
        return atlas + samples + page
    cells = map_side(geometry, SHORT_SIDE) ** 2 + map_side(geometry, LONG_SIDE) ** 2 + ROW_BINS
    samples = heads * (2 * cells + 32) + 64 * context
    page = heads * cells * 4 // 3 + atlas + samples // 4 + 2**20  # base64 uint8 maps, the data again, the assets
    return atlas + samples + page


def _samples_for(atlas: Atlas | None, directory: Path, samples: Any) -> tuple[tuple[dict, dict] | None, bytes, bytes]:
    """The samples the new unit holds: (arrays, meta) for the page, and the two files' bytes."""
    if isinstance(samples, tuple):  # new ones (sample_attention)
        from safetensors.numpy import load

        data, meta = samples
        if atlas is not None and (problem := binding_problem(atlas.data, meta)) is not None:
            raise HeadwiseError(f"the attention samples for {directory} {problem}; collect them with the atlas's "
                                f"model and settings")
        return (load(data), meta), data, meta_text(meta).encode("utf-8")
    if samples is None:
        return None, b"", b""
    if samples == "keep":  # the report's own reading: refused unless they belong (written together, bound)
        if atlas is not None:
            matching_samples(atlas.data, directory)
        found = read_samples(directory)
        return (found[:2], found[2], found[3]) if found is not None else (None, b"", b"")
    # "keep-if-bound": a new atlas keeps the samples that still belong to it (bound by model and
    # settings, whatever the manifest says: they are rewritten from the bytes checked) and drops others,
    # with a note, rather than keep them beside it: atlas.bound_samples, the rule Atlas.save follows too.
    found = bound_samples(atlas.data, directory, read=read_samples) if atlas is not None else read_samples(directory)
    return (found[:2], found[2], found[3]) if found is not None else (None, b"", b"")


def write_unit(directory: str | Path, atlas: Atlas | None, *, keep_atlas: bool = False,
               samples: Any = "keep-if-bound", report: bool | None = None, what: str = "the atlas") -> Path:
    """Write an atlas directory's files as one unit: all replaced, or (after an error or Ctrl-C) none.

    atlas: the atlas of the unit; keep_atlas: it is the atlas.json already there (kept, checked
    against the manifest) rather than a new one to write.
    samples: (bytes, meta) from sample_attention: new ones; None: none (an older run's are removed);
    "keep": the ones there, refused unless they belong to the atlas; "keep-if-bound": the ones
    there if they belong to the atlas, else removed (with a note).
    report: True renders report.html, False removes it, None re-renders it if there was one: a
    new atlas never sits beside the report of an old one.
    Files the old unit held besides these (the figures `headwise plot` writes into DIR/figures, or
    into DIR itself) are kept with a kept atlas and removed with a new one (they showed the old atlas).
    With a kept atlas, the commit refuses if another command committed to the directory since the
    atlas was loaded (its page or samples would belong to another atlas.json).
    """
    directory = Path(directory)
    # The unit as the kept atlas was read (Atlas.load); a new atlas replaces whatever is there.
    read = atlas is not None and keep_atlas and atlas.path == directory / FILENAME
    since = {"since": atlas.unit_version} if read else {}
    pair, tensor_bytes, meta_bytes = _samples_for(atlas, directory, samples)
    if report is None:
        report = (directory / REPORT_FILE).is_file() and atlas is not None
    if report and atlas is None:
        raise HeadwiseError(f"no atlas in {directory} to write a report of; run headwise profile --out {directory}")
    page = render_html(atlas.data, pair) if report else None
    try:
        with staged_outputs(directory, what=what, **since) as stage:
            if atlas is not None and keep_atlas and (directory / FILENAME).is_file():
                stage.keep(FILENAME)
            elif atlas is not None and not keep_atlas:
                stage.write_text(FILENAME, atlas.to_json())
            if pair is not None:
                stage.write_bytes(SAMPLES_TENSORS, tensor_bytes)
                stage.write_bytes(SAMPLES_JSON, meta_bytes)
            else:
                stage.remove(SAMPLES_TENSORS)
                stage.remove(SAMPLES_JSON)
            if page is not None:
                stage.write_text(REPORT_FILE, page)
            else:
                stage.remove(REPORT_FILE)
            if keep_atlas:
                stage.keep_others()
            else:
                for name in stage.old_files():
                    if name not in UNIT_FILES:
                        stage.remove(name)
            stage.meta = {"atlas_model": atlas.model.get("spec") if atlas is not None else None}
    except OSError as e:  # e.g. the disk filled while staging: the old files are untouched
        raise HeadwiseError(f"could not write {what} to {directory} ({e.strerror or e}); the files there are left "
                            f"as they were; free some space or choose another output directory") from None
    if atlas is not None and not keep_atlas:
        atlas.located_at(directory / FILENAME)
    return directory


__all__ = ["REPORT_FILE", "UNIT_FILES", "atlas_directory", "json_for_script", "matching_samples", "render_html",
           "report_data", "unit_bytes", "write_report", "write_unit"]
