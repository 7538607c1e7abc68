"""Where on the image each head looks: attention strength by spatial offset and distance, mean
attention distance, local and prefix attention (image models).

A is a head's attention probability matrix on one probe image (raw softmax output: never
renormalised, except where said). Patch p of the R x C grid, row-major, is token
prefix_tokens + p at (p // C, p % C); only patch queries are scored. Offsets, distances in
PATCH units (pixels = patch units x patch size). One pass over the shared image probe gives:

- profile `relative_position` (Li et al. 2023, arXiv 2303.13731, "attention strength"): for
  every offset (dy, dx) = (r' - r, c' - c) in [-(R-1), R-1] x [-(C-1), C-1], the mean of
  A[query patch (r, c), key patch (r', c')] over images and over the query patches for which
  the offset lands inside the grid. Values [L][H][(2R-1)(2C-1)], row-major over dy then dx;
  bins [{"dy", "dx"}, ...] in that order; "grid": [R, C].
- profile `spatial_distance`: the mean of A over all (query patch, key patch) pairs, and
  images, whose Euclidean distance d = sqrt(dy^2 + dx^2) falls in the ring [k - 0.5, k + 0.5),
  k = 0, 1, ...; bins [[lo, hi], ...].
- `attention_distance` (Dosovitskiy et al. 2020, ViT Fig. 7; Raghu et al. 2021): per patch
  query, sum_k A'[q, k] d(q, k) with A' the query's attention restricted to patch keys and
  renormalised to sum 1 (prefix tokens have no position); mean over query patches and images.
  A query whose patch attention underflows to exactly 0 counts as distance 0.
- `local_attention`: per patch query, the share of its attention (raw) on patches within
  Chebyshev distance 1 (its 3 x 3 neighbourhood, itself included); mean over query patches and images.
- `prefix_attention`: per patch query, the share of its attention on the prefix tokens (CLS,
  distillation, registers); mean over query patches and images; 0 for models without any.

Departures from the paper: we read its attention-strength profile as the relative-position map
averaged over query patches, and that average is a mean over the VALID queries of each offset,
so border effects do not shrink far offsets (a sum over queries would fall off towards the
grid's edge only because fewer queries reach there). Attention to prefix and suffix tokens is
left in the denominator: the maps show raw probabilities, and the prefix share is reported
separately. Every image has the same queries per offset, so the mean over images of per-image
means equals the pooled mean computed here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import HeadwiseError
from ..geometry import Geometry
from ..instrument import AttentionChunk, check_tokens
from ..probes import ImageProbe, Probe
from ..roles import RoleRule
from .base import ProbeScoreFamily, Score, ScoreObserver, ScoreResult
from .shared_probes import IMAGE_SETTINGS, image_probe_key, make_image_probe


def layer_means(values: np.ndarray) -> np.ndarray:
    """Mean over heads of [layers, heads, ...] values: the per-layer trend ([layers, ...])."""
    return np.asarray(values, dtype=float).mean(axis=1)


class _SpatialObserver(ScoreObserver):
    def __init__(self, geometry: Geometry, probe_name: str):
        if geometry.patch_grid is None:
            raise HeadwiseError("the spatial scores need an image model (patches on a grid); this model reads text")
        self.grid = geometry.patch_grid
        rows, cols = self.grid
        self.prefix, self.n_patches, self.probe_name = geometry.prefix_tokens, rows * cols, probe_name
        self.n_tokens = geometry.n_tokens
        n_layers, n_heads = geometry.n_layers, geometry.n_heads
        # Built once: each (query patch, key patch) pair's flattened offset and distance; each offset's ring.
        p = torch.arange(self.n_patches)
        dy = (p // cols)[None, :] - (p // cols)[:, None]  # [query, key]
        dx = (p % cols)[None, :] - (p % cols)[:, None]
        self.offset = (dy + rows - 1) * (2 * cols - 1) + dx + cols - 1
        self.distance = torch.sqrt((dy**2 + dx**2).double())
        self.off_dy = torch.arange(1 - rows, rows).repeat_interleave(2 * cols - 1)
        self.off_dx = torch.arange(1 - cols, cols).repeat(2 * rows - 1)
        self.ring = torch.floor(torch.sqrt((self.off_dy**2 + self.off_dx**2).double()) + 0.5).long()
        self.local = (self.off_dy.abs() <= 1) & (self.off_dx.abs() <= 1)
        n_off = len(self.off_dy)
        f64 = dict(dtype=torch.float64)
        self.mass = torch.zeros(n_layers, n_heads, n_off, **f64)  # sum of A per offset, over images and queries
        self.pairs = torch.zeros(n_layers, n_off, **f64)  # (image, query, key) pairs per offset
        self.prefix_mass = torch.zeros(n_layers, n_heads, **f64)
        self.distance_sum = torch.zeros(n_layers, n_heads, **f64)
        self.queries = torch.zeros(n_layers, **f64)  # (image, query patch) pairs seen
        self.images = 0
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def begin(self, input_ids: torch.Tensor) -> None:
        super().begin(input_ids)
        self.images += input_ids.shape[0]

    def observe(self, chunk: AttentionChunk) -> None:
        qi, p0, n = chunk.query_index, self.prefix, self.n_patches
        check_tokens(chunk, self.n_tokens)
        # query_index is consecutive: the chunk's patch queries are one slice (a view, no copy).
        lo = int((qi < p0).sum())
        hi = lo + int(((qi >= p0) & (qi < p0 + n)).sum())
        if hi == lo:
            return
        if chunk.weights.device not in self._on:
            self._on[chunk.weights.device] = (self.offset.to(chunk.weights.device),
                                              self.distance.to(chunk.weights.device, chunk.weights.dtype))
        offset, distance = self._on[chunk.weights.device]
        a = chunk.weights[:, :, lo:hi]
        qp = qi[lo:hi] - p0
        b, h, q, _ = a.shape
        patches = a[..., p0:p0 + n]  # [b, h, q, patches]
        # Per-chunk reductions stay in the weights' dtype (sums of at most a few hundred probabilities, and
        # float64 is slow or absent on accelerators); every total across chunks is float64 on the CPU.
        n_off, off = len(self.off_dy), offset[qp].reshape(-1)
        flat = (torch.arange(h, device=a.device)[:, None] * n_off + off).reshape(-1)
        per_offset = torch.zeros(h * n_off, dtype=a.dtype, device=a.device)
        per_offset.index_add_(0, flat, patches.sum(0).reshape(-1))  # a 1-D index_add: ~50x faster than along dim 1
        layer = chunk.layer
        self.mass[layer] += per_offset.reshape(h, n_off).cpu().double()
        self.pairs[layer] += b * torch.bincount(off, minlength=n_off).cpu().double()
        self.prefix_mass[layer] += a[..., :p0].sum((0, 2, 3)).cpu().double()
        num = (patches * distance[qp]).sum(-1).cpu().double()  # [b, h, q]
        den = patches.sum(-1).cpu().double()
        self.distance_sum[layer] += (num / den.clamp_min(1e-300)).sum((0, 2))
        self.queries[layer] += b * q

    def result(self) -> ScoreResult:
        per_query = self.queries.clamp_min(1)[:, None]
        # A pair's ring and its 3x3-neighbourhood membership depend on its offset alone, so both come from the
        # per-offset sums; only the renormalised distance needed its own per-query pass.
        n_rings = int(self.ring.max()) + 1
        ring_mass = torch.zeros(*self.mass.shape[:2], n_rings, dtype=torch.float64).index_add_(2, self.ring, self.mass)
        ring_pairs = torch.zeros(len(self.pairs), n_rings, dtype=torch.float64).index_add_(1, self.ring, self.pairs)
        rows, cols = self.grid
        return ScoreResult(
            scores={"attention_distance": (self.distance_sum / per_query).numpy(),
                    "local_attention": (self.mass[..., self.local].sum(-1) / per_query).numpy(),
                    "prefix_attention": (self.prefix_mass / per_query).numpy()},
            profiles={
                "relative_position": {
                    "values": (self.mass / self.pairs.clamp_min(1)[:, None]).numpy(),
                    "bins": [{"dy": int(y), "dx": int(x)} for y, x in zip(self.off_dy, self.off_dx)],
                    "grid": [rows, cols],
                    "description": "mean attention from a patch to the patch at offset (dy, dx), over images and "
                                   "the query patches for which that offset is inside the grid"},
                "spatial_distance": {
                    "values": (ring_mass / ring_pairs.clamp_min(1)[:, None]).numpy(),
                    "bins": [[k - 0.5, k + 0.5] for k in range(n_rings)],
                    "description": "mean attention per (query patch, key patch) pair whose Euclidean distance "
                                   "in patches is in [lo, hi), over images"}},
            settings={"probe": self.probe_name, "image_count": self.images, "patch_units": True, "grid": [rows, cols],
                      "prefix_tokens": self.prefix, "queries": "patches only"},
        )


class SpatialScores(ProbeScoreFamily):
    family = "spatial"
    modalities = ("image",)
    scores = (
        Score("attention_distance", "mean distance in patches from a patch to the patches it attends to, attention "
                                    "renormalised over patches (ViT's mean attention distance)", default=True),
        Score("local_attention", "share of a patch's attention on its 3x3 patch neighbourhood, itself included",
              default=True,
              role=RoleRule("local", "local_attention", ">", 0.5, "headwise's cut: more than half of a patch's "
                            "attention within its 3x3 neighbourhood", precedence=20)),
        Score("prefix_attention", "share of a patch's attention on the prefix tokens (CLS, distillation, registers)",
              default=True,
              role=RoleRule("prefix-sink", "prefix_attention", ">", 0.5, "headwise's cut: more than half of a "
                            "patch's attention on the CLS/register tokens, the image analogue of an attention sink",
                            precedence=21)),
    )
    settings = IMAGE_SETTINGS
    batch_size = 8

    def probe_key(self, settings: Any) -> tuple:
        return image_probe_key(settings)

    def make_probe(self, preprocessor: Any, geometry: Geometry, settings: Any) -> Probe:
        return make_image_probe(preprocessor, geometry, settings)

    def check_probe(self, probe: Probe, settings: Any) -> None:
        if not isinstance(probe, ImageProbe):
            raise HeadwiseError(f"the spatial scores need the image probe (patches on a grid), not probe "
                                f"{probe.name!r}")

    def observer(self, geometry: Geometry, probe: Probe, settings: Any) -> ScoreObserver:
        return _SpatialObserver(geometry, probe.name)


__all__ = ["SpatialScores", "layer_means"]
