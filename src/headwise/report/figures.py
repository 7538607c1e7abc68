"""Static PNG figures of an atlas for papers and READMEs (matplotlib, optional extra `plot`).

grid.png          every score as a layers x heads heatmap (KV-head groups marked), role badges on the chosen score
layer_trends.png  each score's distribution over a layer's heads (median and interquartile band)
pattern_map.png   the pattern map (see layout.py), coloured by role

Image models also get, from what their atlas and samples hold:
image_overlays.png      every head's attention over the first sampled image from its central query patch
relative_position.png   every head's relative-position map (centre: the query's own patch)
spatial_distance.png    attention strength vs distance in patches, per layer: each head and the layer mean
attention_distance.png  mean attention distance per layer (each head, median), as in ViT's Fig. 7
pattern_summary.png     the autoencoder and PCA layouts of the heads by group, with each group's maps
importance.png          the heads ranked by importance_accuracy, and the validation of the "important" role
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from .._plotting import pyplot
from ..errors import HeadwiseError
from .layout import (
    neighbour_role_share,
    pattern_layouts,
    pattern_map,
    relative_position_map,
    spatial_distance_profile,
)

_ROLE_COLOURS = ["#e8590c", "#1c7ed6", "#2b8a3e", "#ae3ec9", "#f59f00", "#0ca678", "#e03131", "#5c7cfa"]


def _pyplot():
    return pyplot(required_by="headwise plot")


def _roles_in_order(atlas) -> list[str]:
    roles = [r["role"] for r in atlas.data["roles"]["rules"]]
    for row in atlas.data["roles"]["labels"]:
        for labels in row:
            roles += [r for r in labels if r not in roles]
    return list(dict.fromkeys(roles))


def plot_atlas(atlas_dir: str | Path, out_dir: str | Path | None = None, score: str | None = None) -> list[Path]:
    """Write the figures into out_dir (default ATLAS/figures), all three or none.

    Figures inside the atlas directory (the default ATLAS/figures, or ATLAS itself) join the atlas's
    unit: a command that writes a new atlas there removes them with the old atlas they showed, and
    `headwise report` keeps them. Figures elsewhere are a unit of their own. The atlas is checked
    against the directory's manifest first, as `headwise report` checks it.
    """
    from .._io import MANIFEST_FILE, output_location, staged_outputs, verify_unit
    from ..atlas import FILENAME, Atlas
    from .html import UNIT_FILES, atlas_directory, matching_samples

    plt = _pyplot()
    atlas = Atlas.load(atlas_directory(atlas_dir))
    atlas_dir = atlas.directory
    verify_unit(atlas_dir, [FILENAME])
    names = atlas.score_names
    if not names:
        raise HeadwiseError(f"the atlas in {atlas_dir} has no scores to plot")
    if score is not None and score not in names:
        raise HeadwiseError(f"this atlas has no score '{score}' (it has: {', '.join(names)})")
    samples = matching_samples(atlas.data, atlas_dir)  # the pattern map's features: only samples of this atlas
    out = Path(out_dir) if out_dir else atlas_dir / "figures"
    prefix = _inside(out, atlas_dir)
    inside = prefix is not None
    unit = atlas_dir if inside else out
    since = {"since": atlas.unit_version} if inside else {}  # the unit as the atlas drawn was read
    with output_location(out, what="the figures"), staged_outputs(unit, what="the figures", **since) as stage:
        paths = _draw(plt, atlas, samples, score, stage, prefix or "")
        if inside:  # the figures join the atlas's unit (even one without a manifest)
            for name in UNIT_FILES:
                if (unit / name).is_file():
                    stage.keep(name)
            if prefix and (out / MANIFEST_FILE).is_file():  # figures/ was a unit of its own before it joined
                stage.remove(prefix + MANIFEST_FILE)
        stage.keep_others()
    return [out / p for p in paths]


def _inside(out: Path, atlas_dir: Path) -> str | None:
    """Where `out` lies in the atlas directory, as a prefix of unit names ("" for the directory itself,
    "figures/"), or None when it lies elsewhere."""
    out, base = out.resolve(), atlas_dir.resolve()
    if not out.is_relative_to(base):
        return None
    where = out.relative_to(base).as_posix()
    if where.startswith(".headwise"):  # headwise's own hidden names: not a place for a unit's files
        return None
    return "" if where == "." else where + "/"


def _draw(plt, atlas, samples, score, stage, prefix: str) -> list[str]:
    names = atlas.score_names
    g = atlas.geometry
    spec = str(atlas.model.get("spec", ""))
    roles = _roles_in_order(atlas)
    colour = {r: _ROLE_COLOURS[i % len(_ROLE_COLOURS)] for i, r in enumerate(roles)}
    paths = []

    # grid: one heatmap per score
    cols = min(len(names), 5)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols + 0.5, 0.16 * g.n_layers * rows + 1.2 * rows + 0.5),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        values = atlas.score(name)
        im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="viridis", interpolation="nearest")
        for k in range(1, g.n_kv_heads):
            ax.axvline(k * g.group_size - 0.5, color="white", lw=1.2)
        if name == (score or names[0]):
            badges = [(head + 0.3 - 0.25 * j, layer + 0.3, colour[role])
                      for layer, row in enumerate(atlas.data["roles"]["labels"])
                      for head, labels in enumerate(row) for j, role in enumerate(labels[:3])]
            if badges:
                bx, by, bc = zip(*badges)
                ax.scatter(bx, by, s=6, c=list(bc), edgecolors="white", linewidths=0.3)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("head", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{spec}: scores per head (white lines: KV-head groups)", fontsize=9)
    fig.tight_layout()
    paths.append(_save(fig, stage, prefix, "grid.png", plt))

    # layer trends
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 0.5, 1.9 * rows + 0.5), squeeze=False)
    layers = np.arange(g.n_layers)
    for ax, name in zip(axes.flat, names):
        values = atlas.score(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a layer whose heads are all NaN
            q1, med, q3 = np.nanpercentile(values, [25, 50, 75], axis=1)
        ax.fill_between(layers, q1, q3, color="#a5b4e8", lw=0)
        ax.plot(layers, med, color="#364fc7", lw=1.2)
        ax.scatter(np.repeat(layers, g.n_heads), values.ravel(), s=2, color="#495057", alpha=0.5, lw=0)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("layer", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{spec}: each score per layer (median, interquartile band, heads)", fontsize=9)
    fig.tight_layout()
    paths.append(_save(fig, stage, prefix, "layer_trends.png", plt))

    # pattern map
    layout = pattern_map(atlas.data, samples)
    x, y = np.array(layout["x"]), np.array(layout["y"])
    primary = [labels[0] if labels else "" for row in atlas.data["roles"]["labels"] for labels in row]
    if not primary:
        primary = [""] * len(x)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for role in [""] + roles:
        mask = np.array([p == role for p in primary])
        if mask.any():
            ax.scatter(x[mask], y[mask], s=14, color=colour.get(role, "#adb5bd"), label=role or "no role",
                       edgecolor="white", lw=0.4)
    ax.set_xlabel(f"PC1 ({100 * layout['explained'][0]:.0f}% of variance)", fontsize=8)
    ax.set_ylabel(f"PC2 ({100 * layout['explained'][1]:.0f}%)", fontsize=8)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(f"{spec}: heads by attention pattern ({len(layout['features'])} features, PCA)", fontsize=9)
    fig.tight_layout()
    paths.append(_save(fig, stage, prefix, "pattern_map.png", plt))
    if g.patch_grid is not None:
        paths += _image_figures(plt, atlas, samples, stage, prefix)
    return paths


# ---- image models ------------------------------------------------------------------------------------
_HOT = np.array([[70, 0, 0], [190, 30, 0], [250, 120, 0], [255, 205, 0], [255, 255, 190]], dtype=float) / 255


def _ramp(t: np.ndarray) -> np.ndarray:
    """RGB of t in [0, 1] on the page's overlay ramp (report.js HOT)."""
    t = np.clip(t, 0, 1) * (len(_HOT) - 1)
    i = np.minimum(len(_HOT) - 2, np.floor(t).astype(int))
    f = (t - i)[..., None]
    return _HOT[i] * (1 - f) + _HOT[i + 1] * f


