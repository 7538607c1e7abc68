"""The atlas as a visual analytics report: one self-contained HTML page, plus static figures.

    write_report(atlas_dir) -> Path      atlas_dir/report.html (offline, no CDN)
    show(atlas)                          the same page inline in Jupyter
    collect_samples(loaded, settings, atlas_dir)   the downsampled attention the page shows
    plot(atlas_dir) -> list[Path]        PNG figures (matplotlib; pip install headwise[plot])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..atlas import Atlas
from ..errors import HeadwiseError
from ..profile import ProfileSettings
from .html import REPORT_FILE, matching_samples, render_html, write_report
from .samples import SAMPLES_JSON, SAMPLES_TENSORS, collect_samples, load_samples


def settings_of(atlas: Any) -> ProfileSettings:
    """The ProfileSettings an atlas was made with (what the attention samples should match)."""
    return ProfileSettings.from_dict(atlas.data.get("settings", {}))


def show(atlas: Atlas, height: int = 900) -> Any:
    """The interactive report inline in Jupyter (an IPython HTML object holding an iframe)."""
    try:
        from IPython.display import HTML
    except ImportError:
        raise HeadwiseError("show() needs IPython (run it in Jupyter); outside it use "
                            "headwise.report.write_report(atlas_dir) and open report.html") from None
    import html

    page = render_html(atlas.data, matching_samples(atlas.data, atlas.directory))
    return HTML(f'<iframe srcdoc="{html.escape(page, quote=True)}" style="width:100%;height:{int(height)}px;'
                f'border:0" title="headwise report"></iframe>')


def collect_for_atlas(loaded: Any, atlas_dir: str | Path) -> Path:
    """Collect the attention samples for the atlas in atlas_dir, checking the model is the atlas's."""
    atlas = Atlas.load(atlas_dir)
    atlas.check_model(loaded.info, loaded.geometry)
    return collect_samples(loaded, settings_of(atlas), atlas.directory)


def plot(atlas_dir: str | Path, out_dir: str | Path | None = None, score: str | None = None) -> list[Path]:
    """Static PNG figures (grid, layer trends, pattern map) of the atlas in atlas_dir."""
    from .figures import plot_atlas

    return plot_atlas(atlas_dir, out_dir, score)


__all__ = ["REPORT_FILE", "SAMPLES_JSON", "SAMPLES_TENSORS", "collect_for_atlas", "collect_samples", "load_samples",
           "plot", "render_html", "settings_of", "show", "write_report"]
