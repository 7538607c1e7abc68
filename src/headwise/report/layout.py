"""The pattern map: every head placed in 2D by the similarity of its attention patterns.

The ViT visual-analytics paper (Li et al., arXiv 2303.13731) embeds heads with an autoencoder
trained on their attention maps. headwise uses PCA instead: deterministic, no training, and
on a few dozen attention-mass features per head a linear projection already separates the
pattern families (sink, previous-token, local, long-range). Features per head, each an
attention mass in [0, 1]:
- the distance profile (mass per log2 token-distance bin), when the atlas has one;
- from the short repeated-token sample: the mass at offsets 0 (self), 1 (previous token),
  block - 1 (induction), block (duplicate) and on the first token, over the second copy's queries;
- from the long sample: the mass on the sink, needle, recent and other regions.
They are square-rooted (so Euclidean distance is the Hellinger distance between the heads'
mass distributions, which keeps a few large masses from drowning the rest), centred, and
projected on the first two principal components. Not standardised: every feature is a mass on
the same scale, and z-scoring would blow near-constant, noisy ones up to equal weight. An
atlas without profile or samples falls back to its scores, which are z-scored (their scales differ).

Image models' features: the spatial_distance profile (mass per ring of patch distance), when the
atlas has one, and from the image samples the mass a patch query puts on the prefix tokens and on
its own patch. Atlases whose pattern summary ran (scores/autoencoder.py) also carry the
autoencoder's and PCA's own layouts of the heads (pattern_layouts); the page offers all of them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ..scores.autoencoder import neighbour_role_agreement


def short_offset_features(short_map: np.ndarray, block: int, prefix: int) -> tuple[np.ndarray, list[str]]:
    """[L, H, 5] mass at offsets 0, 1, block-1, block and on key 0, mean over second-copy queries."""
    L, H, n, _ = short_map.shape
    queries = np.arange(prefix + block, n)
    names = ["short: self", "short: previous", "short: induction (block-1)", "short: duplicate (block)",
             "short: first token"]
    if len(queries) == 0 or n != prefix + 2 * block:
        return np.zeros((L, H, 0)), []
    out = np.zeros((L, H, 5))
    for k, offset in enumerate((0, 1, block - 1, block)):
        out[..., k] = short_map[:, :, queries, queries - offset].mean(-1)
    out[..., 4] = short_map[:, :, queries, 0].mean(-1)
    return out, names


def distance_profile(atlas_data: dict[str, Any]) -> tuple[np.ndarray, list[str]] | None:
    """The distance profile as [L, H, bins] masses and the bins' names, or None when the atlas has none
    this can use: no values (a profile of records), or bins that are not [lo, hi] pairs, one per value.
    (An atlas the schema checked always qualifies; the report also renders documents it never checked.)"""
    g = atlas_data["geometry"]
    dist = atlas_data.get("profiles", {}).get("distance")
    bins = dist.get("bins") if isinstance(dist, dict) else None
    if not isinstance(bins, list) or not bins or not all(isinstance(b, list) and len(b) == 2 for b in bins):
        return None
    try:
        values = np.asarray(dist.get("values"), dtype=float)
    except (TypeError, ValueError):  # ragged, or not numbers
        return None
    if values.shape != (g["n_layers"], g["n_heads"], len(bins)):
        return None
    return values, [f"distance {lo}-{hi}" for lo, hi in bins]


def _profile_values(atlas_data: dict[str, Any], name: str, n_bins: int | None = None) -> np.ndarray | None:
    """A profile's values as [L, H, bins] floats, or None when it is absent or not that shape."""
    g = atlas_data["geometry"]
    p = atlas_data.get("profiles", {}).get(name)
    if not isinstance(p, dict) or not isinstance(p.get("bins"), list):
        return None
    try:
        values = np.asarray(p.get("values"), dtype=float)
    except (TypeError, ValueError):  # ragged, or not numbers
        return None
    want = (g["n_layers"], g["n_heads"], len(p["bins"]) if n_bins is None else n_bins)
    return values if values.shape == want and len(p["bins"]) == want[2] else None


def spatial_distance_profile(atlas_data: dict[str, Any]) -> tuple[np.ndarray, list[str]] | None:
    """An image atlas's spatial_distance profile ([L, H, rings] attention per patch pair, rings [lo, hi) in
    patches) and its bins' names, or None."""
    values = _profile_values(atlas_data, "spatial_distance")
    if values is None:
        return None
    bins = atlas_data["profiles"]["spatial_distance"]["bins"]
    if not all(isinstance(b, list) and len(b) == 2 for b in bins):
        return None
    return values, [f"patch distance {lo}-{hi}" for lo, hi in bins]


