"""Pattern summary: every head's attention maps compressed by a small autoencoder, with PCA as the baseline.

The ViT visual-analytics paper (Li et al. 2023, arXiv 2303.13731) summarises "all possible
attention patterns that individual heads could learn" with an autoencoder trained on the heads'
attention maps seen as images. Here:

- Maps. Image models: for each probe image and each of `pattern_queries` query patches (evenly
  spaced in row-major order), the head's attention over the patch keys as an R x C image, divided
  by its sum (the mass on CLS/registers is dropped). Language models: the head's T x T map over
  each of `pattern_sequences` natural-text sequences of `pattern_context` tokens, pooled to
  `pattern_side` x `pattern_side` (mean of blocks, then each row renormalised).
- Autoencoder: cells -> 64 -> `pattern_latent` -> 64 -> cells, fully connected, trained with Adam
  on the maps of all heads (MSE), seeded, on one thread (`train_autoencoder`). The network sees
  each map scaled so that its mean cell is 1 (a uniform map is all ones), so one learning rate fits
  a 4 x 4 and a 14 x 14 grid; pattern_ae_error is in those units. The k-means groups of a 16-head
  model move with the seed more than with the epochs: read them beside the PCA baseline's.
- Heads: a head's code is the mean latent code of its maps; heads are placed in 2D by PCA of the
  codes and grouped by k-means on them. Each group shows the decoder's output for its centroid
  and the mean input map of its heads.
- Baseline: PCA to `pattern_latent` components fit on the very same maps, then the same head
  codes, placement and grouping. Deterministic, and a check on whether the network adds anything.

Departures from the paper, and why: fully connected layers instead of convolutions (a 4 x 4 or
16 x 16 map is too small for convolutions to pay, and text maps are not translation invariant);
one code per head (the mean latent code of its maps) rather than a scatter of single maps, so that
heads, the atlas's unit, are what is placed and grouped; PCA of the codes for 2D instead of a 2D
bottleneck, so that the latent keeps room for more than two pattern axes; text maps pooled to a
fixed side, since the paper only treats images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._progress import progress
from ..errors import HeadwiseError
from ..geometry import Geometry
from ..instrument import AttentionChunk, Observer, Session, check_tokens
from ..probes import Probe, natural_text
from .base import ComputedScoreFamily, Score, ScoreResult, Setting
from .shared_probes import IMAGE_SETTINGS, make_image_probe

HIDDEN = 64  # units of the autoencoder's hidden layers
MAX_BATCH = 256  # maps per Adam step, fewer for small map sets (train_batch)
LEARNING_RATE = 1e-3
FORWARD_BATCH = 8  # probe inputs per observed forward pass


@dataclass
class PatternMaps:
    """maps [layers, heads, n, rows * cols] float32, each a distribution over patches (images) or a
    row-normalised pooled map (text); `scale` turns a map into mean-1-per-cell units."""

    maps: np.ndarray
    side: tuple[int, int]
    scale: float
    probe: Probe
    probe_name: str


@dataclass
class Summary:
    """One method's summary of the heads: codes, 2D placement and groups (head index = layer * H + head)."""

    codes: np.ndarray  # [heads, latent]
    coords: np.ndarray  # [heads, 2]
    groups: np.ndarray  # [heads] int, numbered by first appearance in layer-major order
    decoded: np.ndarray  # [groups, cells]: the decoder's map of each group centroid, in map units
    mean_maps: np.ndarray  # [groups, cells]: the mean input map of each group's heads
    errors: np.ndarray  # [heads]: mean reconstruction MSE of the head's maps (mean-1 units)
    info: dict[str, Any]


# ---- the maps -------------------------------------------------------------------------------------
def query_patches(n_patches: int, count: int) -> np.ndarray:
    """`count` patch indices evenly spaced over the row-major grid (the centre of each of `count` equal runs)."""
    count = min(count, n_patches)
    return (np.arange(count) * 2 + 1) * n_patches // (2 * count)