def _upsample(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """a [r, c, ...] to [rows, cols, ...] by nearest cells (as the page's canvases scale)."""
    r = np.arange(rows) * a.shape[0] // rows
    c = np.arange(cols) * a.shape[1] // cols
    return a[r][:, c]


def _mosaic(tiles: np.ndarray, gap: int = 2, fill: float = 1.0) -> np.ndarray:
    """tiles [L, H, h, w, 3] as one [L*(h+gap), H*(w+gap), 3] image (white gaps)."""
    L, H, h, w = tiles.shape[:4]
    out = np.full((L * (h + gap) - gap, H * (w + gap) - gap, 3), fill)
    for layer in range(L):
        for head in range(H):
            out[layer * (h + gap):layer * (h + gap) + h, head * (w + gap):head * (w + gap) + w] = tiles[layer, head]
    return out


def _mosaic_axes(ax, L: int, H: int, h: int, w: int, gap: int = 2) -> None:
    ax.set_xticks([k * (w + gap) + w / 2 for k in range(H)], [f"H{k}" for k in range(H)], fontsize=6)
    ax.set_yticks([k * (h + gap) + h / 2 for k in range(L)], [f"L{k}" for k in range(L)], fontsize=6)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)


def central_query(meta: dict) -> int:
    """Row of the sampled query patch nearest the grid's centre (ties: the first)."""
    g = meta["geometry"]
    R, C = g["patch_grid"]
    prefix = g.get("prefix_tokens", 0)
    best, row = None, 0
    for j, q in enumerate(meta["images"]["queries"]):
        if q < prefix:
            continue
        r, c = divmod(q - prefix, C)
        d = (r - (R - 1) / 2) ** 2 + (c - (C - 1) / 2) ** 2
        if best is None or d < best:
            best, row = d, j
    return row


