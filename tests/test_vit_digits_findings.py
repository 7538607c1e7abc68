"""What the image battery finds on the bundled vit-digits, through the commands a user runs (slow: trains
vit-digits once into the headwise cache, about a minute, if it is not there yet)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from headwise import Atlas
from headwise.cli import main
from tests.report.test_browser import Watched, browser  # noqa: F401  (browser: the module's chromium)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_atlas(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit-digits") / "atlas"
    assert main(["profile", "--model", "vit-digits", "--out", str(out)]) in (0, None)
    return out


def test_pruning_the_most_important_heads_hurts_more_than_random_heads(digits_atlas, capsys):
    """The issue's causal check: top-k heads by importance_accuracy against 5 random k-head draws."""
    assert main(["validate", "--atlas", str(digits_atlas), "--role", "important", "--k", "2"]) in (0, None)
    result = Atlas.load(digits_atlas).data["validation"]["important@k2"]
    assert result["baseline"] > 0.9  # the trained model, on held-out digits
    # Measured (bench/vision_digits.py): the two heads cost far more accuracy than any two random heads.
    assert result["passes"], result["verdict"]
    assert "passes" in capsys.readouterr().out


def test_digits_atlas_has_every_image_score_and_layout(digits_atlas):
    atlas = Atlas.load(digits_atlas)
    assert {"attention_distance", "local_attention", "prefix_attention", "importance_accuracy",
            "pattern_ae_error"} <= set(atlas.score_names)
    prof = atlas.data["profiles"]["relative_position"]
    assert prof["grid"] == [8, 8] and len(prof["values"][0][0]) == 15 * 15
    assert {"pattern_ae", "pattern_pca"} <= set(atlas.data["profiles"])


@pytest.mark.skipif(shutil.which("chromium") is None and not Path("/usr/bin/chromium").exists(),
                    reason="chromium not installed (make test installs it)")
def test_digits_report_in_the_browser(browser, digits_atlas):  # noqa: F811
    """Clicking a head and a patch redraws that head's overlay; no console errors."""
    w = Watched(browser)
    page = w.open(digits_atlas / "report.html")
    page.click("rect.cell[data-layer='0'][data-head='2']")
    overlay = "canvas.overlay[data-index='2']"
    assert page.get_attribute("canvas.overlay.sel", "data-index") == "2"
    before = page.evaluate("sel => document.querySelector(sel).toDataURL()", overlay)
    box = page.locator("#query-canvas").bounding_box()
    page.click("#query-canvas", position={"x": box["width"] * 0.3, "y": box["height"] * 0.6})
    assert page.get_attribute(overlay, "data-query") not in (None, "0")
    assert page.evaluate("sel => document.querySelector(sel).toDataURL()", overlay) != before
    assert w.errors == [] and w.dialogs == []
    page.close()