def relative_position_map(atlas_data: dict[str, Any]) -> np.ndarray | None:
    """An image atlas's relative_position profile as [L, H, 2R-1, 2C-1] (row dy, column dx; the centre is the
    query's own patch), placed by each bin's (dy, dx), or None when it is absent or does not fit the grid."""
    g = atlas_data["geometry"]
    grid = g.get("patch_grid")
    if not (isinstance(grid, list) and len(grid) == 2):
        return None
    R, C = int(grid[0]), int(grid[1])
    values = _profile_values(atlas_data, "relative_position", (2 * R - 1) * (2 * C - 1))
    if values is None:
        return None
    bins = atlas_data["profiles"]["relative_position"]["bins"]
    try:
        dy = np.array([int(b["dy"]) for b in bins]) + R - 1
        dx = np.array([int(b["dx"]) for b in bins]) + C - 1
    except (TypeError, KeyError, ValueError):
        return None
    if dy.min() < 0 or dy.max() > 2 * R - 2 or dx.min() < 0 or dx.max() > 2 * C - 2:
        return None
    out = np.full((g["n_layers"], g["n_heads"], 2 * R - 1, 2 * C - 1), np.nan)
    out[:, :, dy, dx] = values
    return out


def image_sample_features(attention: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """[L, H, 2]: the mass a patch query puts on the prefix tokens and on its own patch, averaged over the
    sampled images and query patches (an image model's attention samples)."""
    n, L, H, Q, T = attention.shape
    prefix = int(meta["geometry"].get("prefix_tokens", 0))
    queries = meta["images"]["queries"]
    patch_rows = [j for j, q in enumerate(queries) if q >= prefix]
    if not patch_rows:
        return np.zeros((L, H, 0)), []
    a = np.asarray(attention, dtype=np.float64)[:, :, :, patch_rows]  # [n, L, H, q, T]
    own = np.stack([a[:, :, :, j, queries[r]] for j, r in enumerate(patch_rows)], -1)  # [n, L, H, q]
    out = np.stack([a[..., :prefix].sum(-1).mean((0, 3)), own.mean((0, 3))], -1)
    return out, ["image: prefix tokens", "image: own patch"]


def head_features(atlas_data: dict[str, Any], samples: tuple[dict, dict] | None
                  ) -> tuple[np.ndarray, list[str], bool]:
    """[L * H, features], the feature names, and whether they are attention masses (else scores)."""
    g = atlas_data["geometry"]
    L, H = g["n_layers"], g["n_heads"]
    parts, names = [], []
    dist = distance_profile(atlas_data)
    if dist is not None:
        parts.append(dist[0])
        names += dist[1]
    if samples is not None:
        arrays, meta = samples
        short = meta.get("short", {})
        if "short_map" in arrays and "block_len" in short:
            f, n = short_offset_features(arrays["short_map"].astype(float), int(short["block_len"]),
                                         int(short.get("prefix_len", 0)))
            parts.append(f)
            names += n
        if "long_regions_mean" in arrays:
            parts.append(arrays["long_regions_mean"].astype(float))
            names += [f"long: {r}" for r in meta.get("long", {}).get("regions", ["sink", "needle", "recent", "other"])]
    spatial = spatial_distance_profile(atlas_data)
    if spatial is not None:
        parts.append(spatial[0])
        names += spatial[1]
    if samples is not None and "image_attention" in samples[0]:
        f, n = image_sample_features(samples[0]["image_attention"], samples[1])
        parts.append(f)
        names += n
    masses = bool(parts)
    if not parts:
        for name, entry in atlas_data.get("scores", {}).items():
            parts.append(np.asarray([[np.nan if v is None else v for v in row] for row in entry["heads"]],
                                    dtype=float)[..., None])
            names.append(name)
    if not parts:
        return np.zeros((L * H, 0)), [], masses
    return np.concatenate(parts, -1).reshape(L * H, -1), names, masses


def pca_2d(features: np.ndarray, standardise: bool = False) -> tuple[np.ndarray, list[float], np.ndarray]:
    """(coordinates [n, 2], explained variance ratio of PC1 and PC2, kept-feature mask)."""
    x = np.nan_to_num(np.asarray(features, dtype=float), nan=0.0)
    n = x.shape[0]
    keep = x.std(0) > 1e-12 if x.size else np.zeros(x.shape[1], dtype=bool)
    x = x[:, keep]
    if n < 2 or x.shape[1] == 0:
        return np.zeros((n, 2)), [0.0, 0.0], keep
    z = x - x.mean(0)
    if standardise:
        z = z / x.std(0)
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    k = min(2, len(s))
    # Fix each component's sign (SVD's is arbitrary): its largest loading is positive.
    signs = np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(1)])
    coords = np.zeros((n, 2))
    coords[:, :k] = u[:, :k] * s[:k] * signs
    var = s**2
    ratio = [float(v / var.sum()) for v in var[:k]] + [0.0] * (2 - k)
    return coords, ratio, keep


