"""Downsampled attention samples: what the report shows of each head's attention pattern.

Two forward passes with an Observer that keeps, per head, only small summaries:
- short: one repeated random-token block (BOS + 2 x `block` tokens, <= 64 x 64): its attention
  map, pooled only when longer than `SHORT_SIDE` tokens (or than `map_side` allows: models with
  thousands of heads get coarser maps so the page stays a few MB);
- long: one needle-in-a-haystack prompt of the profile's context length (plain text when the
  context is too short to hold a needle and its question): the attention map
  pooled to `LONG_SIDE` x `LONG_SIDE` blocks (entry [I, J] = attention mass the queries of
  block I put on the keys of block J, averaged over those queries, so rows sum to 1), the
  mass on four disjoint key regions (sink = the first `SINK_TOKENS` tokens; needle = the
  needle's tokens; recent = the last `window` tokens up to the query itself; other), averaged over
  the queries that can see the needle and for the last query alone, and the last query's
  attention over the prompt pooled to `ROW_BINS` bins.

An image model instead gets, for the first `SAMPLE_IMAGES` images of its image probe, every head's
attention from a set of query tokens (every prefix token: CLS, distillation, registers; and the
patches, or an evenly spread sub-grid of at most `MAX_QUERY_PATCHES` of them) over all the image's
tokens, with the images' thumbnails, labels and the model's predictions. Big models keep fewer
query patches (and then fewer images) so that all heads' rows stay within `IMAGE_BUDGET` cells.

Saved as DIR/attention_samples.safetensors (the arrays) and DIR/attention_samples.json (the
tokens, probe settings, region definitions and the model they came from), so the report can be
rebuilt without the model. Never pickle. The JSON binds the samples to their atlas: the model's
weights hash, the profile settings they depend on (BOUND_SETTINGS) and the sha256 of the
.safetensors file; `binding_problem` says why samples do not belong beside an atlas, and the
report refuses them rather than pair a map with another run's tokens. (The binding and the reading of
the two files live in atlas.py, below the report, so that Atlas.save keeps samples by the same rule.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._progress import progress
from .._schema import SAMPLES, one_line
from ..atlas import (
    BOUND_SETTINGS,
    IMAGE_BOUND_SETTINGS,
    MAX_TENSOR_BYTES,
    SAMPLES_FILES,
    binding_problem,
    bound_settings,
    read_samples_files,
    recollect,
)
from ..errors import HeadwiseError
from ..geometry import Geometry
from ..instrument import AttentionChunk, Observer, Session

SAMPLES_TENSORS, SAMPLES_JSON = SAMPLES_FILES  # attention_samples.safetensors, attention_samples.json
SHORT_SIDE = 64
LONG_SIDE = 64
MAP_BUDGET = 2 * 2**20  # bytes of one uint8 map per head across all heads, as the page embeds it
ROW_BINS = 128
SINK_TOKENS = 4  # StreamingLLM's attention sinks
REGIONS = ("sink", "needle", "recent", "other")
SAMPLE_IMAGES = 4  # images of an image model's samples
MAX_QUERY_PATCHES = 64  # query patches per image: all of an 8 x 8 grid, a sub-grid of a larger one
MIN_QUERY_PATCHES = 16  # below this many query patches per image, keep fewer images instead
IMAGE_BUDGET = 3 * 2**20  # attention cells (one uint8 each in the page) of all heads, images and query rows


def map_side(geometry: Geometry, side: int) -> int:
    """`side`, shrunk for big models so all heads' side x side maps stay within MAP_BUDGET bytes."""
    return max(8, min(side, int((MAP_BUDGET / geometry.n_total_heads) ** 0.5)))


def block_index(n: int, blocks: int) -> Tensor:
    """Block of each of n positions when split into min(n, blocks) near-equal contiguous blocks."""
    blocks = min(n, blocks)
    return torch.arange(n) * blocks // n


def _one_hot(index: Tensor, blocks: int) -> Tensor:
    out = torch.zeros(len(index), blocks, dtype=torch.float64)
    out[torch.arange(len(index)), index] = 1.0
    return out


