"""The atlas as a visual analytics report: one self-contained HTML page, plus static figures.

    write_report(atlas_dir) -> Path      atlas_dir/report.html (offline, no CDN)
    show(atlas)                          the same page inline in Jupyter
    collect_samples(loaded, settings, atlas_dir)   the downsampled attention the page shows
    plot(atlas_dir) -> list[Path]        PNG figures (matplotlib; pip install headwise[plot])

An atlas directory is one unit (write_unit): atlas.json, the attention samples, report.html and
the figures plotted into it are replaced together or not at all (headwise._io.staged_outputs), so
no command, finished or interrupted, leaves a report, samples or figures of one run beside the
atlas of another. report and plot work on an atlas directory, never on a lone atlas file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..atlas import FILENAME, Atlas
from ..errors import HeadwiseError
from ..profile import ProfileSettings
from .html import (
    REPORT_FILE,
    UNIT_FILES,
    atlas_directory,
    matching_samples,
    render_html,
    unit_bytes,
    write_report,
    write_unit,
)
from .samples import SAMPLES_JSON, SAMPLES_TENSORS, binding_problem, bound_settings, load_samples, sample_attention


def settings_of(atlas: Any) -> ProfileSettings:
    """The ProfileSettings an atlas was made with (what the attention samples should match)."""
    try:
        return ProfileSettings.from_dict(atlas.data.get("settings", {}))
    except HeadwiseError as e:
        where = atlas.directory / FILENAME if atlas.directory is not None else "the atlas"
        raise HeadwiseError(f"{where} records profile settings this headwise cannot use ({e}); re-run headwise "
                            f"profile") from None


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


def collect_samples(loaded: Any, settings: Any, out_dir: str | Path) -> Path:
    """Collect the attention samples and write them into `out_dir` (with its atlas, if it has one, as
    one unit: report.html re-rendered if there is one). Refused before any work when the atlas there
    was made with another model or other settings."""
    out_dir = Path(out_dir)
    atlas = Atlas.load(out_dir) if (out_dir / FILENAME).is_file() else None
    if atlas is not None:
        stub = {"model": loaded.info.to_dict(), "geometry": loaded.geometry.to_dict(),
                "profile": bound_settings(settings), "tensors_sha256": ""}
        problem = binding_problem(atlas.data, stub)
        if problem is not None:
            raise HeadwiseError(f"refusing to collect attention samples into {out_dir}: they {problem}; collect them "
                                f"with the atlas's own model and settings: headwise report {out_dir} --model MODEL")
    write_unit(out_dir, atlas, keep_atlas=True, samples=sample_attention(loaded, settings),
               what="the attention samples")
    return out_dir / SAMPLES_TENSORS


def collect_for_atlas(loaded: Any, atlas: Atlas | str | Path, report: bool | None = None) -> Path:
    """Collect the attention samples for an atlas (or the one in an atlas directory), checking the model
    is the atlas's, and write them with the atlas as one unit; report.html is rendered (report=True),
    removed (False) or, by default, re-rendered if there was one."""
    if not isinstance(atlas, Atlas):
        atlas = Atlas.load(atlas_directory(atlas))
    atlas.check_model(loaded.info, loaded.geometry)
    samples = sample_attention(loaded, settings_of(atlas))
    write_unit(atlas.directory, atlas, keep_atlas=True, samples=samples, report=report,
               what="the report" if report else "the attention samples")
    return atlas.directory / SAMPLES_TENSORS


def plot(atlas_dir: str | Path, out_dir: str | Path | None = None, score: str | None = None) -> list[Path]:
    """Static PNG figures (grid, layer trends, pattern map) of the atlas in atlas_dir; by default into
    atlas_dir/figures, as part of the atlas's unit (figures.plot_atlas)."""
    from .figures import plot_atlas

    return plot_atlas(atlas_dir, out_dir, score)


__all__ = ["REPORT_FILE", "SAMPLES_JSON", "SAMPLES_TENSORS", "UNIT_FILES", "atlas_directory", "collect_for_atlas",
           "collect_samples", "load_samples", "plot", "render_html", "sample_attention", "settings_of", "show",
           "unit_bytes", "write_report", "write_unit"]