def pooling_matrix(length: int, side: int) -> Tensor:
    """[length, side]: 1/|block| where token t falls in block i (blocks [i*T//side, (i+1)*T//side))."""
    edges = np.arange(side + 1) * length // side
    pool = torch.zeros(length, side)
    for i in range(side):
        pool[edges[i]:edges[i + 1], i] = 1.0 / (edges[i + 1] - edges[i])
    return pool


class _PatchMaps(Observer):
    """The chosen query patches' attention over the patch keys, normalised over patches."""

    def __init__(self, geometry: Geometry, n_images: int, patches: np.ndarray):
        self.keys = slice(geometry.prefix_tokens, geometry.prefix_tokens + geometry.n_patches)
        self.slot = torch.full((geometry.n_tokens,), -1, dtype=torch.long)  # token -> row of the map array
        self.slot[geometry.prefix_tokens + torch.from_numpy(patches)] = torch.arange(len(patches))
        self.maps = torch.zeros(geometry.n_layers, geometry.n_heads, n_images, len(patches), geometry.n_patches)
        self.start = 0
        self.n_tokens = geometry.n_tokens

    def observe(self, chunk: AttentionChunk) -> None:
        check_tokens(chunk, self.n_tokens)
        slots = self.slot[chunk.query_index.cpu()]
        rows = torch.nonzero(slots >= 0).flatten()
        if len(rows) == 0:
            return
        w = chunk.weights[:, :, rows.to(chunk.weights.device), self.keys].float()
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
        stop = self.start + w.shape[0]
        self.maps[chunk.layer][:, self.start:stop, slots[rows]] = w.transpose(0, 1).cpu()


class _PooledMaps(Observer):
    """Each head's causal T x T map pooled to side x side by block means (chunk by chunk)."""

    def __init__(self, geometry: Geometry, n_sequences: int, length: int, side: int):
        self.pool = pooling_matrix(length, side)
        self.maps = torch.zeros(geometry.n_layers, geometry.n_heads, n_sequences, side, side, dtype=torch.float64)
        self.start = 0

    def observe(self, chunk: AttentionChunk) -> None:
        w = chunk.weights.float()
        pool = self.pool.to(w.device)
        rows = pool[chunk.query_index]  # [chunk, side]
        pooled = rows.T @ (w @ pool[:w.shape[-1]])  # [batch, heads, side, side]
        stop = self.start + w.shape[0]
        self.maps[chunk.layer, :, self.start:stop] += pooled.transpose(0, 1).double().cpu()


def pattern_probe(preprocessor: Any, geometry: Geometry, settings: Any) -> tuple[Probe, str]:
    """The probe the maps are read from, and its name in the atlas (not the shared probes' names: their
    recorded settings would be overwritten)."""
    if geometry.modality == "image":
        return make_image_probe(preprocessor, geometry, settings), "pattern_images"
    geometry.check_context(settings.pattern_context)
    probe = natural_text(preprocessor, context=settings.pattern_context, n_sequences=settings.pattern_sequences,
                         seed=settings.seed, text=settings.text, name="pattern_text")
    return probe, "pattern_text"


def collect_maps(loaded: Any, settings: Any) -> PatternMaps:
    """Every head's attention maps over the family's probe (one observed forward pass per batch)."""
    g = loaded.geometry
    probe, name = pattern_probe(loaded.preprocessor, g, settings)
    n = probe.n_sequences
    if g.modality == "image":
        observer: _PatchMaps | _PooledMaps = _PatchMaps(g, n, query_patches(g.n_patches, settings.pattern_queries))
        side, scale = g.patch_grid, float(g.n_patches)
    else:
        side_len = settings.pattern_side
        observer = _PooledMaps(g, n, probe.length, side_len)
        side, scale = (side_len, side_len), float(side_len)  # each row sums to 1: side cells per unit of mass
    batches = range(0, n, FORWARD_BATCH)
    with torch.inference_mode(), Session(g, [observer], chunk_bytes=settings.chunk_bytes):
        for start in progress(batches, desc="pattern maps", total=len(batches), unit="batch"):
            observer.start = start
            batch = probe.input_ids[start:start + FORWARD_BATCH].to(loaded.device)
            loaded.model(**probe.model_inputs(batch))
    maps = observer.maps
    if isinstance(observer, _PooledMaps):
        maps = maps / maps.sum(-1, keepdim=True).clamp_min(1e-30)
    maps = maps.reshape(g.n_layers, g.n_heads, -1, side[0] * side[1]).float().numpy()
    return PatternMaps(maps=maps, side=(int(side[0]), int(side[1])), scale=scale, probe=probe, probe_name=name)