class PooledAttention(Observer):
    """Per layer: the [heads, side, side] block-mean attention map of batch row 0, and optional
    region masses and last-query row of a long prompt."""

    def __init__(self, geometry: Geometry, length: int, side: int, regions: dict[str, Any] | None = None,
                 row_bins: int = 0):
        self.length = length
        self.side = min(length, side)
        self.index = block_index(length, side)
        self.key_hot = _one_hot(self.index, self.side)
        self.counts = torch.bincount(self.index, minlength=self.side).double()
        L, H = geometry.n_layers, geometry.n_heads
        self.map = torch.zeros(L, H, self.side, self.side, dtype=torch.float64)
        self.regions = regions
        if regions is not None:
            self.region_mean = torch.zeros(L, H, len(REGIONS), dtype=torch.float64)
            self.region_last = torch.zeros(L, H, len(REGIONS), dtype=torch.float64)
            self.region_queries = 0
        self.row_bins = min(row_bins, length) if row_bins else 0
        if self.row_bins:
            self.row_hot = _one_hot(block_index(length, self.row_bins), self.row_bins)
            self.last_row = torch.zeros(L, H, self.row_bins, dtype=torch.float64)

    def observe(self, chunk: AttentionChunk) -> None:
        if chunk.key_offset != 0:
            raise HeadwiseError("attention samples need the whole prompt in one forward pass (no cache offset)")
        a = chunk.weights[0].double().cpu()  # [heads, q, keys_seen]
        n_keys = a.shape[-1]
        qi = chunk.query_index.cpu()
        per_key_block = a @ self.key_hot[:n_keys]  # [h, q, side]
        self.map[chunk.layer].index_add_(1, self.index[qi], per_key_block)
        if self.regions is not None:
            self._observe_regions(chunk.layer, a, qi)
        if self.row_bins and int(qi[-1]) == self.length - 1:
            self.last_row[chunk.layer] = a[:, -1] @ self.row_hot[:n_keys]

    def _observe_regions(self, layer: int, a: Tensor, qi: Tensor) -> None:
        lo, hi = self.regions["needle"]
        window = self.regions["window"]
        keys = torch.arange(a.shape[-1])
        sink = keys < self.regions["sink"]
        needle = (keys >= lo) & (keys < hi) & ~sink
        recent = (keys[None, :] > qi[:, None] - window) & ~sink[None] & ~needle[None]  # [q, keys]
        masses = torch.stack([a[..., sink].sum(-1), a[..., needle].sum(-1), (a * recent).sum(-1)], -1)
        masses = torch.cat([masses, (a.sum(-1) - masses.sum(-1)).clamp_min(0)[..., None]], -1)  # [h, q, 4]
        seen = qi >= hi  # queries after the needle: every region is visible to them
        self.region_mean[layer] += masses[:, seen].sum(1)
        if layer == 0:
            self.region_queries += int(seen.sum())
        if int(qi[-1]) == self.length - 1:
            self.region_last[layer] = masses[:, -1]

    def pooled_map(self) -> np.ndarray:
        return (self.map / self.counts[None, None, :, None]).numpy()


