"""The report of an image model in a real headless browser (Debian's chromium driven by Playwright,
as tests/report/test_browser.py): the image views respond, hostile text stays text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from headwise.report import write_report
from tests.report.conftest import HOSTILE_CLOSE, HOSTILE_IMG, HOSTILE_SCRIPT
from tests.report.test_browser import CHROMIUM, Watched, browser  # noqa: F401  (browser: the module's chromium)
from tests.report.test_image_report import image_atlas_dir

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() and shutil.which("chromium") is None,
                                reason=f"chromium not installed at {CHROMIUM} (make test installs it: apt-get install "
                                       f"chromium)")

PIXELS = "sel => document.querySelector(sel).toDataURL()"


@pytest.fixture(scope="module")
def vit_report(tmp_path_factory):
    """report.html of a tiny ViT atlas whose texts are injections (score description, image source, verdict)."""
    out = tmp_path_factory.mktemp("image-report") / "atlas"
    image_atlas_dir(out, "vit", hostile=True)
    meta_path = out / "attention_samples.json"
    meta = json.loads(meta_path.read_text())
    meta["images"]["sources"][0] = HOSTILE_CLOSE
    meta_path.write_text(json.dumps(meta))
    (out / "headwise-manifest.json").unlink()  # edited by hand after headwise wrote it
    return write_report(out)


def test_image_report_is_interactive(browser, vit_report):  # noqa: F811
    w = Watched(browser)
    page = w.open(vit_report)
    # The image views are there, the text-only ones are not.
    for gone in ("#kv-panel", "#regions", "#last-row", "#distance-chart"):
        assert page.locator(gone).count() == 0, gone
    assert page.locator("canvas.overlay").count() == 2 * 4
    assert page.locator("#importance-table tbody tr").count() == 2 * 4

    # Select a head: its overlay is outlined and enlarged, and the detail shows its spatial views.
    page.click("rect.cell[data-layer='1'][data-head='2']")
    assert page.text_content("#detail-title") == "Layer 1, head 2"
    assert page.get_attribute("canvas.overlay.sel", "data-index") == "6"
    assert page.get_attribute("#image-large", "data-index") == "6"
    assert page.locator("#detail #rel-pos").count() == 1 and page.locator("#detail #spatial-chart").count() == 1
    assert "attention distance" in page.text_content("#spatial-values")

    # Click a patch: every overlay is redrawn from it.
    overlay = "canvas.overlay[data-index='6']"
    before = {"small": page.evaluate(PIXELS, overlay), "large": page.evaluate(PIXELS, "#image-large"),
              "query": page.get_attribute(overlay, "data-query")}
    assert before["query"] == "0"  # the CLS token first
    box = page.locator("#query-canvas").bounding_box()
    page.click("#query-canvas", position={"x": box["width"] * 0.9, "y": box["height"] * 0.9})  # patch (3, 3): token 16
    assert page.get_attribute(overlay, "data-query") == "16" == page.get_attribute("#image-large", "data-query")
    assert page.evaluate(PIXELS, overlay) != before["small"]
    assert page.evaluate(PIXELS, "#image-large") != before["large"]
    page.click("button.qbtn[data-query='0']")
    assert page.get_attribute(overlay, "data-query") == "0" and page.evaluate(PIXELS, overlay) == before["small"]
    page.click("canvas.thumb[data-image='2']")
    assert page.get_attribute(overlay, "data-image") == "2" and page.evaluate(PIXELS, overlay) != before["small"]

    # Select from an overlay and from the importance ranking.
    page.click("canvas.overlay[data-index='1']")
    assert page.text_content("#detail-title") == "Layer 0, head 1"
    page.click("#importance-table tr[data-index='5'] td")
    assert page.text_content("#detail-title") == "Layer 1, head 1"
    assert page.get_attribute("#importance-table tr.sel", "data-index") == "5"

    # The pattern map switches between the autoencoder's and PCA's layouts; the neighbour share is the Python one.
    from headwise.report.layout import neighbour_role_share

    data = json.loads(page.text_content("#headwise-data"))
    labels = data["roles"]["labels"]
    for name in ("pattern_pca", "pattern_ae"):
        page.select_option("#layout-select", name)
        assert page.get_attribute("#pattern-map", "data-layout") == name
        layout = next(x for x in data["pattern_layouts"] if x["name"] == name)
        share, chance = neighbour_role_share(layout["x"], layout["y"], labels)
        assert float(page.get_attribute("#neighbour-share", "data-share")) == pytest.approx(share, abs=1e-12)
        assert float(page.get_attribute("#neighbour-share", "data-chance")) == pytest.approx(chance, abs=1e-12)
    page.select_option("#map-colour", "group")
    assert page.locator("#pattern-groups .group").count() == 3
    page.click("#pattern-groups .group[data-group='1']")
    in_group = [i for i, g in enumerate(data["pattern_layouts"][0]["group"]) if g == 1]
    dimmed = page.eval_on_selector_all("#pattern-map circle.dim", "els => els.map(e => +e.dataset.index)")
    assert not set(in_group) & set(dimmed) and len(dimmed) == 8 - len(in_group)

    # Hostile texts are shown as text and run nothing.
    page.click("canvas.thumb[data-image='0']")
    assert HOSTILE_CLOSE in page.text_content("#image-info")
    assert HOSTILE_SCRIPT in page.text_content("#colourbar")  # attention_distance's description
    assert "passes: " + HOSTILE_IMG in page.text_content("#importance-panel")
    assert page.evaluate("document.querySelectorAll('script').length") == 2
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert w.errors == [] and w.dialogs == []
    assert all(u.startswith(("file:", "data:", "about:")) for u in w.requests)
    page.close()


def test_prefix_tokens_of_a_registers_model_are_queries(browser, tmp_path):  # noqa: F811
    _, out = image_atlas_dir(tmp_path / "atlas", "dinov2-registers", validation=False)
    w = Watched(browser)
    page = w.open(out / "report.html")
    assert page.eval_on_selector_all("button.qbtn", "els => els.map(e => e.textContent)") == [
        "CLS", "register 0", "register 1"]
    page.click("button.qbtn[data-query='2']")
    assert page.get_attribute("canvas.overlay[data-index='0']", "data-query") == "2"
    assert "No validation" in page.text_content("#importance-panel")
    assert w.errors == [] and w.dialogs == []
    page.close()
