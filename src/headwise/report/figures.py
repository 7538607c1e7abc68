"""Static PNG figures of an atlas for papers and READMEs (matplotlib, optional extra `plot`).

grid.png          every score as a layers x heads heatmap (KV-head groups marked), role badges on the chosen score
layer_trends.png  each score's distribution over a layer's heads (median and interquartile band)
pattern_map.png   the pattern map (see layout.py), coloured by role
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from ..errors import HeadwiseError
from .layout import pattern_map

_ROLE_COLOURS = ["#e8590c", "#1c7ed6", "#2b8a3e", "#ae3ec9", "#f59f00", "#0ca678", "#e03131", "#5c7cfa"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise HeadwiseError("headwise plot needs matplotlib: pip install 'headwise[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


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
    return paths


def _save(fig, stage, prefix: str, name: str, plt) -> str:
    # No timestamps in the PNG metadata: the same atlas gives the same bytes.
    fig.savefig(stage.reserve(prefix + name), dpi=150, metadata={"Software": None})
    plt.close(fig)
    return name


__all__ = ["plot_atlas"]
