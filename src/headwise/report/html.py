"""Build DIR/report.html: one self-contained page (inline JS and CSS, no network) over an atlas.

The data goes into a <script type="application/json"> element with '<', '>' and '&' written
as \\u003c, \\u003e and \\u0026, so no string in it (a token such as '</script>') can close the
element; the page's script reads it with JSON.parse and inserts every piece of text with
textContent, never as markup. Attention maps travel as base64 uint8 (sqrt-scaled per head).
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

from ..errors import HeadwiseError
from ..scores import score_info
from .layout import pattern_map
from .samples import load_samples

REPORT_FILE = "report.html"
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

    def walk(v: Any, path: str) -> None:
        pairs = _head_pairs(v, L, H) if "head" in path.rsplit(".", 1)[-1] else None
        if _is_matrix(v, L, H):
            matrices[path] = [x for r in v for x in r]
        elif pairs is not None:
            head_lists[path] = pairs
        elif isinstance(v, dict):
            if isinstance(v.get("layer"), int) and isinstance(v.get("head"), int):
                records.append({"path": path, "layer": v["layer"], "head": v["head"],
                                "fields": [[str(k), _short(x)] for k, x in v.items() if k not in ("layer", "head")]})
                return
            for k, x in v.items():
                walk(x, f"{path}.{k}" if path else str(k))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                walk(x, f"{path}[{i}]")
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


def _samples_payload(samples: tuple[dict, dict] | None) -> dict[str, Any] | None:
    if samples is None:
        return None
    arrays, meta = samples
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


def _needs_full(name: str, entry: dict[str, Any]) -> str | None:
    """What the atlas records; atlases from before it recorded this: what the score's family declares."""
    if entry.get("needs_full") in ("high", "low"):
        return entry["needs_full"]
    info = score_info(name) if "needs_full" not in entry else None
    return info.needs_full if info is not None else None


def report_data(atlas_data: dict[str, Any], samples: tuple[dict, dict] | None) -> dict[str, Any]:
    """Everything the page shows, as plain JSON."""
    g = atlas_data["geometry"]
    L, H = int(g["n_layers"]), int(g["n_heads"])
    scores = [{"name": name, "description": e.get("description", ""), "family": e.get("family", ""),
               "probe": e.get("probe"), "needs_full": _needs_full(name, e),
               "values": [x for row in e["heads"] for x in row]}
              for name, e in atlas_data.get("scores", {}).items()]
    profiles = {name: {"bins": p.get("bins"), "description": p.get("description", ""), "probe": p.get("probe"),
                       "values": [h for row in p["values"] for h in row]}
                for name, p in atlas_data.get("profiles", {}).items()
                if isinstance(p, dict) and isinstance(p.get("values"), list) and len(p["values"]) == L
                and all(isinstance(r, list) and len(r) == H for r in p["values"])}
    settings = {k: v for k, v in atlas_data.get("settings", {}).items() if k != "probes"}
    labels = atlas_data.get("roles", {}).get("labels") or [[[] for _ in range(H)] for _ in range(L)]
    model = atlas_data.get("model", {})
    return _clean({
        "model": {"spec": str(model.get("spec", "")), "kind": model.get("kind"),
                  "weights": str(model.get("weights_sha256") or "")[:12]},
        "geometry": g, "settings": settings, "versions": atlas_data.get("versions", {}),
        "scores": scores, "profiles": profiles,
        "roles": {"rules": atlas_data.get("roles", {}).get("rules", []), "labels": [h for row in labels for h in row]},
        "validation": _validation(atlas_data.get("validation"), L, H),
        "samples": _samples_payload(samples), "layout": pattern_map(atlas_data, samples),
    })


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
    """The attention samples saved beside an atlas, refused when another model made them."""
    samples = load_samples(directory) if directory is not None else None
    if samples is not None:
        made_for = samples[1].get("model", {}).get("weights_sha256")
        atlas_for = atlas_data.get("model", {}).get("weights_sha256")
        if made_for != atlas_for:
            raise HeadwiseError(f"the attention samples in {directory} were made with another model than its atlas "
                                f"(weights {str(made_for)[:12]} vs {str(atlas_for)[:12]}); re-collect them: "
                                f"headwise report {directory} --model MODEL")
    return samples


def write_report(atlas_dir: str | Path) -> Path:
    """Write atlas_dir/report.html from atlas_dir/atlas.json (and the attention samples when present)."""
    from ..atlas import Atlas

    atlas = Atlas.load(atlas_dir)
    atlas_dir = atlas.directory
    samples = matching_samples(atlas.data, atlas_dir)
    page = render_html(atlas.data, samples)
    out = atlas_dir / REPORT_FILE
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
