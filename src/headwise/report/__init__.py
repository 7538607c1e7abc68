"""The atlas as a visual analytics report: one self-contained HTML page, plus static figures.

    write_report(atlas_dir) -> Path      atlas_dir/report.html (offline, no CDN)
    collect_samples(loaded, settings, atlas_dir)   the downsampled attention the page shows
    plot(atlas_dir) -> list[Path]        PNG figures (matplotlib; pip install headwise[plot])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .html import REPORT_FILE, render_html, write_report
from .samples import SAMPLES_JSON, SAMPLES_TENSORS, collect_samples, load_samples


def settings_of(atlas: Any):
    """The ProfileSettings an atlas was made with (what the attention samples should match)."""
    import dataclasses

    from ..profile import ProfileSettings

    saved = atlas.data.get("settings", {})
    known = {f.name for f in dataclasses.fields(ProfileSettings)}
    kwargs = {k: v for k, v in saved.items() if k in known}
    if kwargs.get("text") == "bundled":
        kwargs["text"] = None
    return ProfileSettings(**kwargs)


def collect_for_atlas(loaded: Any, atlas_dir: str | Path) -> Path:
    """Collect the attention samples for the atlas in atlas_dir, checking the model is the atlas's."""
    from ..atlas import Atlas

    atlas = Atlas.load(atlas_dir)
    atlas.check_model(loaded.info, loaded.geometry)
    return collect_samples(loaded, settings_of(atlas), atlas.directory)


def plot(atlas_dir: str | Path, out_dir: str | Path | None = None, score: str | None = None) -> list[Path]:
    """Static PNG figures (grid, layer trends, pattern map) of the atlas in atlas_dir."""
    from .figures import plot_atlas

    return plot_atlas(atlas_dir, out_dir, score)


__all__ = ["write_report", "render_html", "collect_samples", "collect_for_atlas", "load_samples", "plot", "settings_of",
           "REPORT_FILE", "SAMPLES_JSON", "SAMPLES_TENSORS"]
