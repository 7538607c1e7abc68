"""The report on the real default model: size budget, and heads with the same pattern sit together on the map."""

from __future__ import annotations

import numpy as np
import pytest

from headwise.profile import ProfileSettings, profile
from headwise.report import collect_samples, load_samples, write_report
from headwise.report.layout import pattern_map

pytestmark = pytest.mark.slow


def test_smollm2_report(smollm2, tmp_path):
    out = tmp_path / "atlas"
    settings = ProfileSettings(context=512, text_sequences=1, repeated_sequences=2)
    atlas = profile(smollm2, ["previous_token", "sink", "mean_distance"], settings)
    atlas.save(out)
    collect_samples(smollm2, settings, out)
    page = write_report(out)
    assert page.stat().st_size < 10 * 2**20

    # Clusters: a head's 5 nearest neighbours on the pattern map mostly share its sink label,
    # far above what the label's base rate gives.
    layout = pattern_map(atlas.data, load_samples(out))
    xy = np.c_[layout["x"], layout["y"]]
    sink = np.array([["sink" in r for r in row] for row in atlas.data["roles"]["labels"]]).ravel()
    assert 0.1 < sink.mean() < 0.9
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    knn_vote = sink[np.argsort(d, 1)[:, :5]].mean(1) > 0.5
    accuracy = (knn_vote == sink).mean()
    base = max(sink.mean(), 1 - sink.mean())
    assert accuracy > 0.85 and accuracy > base + 0.2, (accuracy, base)