def pattern_map(atlas_data: dict[str, Any], samples: tuple[dict, dict] | None) -> dict[str, Any]:
    """{"x", "y" (per head, layer-major), "method", "features", "explained"} for the report."""
    features, names, masses = head_features(atlas_data, samples)
    if masses:
        coords, explained, keep = pca_2d(np.sqrt(np.clip(features, 0.0, None)))
        method = "PCA of square-rooted attention masses (Hellinger geometry)"
    else:
        coords, explained, keep = pca_2d(features, standardise=True)
        method = "PCA of standardised scores (this atlas has no distance profile or attention samples)"
    return {"x": [round(float(v), 5) for v in coords[:, 0]], "y": [round(float(v), 5) for v in coords[:, 1]],
            "method": method,
            "features": [n for n, k in zip(names, keep) if k], "explained": [round(e, 4) for e in explained]}


PATTERN_LAYOUTS = (("pattern_ae", "autoencoder"), ("pattern_pca", "PCA of the maps"))  # scores/autoencoder.py


def pattern_layouts(atlas_data: dict[str, Any]) -> list[dict[str, Any]]:
    """The pattern summary's layouts of the heads (pattern_ae, pattern_pca profiles), each {"name", "label",
    "x", "y", "group" (per head, layer-major; group None where missing), "method", "description",
    "settings", "records": [{"group", "heads", "decoded", "mean_map" (arrays [rows, cols]), "side"}]}.
    Profiles that do not have that shape are left out (the page also renders documents no schema checked)."""
    out = []
    for name, label in PATTERN_LAYOUTS:
        values = _profile_values(atlas_data, name, 3)
        if values is None:
            continue
        p = atlas_data["profiles"][name]
        flat = values.reshape(-1, 3)
        if not np.isfinite(flat[:, :2]).all():
            continue
        groups = [int(g) if np.isfinite(g) and g == int(g) and g >= 0 else None for g in flat[:, 2]]
        records = []
        for r in p.get("records") or []:
            record = _pattern_record(r)
            if record is not None:
                records.append(record)
        out.append({"name": name, "label": label, "x": flat[:, 0], "y": flat[:, 1], "group": groups,
                    "method": str(p.get("method") or ""), "description": str(p.get("description") or ""),
                    "settings": p.get("settings") if isinstance(p.get("settings"), dict) else {},
                    "records": records})
    return out


def _pattern_record(r: Any) -> dict[str, Any] | None:
    """One group's record with its maps as [rows, cols] arrays, or None when it does not hold together."""
    if not isinstance(r, dict) or not isinstance(r.get("group"), int) or not isinstance(r.get("side"), list):
        return None
    side = r["side"]
    if len(side) != 2 or not all(isinstance(v, int) and v > 0 for v in side):
        return None
    maps = {}
    for key in ("decoded", "mean_map"):
        try:
            a = np.asarray(r.get(key), dtype=float)
        except (TypeError, ValueError):
            return None
        if a.shape != (side[0] * side[1],) or not np.isfinite(a).all():
            return None
        maps[key] = a.reshape(side)
    heads = [h[:2] for h in r.get("heads") or [] if isinstance(h, list) and len(h) >= 2
             and all(isinstance(v, int) and not isinstance(v, bool) for v in h[:2])]
    return {"group": r["group"], "heads": heads, "side": side, **maps}


def neighbour_role_share(x: Any, y: Any, labels: list[list[str]], k: int = 3) -> tuple[float, float]:
    """(share of (head, neighbour) pairs, over each head's k nearest neighbours in this 2D layout, whose role
    labels intersect (scores.autoencoder.neighbour_role_agreement); the same share over all pairs of distinct
    heads, the rate by chance). The page computes both in JavaScript."""
    coords = np.stack([np.asarray(x, dtype=float), np.asarray(y, dtype=float)], -1)
    n = len(coords)
    if n < 2:
        return float("nan"), float("nan")
    sets = [frozenset(lab) or frozenset(["none"]) for lab in labels]
    # By chance: pairs of distinct heads, counted per distinct label set.
    counts = Counter(sets)
    kinds = list(counts)
    same = sum(counts[a] * (counts[a] - 1) / 2 if i == j else counts[a] * counts[b]
               for i, a in enumerate(kinds) for j, b in enumerate(kinds[i:], i) if a & b)
    return neighbour_role_agreement(coords, [set(s) for s in sets], k), same / (n * (n - 1) / 2)


__all__ = ["PATTERN_LAYOUTS", "distance_profile", "head_features", "image_sample_features", "neighbour_role_share",
           "pattern_layouts", "pattern_map", "pca_2d", "relative_position_map", "short_offset_features",
           "spatial_distance_profile"]
