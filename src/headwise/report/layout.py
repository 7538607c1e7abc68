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
"""

from __future__ import annotations

from typing import Any

import numpy as np


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


__all__ = ["distance_profile", "head_features", "pattern_map", "pca_2d", "short_offset_features"]