def _image_figures(plt, atlas, samples, stage, prefix: str) -> list[str]:
    g = atlas.geometry
    spec = str(atlas.model.get("spec", ""))
    L, H, (R, C) = g.n_layers, g.n_heads, g.patch_grid
    paths = []
    arrays, meta = samples if samples is not None else ({}, {})
    if "image_attention" in arrays and isinstance(meta.get("images"), dict):
        paths.append(_image_overlays(plt, arrays, meta, spec, stage, prefix))
    rel = relative_position_map(atlas.data)
    if rel is not None:
        side = max(24, 4 * max(2 * R - 1, 2 * C - 1))
        peak = np.nanmax(np.where(np.isnan(rel), -np.inf, rel), axis=(2, 3), keepdims=True)
        t = np.sqrt(np.nan_to_num(rel, nan=0.0).clip(min=0) / np.where(peak > 0, peak, 1.0))
        import matplotlib

        tiles = matplotlib.colormaps["viridis"](t)[..., :3]  # [L, H, 2R-1, 2C-1, 3]
        tiles = np.stack([[_upsample(tiles[a, b], side, side) for b in range(H)] for a in range(L)])
        fig, ax = plt.subplots(figsize=(min(16, 1.0 + 0.75 * H), min(16, 0.9 + 0.75 * L)))
        ax.imshow(_mosaic(tiles), interpolation="nearest")
        _mosaic_axes(ax, L, H, side, side)
        fig.suptitle(f"{spec}: relative-position maps ({2 * R - 1} x {2 * C - 1} offsets)\ncentre: the query's own "
                     f"patch; sqrt of each head's map over its max", fontsize=8)
        fig.tight_layout()
        paths.append(_save(fig, stage, prefix, "relative_position.png", plt))
    spatial = spatial_distance_profile(atlas.data)
    if spatial is not None:
        values = np.nan_to_num(spatial[0], nan=0.0)
        bins = atlas.data["profiles"]["spatial_distance"]["bins"]
        x = [(lo + hi) / 2 for lo, hi in bins]
        cols = min(L, 4)
        rows = math.ceil(L / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 0.5, 2.0 * rows + 0.6), squeeze=False,
                                 sharex=True, sharey=True)
        colours = plt.get_cmap("tab10" if H <= 10 else "viridis")(np.linspace(0, 1, H) if H > 10 else np.arange(H))
        for layer, ax in zip(range(L), axes.flat):
            for head in range(H):
                ax.plot(x, values[layer, head], lw=0.8, color=colours[head], alpha=0.8)
            ax.plot(x, values[layer].mean(0), lw=2.0, color="black", label="layer mean")
            ax.set_title(f"layer {layer}", fontsize=8)
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[L:]:
            ax.axis("off")
        axes[0, 0].legend(fontsize=6, frameon=False)
        fig.supxlabel("distance in patches (ring centre)", fontsize=7)
        fig.supylabel("mean attention per patch pair", fontsize=7)
        fig.suptitle(f"{spec}: attention strength vs distance (thin: heads, black: layer mean)", fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, stage, prefix, "spatial_distance.png", plt))
    if "attention_distance" in atlas.data["scores"]:
        values = atlas.score("attention_distance")
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        layers = np.repeat(np.arange(L), H)
        ax.scatter(layers, values.ravel(), s=12, color="#364fc7", alpha=0.7, lw=0, label="heads")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a layer whose heads are all NaN
            ax.plot(np.arange(L), np.nanmedian(values, axis=1), color="#e8590c", lw=1.5, label="median")
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("mean attention distance (patches)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, frameon=False)
        ax.set_title(f"{spec}: attention distance per layer", fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, stage, prefix, "attention_distance.png", plt))
    layouts = pattern_layouts(atlas.data)
    if layouts:
        paths.append(_pattern_summary(plt, atlas, layouts, spec, stage, prefix))
    if "importance_accuracy" in atlas.data["scores"]:
        paths.append(_importance(plt, atlas, spec, stage, prefix))
    return paths