# ---- placement and groups (shared by both methods) ----------------------------------------------
def _fix_signs(vt: np.ndarray) -> np.ndarray:
    """SVD's signs are arbitrary: make each component's largest-|value| loading positive."""
    return vt * np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]


def layout_2d(codes: np.ndarray) -> np.ndarray:
    """[n, 2]: the head codes projected on their first two principal components."""
    z = codes - codes.mean(0)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    coords = np.zeros((len(codes), 2))
    k = min(2, len(vt))
    coords[:, :k] = z @ _fix_signs(vt[:k]).T
    return coords


def group_heads(codes: np.ndarray, groups: int, seed: int) -> np.ndarray:
    """k-means labels, renumbered by first appearance so that equal partitions get equal labels."""
    from sklearn.cluster import KMeans

    k = min(groups, len(np.unique(codes.round(8), axis=0)))
    if k <= 1:
        return np.zeros(len(codes), dtype=int)
    labels = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(codes).labels_
    order = {old: new for new, old in enumerate(dict.fromkeys(labels.tolist()))}
    return np.array([order[label] for label in labels.tolist()])


def _group_means(per_head: np.ndarray, groups: np.ndarray) -> np.ndarray:
    return np.stack([per_head[groups == g].mean(0) for g in range(groups.max() + 1)])


