"""Static figures: three PNGs from an atlas, without the model."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is in the dev extra (pip install -e '.[dev]')")

from headwise.errors import HeadwiseError  # noqa: E402
from headwise.report import plot  # noqa: E402


def test_plot_writes_three_pngs(hostile_atlas_dir, tmp_path):
    paths = plot(hostile_atlas_dir, tmp_path / "figs")
    assert [p.name for p in paths] == ["grid.png", "layer_trends.png", "pattern_map.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    from matplotlib.image import imread

    grid = imread(paths[0])
    assert grid.shape[0] > 100 and grid[..., :3].std() > 0.05  # not a blank canvas
    again = plot(hostile_atlas_dir, tmp_path / "again")  # deterministic: same atlas, same bytes
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_plot_unknown_score_is_a_clear_error(hostile_atlas_dir, tmp_path):
    with pytest.raises(HeadwiseError, match="no score 'bogus'"):
        plot(hostile_atlas_dir, tmp_path, score="bogus")