def _image_overlays(plt, arrays, meta, spec: str, stage, prefix: str) -> str:
    """The first sampled image, every head's attention from its central query patch over the patches."""
    g, im = meta["geometry"], meta["images"]
    R, C = g["patch_grid"]
    P = g.get("prefix_tokens", 0)
    a = np.asarray(arrays["image_attention"], dtype=float)[0]  # [L, H, queries, tokens]
    L, H = a.shape[:2]
    row = central_query(meta)
    query = im["queries"][row] - P
    patches = a[:, :, row, P:P + R * C].reshape(L, H, R, C)
    peak = patches.max((2, 3), keepdims=True)
    t = patches / np.where(peak > 0, peak, 1.0)
    thumb = arrays["thumbnails"][0].astype(float) / 255
    side = thumb.shape[0]
    heat = _upsample(np.moveaxis(t, (0, 1), (2, 3)), side, side)  # [side, side, L, H]
    heat = np.moveaxis(heat, (2, 3), (0, 1))
    alpha = (0.05 + 0.8 * heat)[..., None]  # as the page draws them: the image shows through
    tiles = (1 - alpha) * (0.45 * thumb) + alpha * _ramp(heat)
    qr, qc = divmod(query, C)
    y0, y1 = qr * side // R, (qr + 1) * side // R - 1
    x0, x1 = qc * side // C, (qc + 1) * side // C - 1
    cyan = np.array([34, 211, 238]) / 255
    for y in (y0, y1):
        tiles[:, :, y, x0:x1 + 1] = cyan
    for x in (x0, x1):
        tiles[:, :, y0:y1 + 1, x] = cyan
    fig, (ax0, ax) = plt.subplots(1, 2, figsize=(min(18, 3.0 + 0.8 * H), min(18, 0.9 + 0.8 * L)),
                                  gridspec_kw={"width_ratios": [1.2, max(1.0, H * 1.0)]})
    ax0.imshow(thumb, interpolation="nearest")
    ax0.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, color=cyan, lw=1.5))
    label = []
    names = im.get("class_names", {})
    for key in ("labels", "predictions"):
        if im.get(key) is not None:
            k = im[key][0]
            label.append(f"{key[:-1]} {k}" + (f" ({names[str(k)]})" if str(k) in names else ""))
    ax0.set_title(", ".join(label) or "image 1", fontsize=7)
    ax0.axis("off")
    ax.imshow(_mosaic(tiles), interpolation="nearest")
    _mosaic_axes(ax, L, H, side, side)
    fig.suptitle(f"{spec}: every head's attention from patch ({qr}, {qc}) (cyan) over the first sampled image\n"
                 f"rows: layers, columns: heads; each scaled to its brightest patch", fontsize=8)
    fig.tight_layout()
    return _save(fig, stage, prefix, "image_overlays.png", plt)


def _pattern_summary(plt, atlas, layouts, spec: str, stage, prefix: str) -> str:
    """Per layout (autoencoder, PCA): the heads by group, and each group's decoded and mean maps."""
    labels = [labels for row in atlas.data["roles"]["labels"] for labels in row] or [[] for _ in layouts[0]["x"]]
    n_groups = max(1, max(len(x["records"]) for x in layouts))
    fig = plt.figure(figsize=(5.0 + 1.5 * n_groups, 0.6 + 3.8 * len(layouts)))
    grid = fig.add_gridspec(len(layouts), 2, width_ratios=[3.2, 1.2 * n_groups])
    colours = plt.get_cmap("tab10")
    for k, layout in enumerate(layouts):
        ax = fig.add_subplot(grid[k, 0])
        groups = np.array([-1 if v is None else v for v in layout["group"]])
        for gr in sorted(set(groups.tolist())):
            mask = groups == gr
            ax.scatter(layout["x"][mask], layout["y"][mask], s=16, color="#adb5bd" if gr < 0 else colours(gr % 10),
                       edgecolor="white", lw=0.4, label="no group" if gr < 0 else f"group {gr}")
        share, chance = neighbour_role_share(layout["x"], layout["y"], labels)
        ax.set_title(f"{layout['label']}\n3 nearest neighbours in this 2D layout share a role label: "
                     f"{100 * share:.0f}% of pairs (chance {100 * chance:.0f}%)", fontsize=7)
        ax.legend(fontsize=6, frameon=False)
        ax.tick_params(labelsize=6)
        records = layout["records"]
        if records:
            sub = grid[k, 1].subgridspec(2, len(records), hspace=0.35, wspace=0.15)
            for j, r in enumerate(records):
                for i, (name, key) in enumerate((("decoded", "decoded"), ("mean", "mean_map"))):
                    mx = fig.add_subplot(sub[i, j])
                    mx.imshow(r[key].clip(min=0), cmap="Blues", interpolation="nearest")
                    mx.set_xticks([])
                    mx.set_yticks([])
                    for edge in mx.spines.values():
                        edge.set_color(colours(r["group"] % 10))
                        edge.set_linewidth(2)
                    mx.set_title(f"group {r['group']} {name}" if i == 0 else name, fontsize=6)
    fig.suptitle(f"{spec}: heads by attention pattern (pattern summary)\nright: each group's decoded centroid "
                 f"and the mean map of its heads", fontsize=9)
    fig.tight_layout()
    return _save(fig, stage, prefix, "pattern_summary.png", plt)