# ---- the two methods -----------------------------------------------------------------------------
def train_batch(n_maps: int) -> int:
    """Maps per Adam step: 256, or fewer so that an epoch has 64 steps. A language model has few maps (8 per head),
    and 40 epochs of a handful of steps each left SmolLM2's autoencoder worse than PCA."""
    return max(16, min(MAX_BATCH, n_maps // 64))


def train_autoencoder(x: Tensor, latent: int, epochs: int, seed: int) -> tuple[nn.Module, nn.Module, list[float]]:
    """(encoder, decoder, mean loss of each epoch) on maps x [n, cells], seeded and single-process."""
    # One thread: the network is too small to gain from more (with 2 threads on 2 busy cores an epoch took 30x
    # longer), and the weights then do not depend on the machine's thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # A private RNG state: seeding must not change the random numbers the caller draws afterwards.
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(seed)
            encoder = nn.Sequential(nn.Linear(x.shape[1], HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, latent))
            decoder = nn.Sequential(nn.Linear(latent, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, x.shape[1]))
            optimiser = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=LEARNING_RATE)
            shuffle = torch.Generator().manual_seed(seed)
            size = train_batch(len(x))
            losses = []
            for _ in progress(range(epochs), desc="pattern autoencoder", total=epochs, unit="epoch"):
                order = torch.randperm(len(x), generator=shuffle)
                total = 0.0
                for start in range(0, len(x), size):
                    batch = x[order[start:start + size]]
                    loss = ((decoder(encoder(batch)) - batch) ** 2).mean()
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    total += loss.item() * len(batch)
                losses.append(total / len(x))
    finally:
        torch.set_num_threads(threads)
    return encoder.eval(), decoder.eval(), losses


def autoencoder_summary(maps: PatternMaps, *, latent: int, epochs: int, groups: int, seed: int) -> Summary:
    L, H, n, cells = maps.maps.shape
    x = torch.from_numpy(maps.maps.reshape(-1, cells) * maps.scale)
    encoder, decoder, losses = train_autoencoder(x, latent, epochs, seed)
    with torch.no_grad():
        code = encoder(x)
        errors = ((decoder(code) - x) ** 2).mean(-1)
    codes = code.reshape(L * H, n, latent).mean(1).double().numpy()
    labels = group_heads(codes, groups, seed)
    with torch.no_grad():
        decoded = decoder(torch.from_numpy(_group_means(codes, labels)).float()).double().numpy() / maps.scale
    head_error = errors.reshape(L * H, n).mean(1).double().numpy()
    info = {"loss_first_epoch": round(losses[0], 6), "final_loss": round(float(head_error.mean()), 6)}
    return Summary(codes=codes, coords=layout_2d(codes), groups=labels, decoded=decoded,
                   mean_maps=_group_means(maps.maps.mean(2).reshape(L * H, cells), labels), errors=head_error,
                   info=info)


def pca_summary(maps: PatternMaps, *, latent: int, groups: int, seed: int) -> Summary:
    """The baseline: PCA of all maps (SVD of their scatter matrix: the same right singular vectors as the
    SVD of the centred maps, without an n x cells U), head code = mean projection of its maps."""
    L, H, n, cells = maps.maps.shape
    x = maps.maps.reshape(-1, cells).astype(np.float64) * maps.scale
    mean = x.mean(0)
    x -= mean
    _, var, vt = np.linalg.svd(x.T @ x)
    components = _fix_signs(vt[:latent])
    projected = x @ components.T
    codes = projected.reshape(L * H, n, -1).mean(1)
    # Orthonormal components: the residual's squared norm is |x|^2 - |projection|^2 (no n x cells temporary).
    errors = np.clip((x**2).sum(-1) - (projected**2).sum(-1), 0.0, None).reshape(L * H, n).mean(1) / cells
    labels = group_heads(codes, groups, seed)
    decoded = (mean + _group_means(codes, labels) @ components) / maps.scale
    explained = var / var.sum() if var.sum() > 0 else np.zeros_like(var)
    info = {"explained_variance": [round(float(v), 6) for v in explained[:latent]],
            "final_loss": round(float(errors.mean()), 6)}
    return Summary(codes=codes, coords=layout_2d(codes), groups=labels, decoded=decoded,
                   mean_maps=_group_means(maps.maps.mean(2).reshape(L * H, cells), labels), errors=errors, info=info)


def _profile(summary: Summary, L: int, H: int, side: tuple[int, int], description: str, method: str,
             settings: dict[str, Any]) -> dict[str, Any]:
    values = np.concatenate([summary.coords, summary.groups[:, None]], 1).reshape(L, H, 3)
    records = [{"group": g, "heads": [[int(i) // H, int(i) % H] for i in np.flatnonzero(summary.groups == g)],
                "decoded": [round(float(v), 6) for v in summary.decoded[g]],
                "mean_map": [round(float(v), 6) for v in summary.mean_maps[g]], "side": list(side)}
               for g in range(len(summary.decoded))]
    return {"values": values.round(6), "bins": ["x", "y", "group"], "description": description, "records": records,
            "method": method, "settings": {**settings, **summary.info}}


def neighbour_role_agreement(coords: np.ndarray, labels: list[set[str]] | list[str], k: int = 3) -> float:
    """Share of (head, neighbour) pairs, over each head's k nearest neighbours (Euclidean, ties by index),
    whose role labels intersect; a head without a label counts as labelled "none"."""
    coords = np.asarray(coords, dtype=float).reshape(len(labels), -1)
    n = len(coords)
    if k < 1:
        raise HeadwiseError(f"k must be at least 1, got {k}")
    if n < 2:
        return float("nan")
    sets = [({lab} if isinstance(lab, str) else set(lab or ())) or {"none"} for lab in labels]
    k = min(k, n - 1)
    agree = 0
    for start in range(0, n, 512):  # blocks of rows: a 70B-class model's 5,120 heads need no n x n x d array
        block = coords[start:start + 512]
        distance = np.linalg.norm(block[:, None] - coords[None], axis=-1)
        distance[np.arange(len(block)), np.arange(start, start + len(block))] = np.inf
        for i, row in enumerate(np.argsort(distance, axis=1, kind="stable")[:, :k], start):
            agree += sum(bool(sets[i] & sets[j]) for j in row)
    return agree / (n * k)


class AutoencoderPatterns(ComputedScoreFamily):
    family = "pattern_summary"
    modalities = ("text", "image")
    scores = (
        Score("pattern_ae_error", "mean reconstruction MSE of the head's attention maps under the pattern "
                                  "autoencoder (maps scaled to mean 1 per cell; Li et al. 2023, arXiv 2303.13731)",
              default=("image",)),
    )
    settings = (
        Setting("pattern_context", 64, "tokens per text sequence of the pattern summary", minimum=2),
        Setting("pattern_sequences", 8, "text sequences of the pattern summary (one map per sequence)", minimum=1),
        Setting("pattern_side", 16, "side of the pooled text attention map of the pattern summary", minimum=2,
                maximum=64),
        Setting("pattern_queries", 16, "query patches per image of the pattern summary (evenly spaced)", minimum=1),
        Setting("pattern_latent", 8, "latent units of the pattern autoencoder (and PCA components)", minimum=1),
        Setting("pattern_epochs", 40, "training epochs of the pattern autoencoder", minimum=1),
        Setting("pattern_groups", 6, "k-means groups of heads in the pattern summary", minimum=1),
        *IMAGE_SETTINGS,
    )

    def check(self, geometry: Geometry, settings: Any) -> None:
        if geometry.modality == "text":
            geometry.check_context(settings.pattern_context)
            if settings.pattern_side > settings.pattern_context:
                raise HeadwiseError(f"--pattern-side ({settings.pattern_side}) must be at most --pattern-context "
                                    f"({settings.pattern_context}): a pooled cell needs at least one token")

    def compute(self, loaded: Any, settings: Any, names: list[str]) -> ScoreResult:
        g = loaded.geometry
        maps = collect_maps(loaded, settings)
        cells = maps.maps.shape[-1]
        latent = min(settings.pattern_latent, cells)  # PCA cannot have more components than cells
        image = g.modality == "image"
        shape = {"pattern_queries": min(settings.pattern_queries, g.n_patches)} if image else {
            "pattern_context": settings.pattern_context, "pattern_sequences": settings.pattern_sequences,
            "pattern_side": settings.pattern_side}
        run = {**maps.probe.settings, "probe": maps.probe_name, **shape, "pattern_latent": latent,
               "pattern_epochs": settings.pattern_epochs, "pattern_groups": settings.pattern_groups,
               "train_batch": train_batch(maps.maps[..., 0].size),
               "side": list(maps.side), "maps_per_head": maps.maps.shape[2], "n_maps": maps.maps[..., 0].size}
        # No timings recorded: an atlas is a function of the model, the settings and the seed.
        ae = autoencoder_summary(maps, latent=latent, epochs=settings.pattern_epochs,
                                 groups=settings.pattern_groups, seed=settings.seed)
        pca = pca_summary(maps, latent=latent, groups=settings.pattern_groups, seed=settings.seed)
        run.update({"ae_final_loss": ae.info["final_loss"], "pca_final_loss": pca.info["final_loss"],
                    "pca_explained_variance": pca.info["explained_variance"]})
        what = "patch attention maps (query patch over patch keys)" if image else "pooled text attention maps"
        place = "(x, y): PCA of the heads' mean codes; group: k-means on the codes"
        profiles = {
            "pattern_ae": _profile(ae, g.n_layers, g.n_heads, maps.side, f"heads placed by an autoencoder of their "
                                   f"{what}; {place}", f"fully connected autoencoder {cells}-{HIDDEN}-{latent}-"
                                   f"{HIDDEN}-{cells}, Adam, MSE; head code = mean latent code of its maps", run),
            "pattern_pca": _profile(pca, g.n_layers, g.n_heads, maps.side, f"heads placed by PCA of their {what}; "
                                    f"{place}", f"PCA ({latent} components) of all maps; head code = mean "
                                    f"projection of its maps", run),
        }
        scores = {"pattern_ae_error": ae.errors.reshape(g.n_layers, g.n_heads)}
        return ScoreResult(scores=scores, profiles=profiles, settings=run)


__all__ = ["AutoencoderPatterns", "PatternMaps", "Summary", "autoencoder_summary", "collect_maps", "group_heads",
           "layout_2d", "neighbour_role_agreement", "pattern_probe", "pca_summary", "pooling_matrix",
           "query_patches", "train_autoencoder", "train_batch"]