def _token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token as the text it decodes to (shown in the report as text, never as markup)."""
    return [tokenizer.decode([i]) for i in ids]


def _forward(loaded: Any, ids: Tensor, observer: Observer) -> None:
    with torch.inference_mode(), Session(loaded.geometry, [observer]):
        loaded.model(input_ids=ids.to(loaded.device), use_cache=False, logits_to_keep=1)


def _long_prompt(tok: Any, geometry: Geometry, settings: Any) -> tuple[Tensor, tuple[int, int], dict[str, Any]]:
    """(ids [1, T], needle span, settings): a needle prompt of the profile's context, or plain
    text without a needle when the context is too short to hold one."""
    from ..probes import natural_text
    from ..probes.needle import build_case, bundled_needles

    needle = bundled_needles()[0]
    try:
        case = build_case(tok, [needle], [0.5], context=int(settings.context), question=needle.question,
                          seed=settings.seed, text=settings.text, max_positions=geometry.max_positions)
    except HeadwiseError:
        probe = natural_text(tok, context=int(settings.context), n_sequences=1, seed=settings.seed, text=settings.text)
        return probe.input_ids, (0, 0), {"probe": "natural text (the context is too short for a needle prompt)",
                                          **probe.settings, "needle": None, "question": None}
    start, end = case.needle_spans[0]
    return case.input_ids, (int(start), int(end)), {"probe": "needle in a haystack", **case.settings,
                                                    "needle": needle.text, "question": needle.question}


def sample_attention(loaded: Any, settings: Any) -> tuple[bytes, dict[str, Any]]:
    """Run the short and long probes on `loaded`: (the .safetensors file's bytes, its metadata).

    settings: the ProfileSettings the atlas was made with (context, seed, text, block_len, window).
    The metadata binds the samples to that atlas: the model, these settings, the tensors' sha256.
    """
    from safetensors.numpy import save

    from ..probes import repeated_tokens

    geometry: Geometry = loaded.geometry
    if geometry.modality == "image":
        return sample_images(loaded, settings)
    tok = loaded.tokenizer
    block = min(int(settings.block_len), (SHORT_SIDE - 1) // 2)  # BOS + 2 blocks fit one 64 x 64 map
    short = repeated_tokens(tok, geometry.vocab_size, block_len=block, repeats=2, n_sequences=1, seed=settings.seed,
                            name="report-short")
    short_ids = short.input_ids[:1]
    short_obs = PooledAttention(geometry, short_ids.shape[1], map_side(geometry, SHORT_SIDE))

    long_ids, span, long_settings = _long_prompt(tok, geometry, settings)
    regions = {"sink": SINK_TOKENS, "needle": [int(span[0]), int(span[1])], "window": int(settings.window)}
    long_obs = PooledAttention(geometry, long_ids.shape[1], map_side(geometry, LONG_SIDE), regions=regions,
                               row_bins=ROW_BINS)
    for ids, observer in progress([(short_ids, short_obs), (long_ids, long_obs)], desc="attention samples for the "
                                  "report", total=2, unit="probe"):
        _forward(loaded, ids, observer)

    n_seen = max(long_obs.region_queries, 1)
    data = save({
        # float16 keeps ~3 significant digits, plenty for maps drawn with 256 colours
        "short_map": short_obs.pooled_map().astype(np.float16),
        "long_map": long_obs.pooled_map().astype(np.float16),
        "long_regions_mean": (long_obs.region_mean / n_seen).numpy().astype(np.float32),
        "long_regions_last": long_obs.region_last.numpy().astype(np.float32),
        "long_last_row": long_obs.last_row.numpy().astype(np.float16),
    })
    meta = {
        **_meta_head(loaded, data, settings),
        "short": {"probe": "repeated random tokens", **short.settings, "length": int(short_ids.shape[1]),
                  "side": short_obs.side, "tokens": _token_strings(tok, short_ids[0].tolist())},
        "long": {**long_settings, "length": int(long_ids.shape[1]),
                 "side": long_obs.side, "row_bins": long_obs.row_bins, "regions": list(REGIONS),
                 "sink_tokens": SINK_TOKENS, "window": int(settings.window), "needle_span": regions["needle"],
                 "region_queries": long_obs.region_queries,
                 "tokens": _token_strings(tok, long_ids[0].tolist())},
    }
    return data, meta


# ---- image models -------------------------------------------------------------------------------
def query_grid(rows: int, cols: int, patches: int) -> tuple[list[int], list[int]]:
    """(grid rows, grid columns) of an evenly spread sub-grid of at most `patches` patches: every patch when
    the grid has no more, else the centres of near-equal bands (so a central patch is among them)."""
    if rows * cols <= patches:
        return list(range(rows)), list(range(cols))
    scale = (patches / (rows * cols)) ** 0.5
    n_rows = max(1, min(rows, int(rows * scale)))
    n_cols = max(1, min(cols, patches // n_rows))
    return ([(2 * k + 1) * rows // (2 * n_rows) for k in range(n_rows)],
            [(2 * k + 1) * cols // (2 * n_cols) for k in range(n_cols)])


def image_sample_plan(geometry: Geometry, images: int = SAMPLE_IMAGES) -> tuple[int, list[int], list[int]]:
    """(images kept, sub-grid rows, sub-grid columns): every head's rows of every query of every image within
    IMAGE_BUDGET cells; fewer query patches first, then (below MIN_QUERY_PATCHES) fewer images."""
    rows, cols = geometry.patch_grid
    tokens, heads = geometry.n_tokens, geometry.n_total_heads
    while True:
        per_image = IMAGE_BUDGET // max(1, images * heads * tokens) - geometry.prefix_tokens
        patches = max(1, min(MAX_QUERY_PATCHES, per_image))
        if patches >= min(MIN_QUERY_PATCHES, rows * cols) or images == 1:
            return (images, *query_grid(rows, cols, patches))
        images -= 1


def prefix_names(geometry: Geometry) -> list[str]:
    """What each prefix token is: the class token first, then DeiT's distillation token or registers."""
    names = []
    for k in range(geometry.prefix_tokens):
        if k == 0:
            names.append("CLS")
        elif k == 1 and geometry.model_type.startswith("deit"):
            names.append("distillation")
        else:
            names.append(f"register {k - (2 if geometry.model_type.startswith('deit') else 1)}")
    return names


class QueryRows(Observer):
    """Per layer: the attention rows [batch, heads, queries, tokens] of the chosen query tokens."""

    def __init__(self, geometry: Geometry, queries: list[int], images: int):
        self.queries = torch.tensor(queries)
        self.rows = torch.zeros(images, geometry.n_layers, geometry.n_heads, len(queries), geometry.n_tokens)

    def observe(self, chunk: AttentionChunk) -> None:
        if chunk.key_offset != 0 or chunk.weights.shape[-1] != self.rows.shape[-1]:
            raise HeadwiseError("image attention samples need every token of the image in one forward pass")
        qi = chunk.query_index.cpu()
        hit = torch.isin(self.queries, qi)  # the chosen queries among this chunk's rows
        if hit.any():
            where = torch.searchsorted(qi, self.queries[hit])
            self.rows[:, chunk.layer].index_copy_(2, hit.nonzero().flatten(), chunk.weights[:, :, where].float().cpu())


def _class_names(model: Any, ids: list[int]) -> dict[str, str]:
    """Names of the classes in `ids` from the model's config, when it has real ones (not LABEL_3)."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = {}
    for i in sorted(set(ids)):
        name = id2label.get(i, id2label.get(str(i)))
        if isinstance(name, str) and name and name != f"LABEL_{i}":
            names[str(i)] = name[:200]
    return names


def sample_images(loaded: Any, settings: Any) -> tuple[bytes, dict[str, Any]]:
    """An image model's samples: (the .safetensors file's bytes, its metadata). See the module docstring."""
    from types import SimpleNamespace

    from safetensors.numpy import save

    from ..scores.shared_probes import make_image_probe

    geometry: Geometry = loaded.geometry
    n_images, grid_rows, grid_cols = image_sample_plan(geometry, min(SAMPLE_IMAGES, int(settings.image_count)))
    # The probe picks a seeded permutation of the digits, or a directory's files sorted by name, and takes the
    # first image_count: its first n images are the profile's first n, without preparing the rest.
    probe = make_image_probe(loaded.preprocessor, geometry,
                             SimpleNamespace(image_count=n_images, seed=settings.seed, images=settings.images))
    n_images = int(probe.pixel_values.shape[0])
    R, C = geometry.patch_grid
    P = geometry.prefix_tokens
    patches = [r * C + c for r in grid_rows for c in grid_cols]
    queries = list(range(P)) + [P + p for p in patches]
    observer = QueryRows(geometry, queries, n_images)
    with torch.inference_mode(), Session(geometry, [observer]):
        out = loaded.model(**probe.model_inputs(probe.pixel_values.to(loaded.device)))
    logits = getattr(out, "logits", None)
    predictions = None
    if isinstance(logits, Tensor) and logits.dim() == 2 and logits.shape[0] == n_images:
        predictions = [int(x) for x in logits.argmax(-1).tolist()]
    labels = None if probe.labels is None else [int(x) for x in probe.labels.tolist()]
    thumbnails = np.ascontiguousarray(probe.thumbnails[:n_images], dtype=np.uint8)
    data = save({
        # float16, as the text maps: plenty for overlays drawn with 256 colours
        "image_attention": observer.rows.numpy().astype(np.float16),  # [images, L, H, queries, tokens]
        "thumbnails": thumbnails,  # [images, side, side, 3] uint8 RGB
    })
    subsampled = len(patches) < R * C
    meta = {
        **_meta_head(loaded, data, settings),
        "images": {
            "probe": "the first images of the image probe", **probe.settings, "count": n_images,
            "sources": [str(x) for x in probe.sources[:n_images]], "labels": labels, "predictions": predictions,
            "class_names": _class_names(loaded.model, (labels or []) + (predictions or [])),
            "tokens": int(geometry.n_tokens), "prefix_names": prefix_names(geometry),
            "queries": queries, "query_grid": [grid_rows, grid_cols], "thumbnail_side": int(thumbnails.shape[1]),
            "note": (f"query patches: an evenly spread {len(grid_rows)} x {len(grid_cols)} sub-grid of the {R} x {C} "
                     f"patches, so that every head's rows fit the page" if subsampled else "every patch is a query"),
        },
    }
    return data, meta


def _meta_head(loaded: Any, data: bytes, settings: Any) -> dict[str, Any]:
    """What every samples file records first: the model, its geometry, and what binds the file to its atlas
    (the tensors' digest and the profile settings the samples of this kind of model depend on)."""
    return {"schema": SAMPLES, "model": loaded.info.to_dict(), "geometry": loaded.geometry.to_dict(),
            "tensors_sha256": hashlib.sha256(data).hexdigest(),
            "profile": bound_settings(settings, loaded.geometry.modality)}


def meta_text(meta: dict[str, Any]) -> str:
    return json.dumps(meta, ensure_ascii=False, indent=1) + "\n"


# ---- reading them back, and binding them to an atlas (atlas.py: Atlas.save uses the same rule) ----
def _check_arrays(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str | None:
    """Why the arrays do not fit their metadata (None: they do): shapes, dtypes, finite values, lengths."""
    if "images" in meta:
        return _check_image_arrays(arrays, meta)
    g, short, long = meta["geometry"], meta["short"], meta["long"]
    L, H = g["n_layers"], g["n_heads"]
    for part in (short, long):
        if len(part["tokens"]) != part["length"] or part["side"] > part["length"]:
            return f"hold {len(part['tokens'])} tokens and a side of {part['side']} for a prompt of {part['length']}"
    lo, hi = long["needle_span"]
    if not lo <= hi <= long["length"] or long["row_bins"] > long["length"] or len(long["regions"]) != len(REGIONS):
        return "describe a needle span, row bins or regions that do not fit the long prompt"
    want = {"short_map": (L, H, short["side"], short["side"]), "long_map": (L, H, long["side"], long["side"]),
            "long_regions_mean": (L, H, len(REGIONS)), "long_regions_last": (L, H, len(REGIONS)),
            "long_last_row": (L, H, long["row_bins"])}
    for name, shape in want.items():
        a = arrays.get(name)
        if a is None:
            return f"lack the array {name}"
        if a.shape != shape or a.dtype.kind != "f":
            return f"hold {name} as {a.dtype} {list(a.shape)}, not floats {list(shape)}"
        if not np.isfinite(a).all():
            return f"hold values in {name} that are not finite"
    return None


def _is_ints(v: Any, n: int | None = None, lo: int = 0, hi: int | None = None) -> bool:
    return (isinstance(v, list) and (n is None or len(v) == n)
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= lo and (hi is None or x < hi) for x in v))


def _check_image_arrays(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str | None:
    """_check_arrays for an image model's samples: the queries, grid, labels and names against the geometry,
    the arrays against them. (The metadata's schema checks types; this checks that the parts agree.)"""
    g, im = meta["geometry"], meta["images"]
    if not isinstance(im, dict) or not isinstance(g.get("patch_grid"), list):
        return "describe images for a model without a patch grid"
    L, H = g["n_layers"], g["n_heads"]
    R, C = g["patch_grid"]
    P, T = g.get("prefix_tokens", 0), g.get("prefix_tokens", 0) + R * C + g.get("suffix_tokens", 0)
    n, queries, grid = im.get("count"), im.get("queries"), im.get("query_grid")
    if not (isinstance(n, int) and 1 <= n <= SAMPLE_IMAGES) or im.get("tokens") != T:
        return f"describe {n!r} images of {im.get('tokens')!r} tokens, not 1 to {SAMPLE_IMAGES} images of {T}"
    if not (isinstance(grid, list) and len(grid) == 2 and _is_ints(grid[0], None, 0, R)
            and _is_ints(grid[1], None, 0, C) and grid[0] and grid[1]):
        return "describe a query grid that is not rows and columns of the patch grid"
    want = list(range(P)) + [P + r * C + c for r in grid[0] for c in grid[1]]
    if queries != want:
        return "list query tokens other than the prefix tokens and the patches of their query grid"
    for key in ("labels", "predictions"):
        if im.get(key) is not None and not _is_ints(im[key], n):
            return f"hold {key} that are not {n} class numbers"
    names, prefix = im.get("class_names", {}), im.get("prefix_names")
    if (not _is_strings(im.get("sources"), n) or not _is_strings(prefix, P) or not isinstance(names, dict)
            or not _is_strings(list(names.values()))):
        return f"hold sources, prefix names or class names that are not {n}, {P} and any strings"
    side = im.get("thumbnail_side")
    want_shapes = {"image_attention": ((n, L, H, len(want), T), "f"), "thumbnails": ((n, side, side, 3), "u")}
    for name, (shape, kind) in want_shapes.items():
        a = arrays.get(name)
        if a is None:
            return f"lack the array {name}"
        if a.shape != shape or a.dtype.kind != kind:
            return f"hold {name} as {a.dtype} {list(a.shape)}, not {'floats' if kind == 'f' else 'uint8'} {list(shape)}"
    if arrays["thumbnails"].dtype != np.uint8:
        return "hold thumbnails that are not uint8"
    if not np.isfinite(arrays["image_attention"]).all():
        return "hold values in image_attention that are not finite"
    return None


def _is_strings(v: Any, n: int | None = None) -> bool:
    return isinstance(v, list) and (n is None or len(v) == n) and all(isinstance(x, str) for x in v)


def read_samples(atlas_dir: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any], bytes, bytes] | None:
    """(arrays, metadata, the .safetensors bytes, the .json bytes), checked to belong together (atlas.py
    read_samples_files) and the arrays to fit their metadata, or None when the directory has no samples."""
    found = read_samples_files(atlas_dir)
    if found is None:
        return None
    problem = _check_arrays(found[0], found[1])
    if problem is not None:
        raise HeadwiseError(one_line(f"the attention samples in {atlas_dir} {problem}; {recollect(atlas_dir)}"))
    return found


def load_samples(atlas_dir: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """(arrays, metadata) saved by collect_samples, or None when the directory has none."""
    samples = read_samples(atlas_dir)
    return None if samples is None else samples[:2]


__all__ = ["BOUND_SETTINGS", "IMAGE_BOUND_SETTINGS", "IMAGE_BUDGET", "MAX_QUERY_PATCHES", "MAX_TENSOR_BYTES", "REGIONS",
           "SAMPLES_JSON", "SAMPLES_TENSORS", "SAMPLE_IMAGES", "PooledAttention", "QueryRows", "binding_problem",
           "bound_settings", "image_sample_plan", "load_samples", "map_side", "meta_text", "query_grid", "read_samples",
           "recollect", "sample_attention", "sample_images"]