def _importance(plt, atlas, spec: str, stage, prefix: str) -> str:
    """The heads ranked by importance_accuracy (the most important 20), and the "important" role's validation."""
    g = atlas.geometry
    values = atlas.score("importance_accuracy").ravel()
    order = np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")[:20]
    checks = {k: v for k, v in atlas.data.get("validation", {}).items()
              if str(k).startswith("important@") and isinstance(v, dict)}
    zeroed = {(int(h[0]), int(h[1])) for v in checks.values() for h in v.get("targeted_heads") or []
              if isinstance(h, list) and len(h) >= 2}
    fig, axes = plt.subplots(1, 2 if checks else 1, figsize=(9 if checks else 5, 0.5 + 0.22 * len(order) + 0.8),
                             squeeze=False)
    ax = axes[0, 0]
    names = [f"L{i // g.n_heads}.H{i % g.n_heads}" for i in order]
    colour = ["#e03131" if (i // g.n_heads, i % g.n_heads) in zeroed else "#5b7bd5" for i in order]
    ax.barh(np.arange(len(order)), np.nan_to_num(values[order]), color=colour)
    ax.set_yticks(np.arange(len(order)), names, fontsize=6)
    ax.invert_yaxis()
    ax.tick_params(labelsize=6)
    ax.set_xlabel("importance_accuracy (accuracy drop, head zeroed alone)", fontsize=7)
    ax.set_title("heads ranked" + (" (red: zeroed in a validation)" if zeroed else ""), fontsize=8)
    if checks:
        ax = axes[0, 1]
        for y, v in enumerate(checks.values()):
            random = [float(x) for x in v.get("random") or [] if isinstance(x, (int, float))]
            ax.scatter(random, [y] * len(random), color="#adb5bd", s=20, label="random heads" if y == 0 else None)
            for name, colour, marker in (("baseline", "#495057", "|"), ("targeted", "#e03131", "o")):
                if isinstance(v.get(name), (int, float)):
                    ax.scatter([v[name]], [y], color=colour, marker=marker, s=60,
                               label=("unablated" if name == "baseline" else "top k zeroed") if y == 0 else None)
            verdict = str(v.get("verdict", ""))
            ax.text(0.0, y + 0.3, verdict[:70] + ("..." if len(verdict) > 70 else ""), fontsize=6,
                    transform=ax.get_yaxis_transform(), color="#2b8a3e" if v.get("passes") else "#c92a2a")
        ax.set_yticks(np.arange(len(checks)), list(checks), fontsize=7)
        ax.set_ylim(-0.6, len(checks) - 0.2)
        ax.invert_yaxis()
        ax.set_xlabel(str(next(iter(checks.values())).get("metric") or "metric"), fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, frameon=False, loc="lower right")
        ax.set_title("validation of the important role", fontsize=8)
    fig.suptitle(f"{spec}: head importance", fontsize=9)
    fig.tight_layout()
    return _save(fig, stage, prefix, "importance.png", plt)


def _save(fig, stage, prefix: str, name: str, plt) -> str:
    # No timestamps in the PNG metadata: the same atlas gives the same bytes.
    fig.savefig(stage.reserve(prefix + name), dpi=150, metadata={"Software": None})
    plt.close(fig)
    return name


__all__ = ["central_query", "plot_atlas"]
