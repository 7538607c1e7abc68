"""The report in a real headless browser: Debian's chromium driven by Playwright.

`make test` installs chromium (apt) and playwright (the dev extra); the tests skip only when
/usr/bin/chromium is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path

import pytest

from headwise.report import show, write_report
from tests.report.conftest import HOSTILE_CLOSE, HOSTILE_IMG, HOSTILE_SCRIPT

CHROMIUM = os.environ.get("HEADWISE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() and shutil.which("chromium") is None,
                                reason=f"chromium not installed at {CHROMIUM} (make test installs it: apt-get install "
                                       f"chromium)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), headless=True, args=ARGS,
            executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
            viewport={"width": 1500, "height": 1000})
        yield context
        context.close()


class Watched:
    """A page plus every console error, uncaught exception, dialog and network request it made."""

    def __init__(self, context):
        self.page = context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def open(self, path: Path):
        self.page.goto(path.as_uri())
        self.page.wait_for_selector("body[data-ready='1']", state="attached", timeout=15000)
        return self.page


def fills(page) -> list[str]:
    return page.eval_on_selector_all("rect.cell", "els => els.map(e => e.getAttribute('fill'))")


def test_report_is_interactive_in_chromium(browser, hostile_atlas_dir, tmp_path):
    report = write_report(hostile_atlas_dir)
    atlas = json.loads((hostile_atlas_dir / "atlas.json").read_text())
    g = atlas["geometry"]
    L, H, KV = g["n_layers"], g["n_heads"], g["n_kv_heads"]
    w = Watched(browser)
    page = w.open(report)

    # Click a grid cell: the detail view, the table and the map follow.
    page.click("rect.cell[data-layer='2'][data-head='3']")
    assert page.text_content("#detail-title") == "Layer 2, head 3"
    assert page.get_attribute("body", "data-selected") == "L2.H3"
    assert page.get_attribute("#rank-table tr.sel", "data-index") == str(2 * H + 3)
    assert page.get_attribute("#pattern-map circle.sel", "data-index") == str(2 * H + 3)

    # Change the score: the grid is recoloured, darkest at the minimum and brightest at the maximum.
    before = fills(page)
    names = list(atlas["scores"])
    target = next(n for n in names if n != page.input_value("#score-select") and len(
        {round(v, 9) for row in atlas["scores"][n]["heads"] for v in row if v is not None}) > 1)
    page.select_option("#score-select", target)
    after = fills(page)
    assert after != before and page.get_attribute("#grid", "data-score") == target
    flat = [v for row in atlas["scores"][target]["heads"] for v in row]
    assert after[flat.index(max(flat))] == "rgb(253,231,37)"
    assert after[flat.index(min(flat))] == "rgb(68,1,84)"

    # Select from the map and from the table.
    page.click("#pattern-map circle[data-index='1']")
    assert page.text_content("#detail-title") == "Layer 0, head 1"
    page.click(f"#rank-table tr[data-index='{H + 1}'] td")
    assert page.text_content("#detail-title") == "Layer 1, head 1"

    # Hostile text is shown as text and runs nothing.
    assert HOSTILE_IMG in page.text_content("header h1")
    box = page.locator("canvas.heat").first.bounding_box()
    n = json.loads((hostile_atlas_dir / "attention_samples.json").read_text())["short"]["length"]
    for q, expected in ((1, HOSTILE_SCRIPT), (2, HOSTILE_CLOSE)):
        page.mouse.move(box["x"] + (q + 0.5) * box["width"] / n, box["y"] + (q + 0.5) * box["height"] / n)
        assert expected in page.text_content("#tooltip")
    assert page.evaluate("document.querySelectorAll('script').length") == 2
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    page.click("rect.cell[data-layer='1'][data-head='2']")
    detail = page.text_content("#detail")
    assert HOSTILE_SCRIPT in detail  # the validation record and the needle, as text
    assert "in induction@k2.targeted_heads \u2192 FAILS: " + HOSTILE_IMG in detail

    # KV preview: keeping no head whole stores S + W tokens per KV head, keeping all stores the whole context.
    context = int(page.input_value("#kv-context"))
    per_token = 2 * g["head_dim"] * 2 * L * KV
    page.fill("#kv-fraction", "0")
    assert int(float(page.get_attribute("#kv-result", "data-full"))) == per_token * context
    assert int(float(page.get_attribute("#kv-result", "data-aware"))) == per_token * min(context, 64 + 256)
    page.fill("#kv-fraction", "1")
    assert page.get_attribute("#kv-result", "data-aware") == page.get_attribute("#kv-result", "data-full")

    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert w.errors == [] and w.dialogs == []
    assert all(u.startswith(("file:", "data:", "about:")) for u in w.requests)
    page.close()


def test_atlas_show_renders_in_an_iframe(browser, hostile_atlas_dir, monkeypatch, tmp_path):
    from headwise import Atlas

    class HTML:
        def __init__(self, data):
            self.data = data

    ipython = types.ModuleType("IPython")
    display = types.ModuleType("IPython.display")
    display.HTML = HTML
    ipython.display = display
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    shown = show(Atlas.load(hostile_atlas_dir))
    assert shown.data.startswith("<iframe srcdoc=\"") and "<script" not in shown.data
    page_file = tmp_path / "notebook.html"
    page_file.write_text(f"<!DOCTYPE html><html><body>{shown.data}</body></html>", encoding="utf-8")
    w = Watched(browser)
    w.page.goto(page_file.as_uri())
    frame = w.page.frame_locator("iframe")
    frame.locator("body[data-ready='1']").wait_for(state="attached", timeout=15000)
    assert frame.locator("#detail-title").text_content().startswith("Layer ")
    assert w.errors == [] and w.dialogs == []
    w.page.close()


def test_show_without_ipython_is_a_clear_error(hostile_atlas_dir, monkeypatch):
    from headwise import Atlas
    from headwise.errors import HeadwiseError

    monkeypatch.setitem(sys.modules, "IPython", None)
    monkeypatch.setitem(sys.modules, "IPython.display", None)
    with pytest.raises(HeadwiseError, match="needs IPython"):
        show(Atlas.load(hostile_atlas_dir))


def test_kv_preview_respects_sliding_layers(browser, tmp_path):
    from tests.report.conftest import profile_tiny

    out = tmp_path / "gemma"
    loaded, _ = profile_tiny(out, "gemma3-sliding", context=120)
    g = loaded.geometry
    assert "sliding" in g.layer_types
    w = Watched(browser)
    page = w.open(write_report(out))
    page.fill("#kv-context", "100")
    page.fill("#kv-window", "4")
    page.fill("#kv-sink", "2")
    per_token = 2 * g.head_dim * 2 * g.n_kv_heads
    # The model's own sliding cache holds window - 1 tokens, whatever the policy; the other layers' heads S + W.
    sliding = [kind == "sliding" for kind in g.layer_types]
    held = [min(100, win - 1) if s else 100 for s, win in zip(sliding, g.sliding_window)]
    page.fill("#kv-fraction", "1")
    assert int(float(page.get_attribute("#kv-result", "data-full"))) == per_token * sum(held)
    page.fill("#kv-fraction", "0")
    assert int(float(page.get_attribute("#kv-result", "data-aware"))) == per_token * sum(
        t if s else min(t, 6) for s, t in zip(sliding, held))
    assert page.locator("#kv-panel rect[data-kind='model-window']").count() == sum(sliding) * g.n_kv_heads
    # One KV head per layer: no KV-group brackets, every head still drawn.
    assert page.locator("rect.cell").count() == g.n_layers * g.n_heads
    assert w.errors == [] and w.dialogs == []
    page.close()


def test_big_model_page_with_pooled_maps_works(browser, tmp_path):
    """80 layers x 64 heads (a 70B-class geometry) with coarse pooled maps: loads, selects, hovers, no errors."""
    from headwise.report import render_html
    from tests.report.conftest import synthetic_atlas

    data, samples = synthetic_atlas(L=80, H=64, KV=8, short_side=20, long_side=20)
    path = tmp_path / "big.html"
    path.write_text(render_html(data, samples), encoding="utf-8")
    w = Watched(browser)
    page = w.open(path)
    assert page.locator("rect.cell").count() == 80 * 64
    page.dispatch_event("#pattern-map circle[data-index='700']", "click")  # 5120 random points overlap
    assert page.text_content("#detail-title") == "Layer 10, head 60"
    box = page.locator("canvas.heat").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * 0.95)
    assert "queries " in page.text_content("#tooltip")  # pooled: block ranges, not single tokens
    assert w.errors == [] and w.dialogs == []
    page.close()


def test_report_of_a_short_context_atlas_has_no_needle(browser, tmp_path):
    from tests.report.conftest import profile_tiny

    out = tmp_path / "short"
    profile_tiny(out, context=24)
    w = Watched(browser)
    page = w.open(write_report(out))
    detail = page.text_content("#detail")
    assert "Natural text (24 tokens" in detail and "Needle:" not in detail
    assert w.errors == [] and w.dialogs == []
    page.close()


# ---- the KV preview against headwise.kv.HeadPolicy ----------------------------------------------------------------
# Sets every control of the preview, point after point, in one page load; returns what the page computed.
_DRIVE_KV = """points => {
  const $ = id => document.getElementById(id);
  const set = (id, value, type) => {
    const e = $(id);
    if (!e) return;  // a control this page does not have
    e.value = String(value);
    e.dispatchEvent(new Event(type || "input", { bubbles: true }));
  };
  return points.map(p => {
    set("kv-score", p.score, "change");
    const order = $("kv-order").value, note = $("kv-order-note") ? $("kv-order-note").textContent : "";
    set("kv-order", p.dir, "change");
    set("kv-fraction", p.f);
    set("kv-context", p.T);
    set("kv-sink", p.S);
    set("kv-window", p.W);
    set("kv-middle", p.M);
    set("kv-bytes", p.b, "change");
    const r = $("kv-result"), kinds = Array.from(document.querySelectorAll("#kv-panel rect[data-kind]"));
    return { full: r.getAttribute("data-full"), aware: r.getAttribute("data-aware"), fraction: $("kv-fraction").value,
             default_order: order, note: note, kinds: kinds.map(x => x.getAttribute("data-kind")) };
  });
}"""


def _kv_atlas(geometry, seed):
    """Scores on a coarse grid (exact after the page's 6-digit rounding, many ties), with NaNs, in both directions."""
    import numpy as np

    from headwise.atlas import Atlas

    rng = np.random.default_rng(seed)
    L, H, GS = geometry.n_layers, geometry.n_heads, geometry.group_size
    atlas = Atlas.new({"spec": f"kv-{geometry.model_type}", "weights_sha256": "0" * 64}, geometry, {})
    full_layers = [layer for layer, t in enumerate(geometry.layer_types) if t != "sliding"]
    for name, needs_full in (("retrieval", "high"), ("streamable_mass", "low"), ("sink", "low"), ("copying", None)):
        values = rng.integers(-3, 4, (L, H)) / 4
        values[rng.random((L, H)) < 0.15] = np.nan
        values[full_layers[-1], :GS] = np.nan  # a whole KV group without a value: its need is -inf
        atlas.set_score(name, values, family="test", probe=None, description=name)
        atlas.data["scores"][name]["needs_full"] = needs_full
    return atlas


def test_kv_preview_matches_policy_kv_bytes(browser, tmp_path):
    """The page's KV preview is HeadPolicy.from_atlas(...).kv_bytes(...) and HeadPolicy.full_cache(...).kv_bytes(...),
    head for head and byte for byte, over a grid of scores, directions, fractions, contexts and cache shapes."""
    from headwise.geometry import Geometry
    from headwise.kv import HeadPolicy
    from headwise.report import render_html

    gqa = Geometry("llama", 4, 6, 2, 8, ("full",) * 4, (None,) * 4, 4096, 100)
    gemma = Geometry("gemma3_text", 6, 4, 2, 8, ("sliding", "sliding", "full", "sliding", "sliding", "full"),
                     (16, 16, None, 16, 16, None), 4096, 100)
    shapes = [(64, 256, 0, 2), (4, 8, 0, 1), (2, 5, 3, 4), (0, 1, 16, 2)]  # sink, window, middle, bytes per value
    fractions, contexts = (0, 0.13, 0.25, 0.5, 1), (1, 10, 300, 5000)
    problems: dict[str, list[str]] = {}
    n_points = 0
    for seed, g in enumerate((gqa, gemma)):
        atlas = _kv_atlas(g, seed)
        path = tmp_path / f"{g.model_type}.html"
        path.write_text(render_html(atlas.data), encoding="utf-8")
        w = Watched(browser)
        page = w.open(path)
        points, expected = [], []
        for score, entry in atlas.data["scores"].items():
            for direction in ("high", "low"):
                for f in fractions:
                    for S, W, M, b in shapes:
                        policy = HeadPolicy.from_atlas(atlas, score, full_fraction=f,
                                                       higher_is_full=direction == "high", sink=S, window=W, middle=M,
                                                       prefill="whole" if M else "bounded")
                        kinds = [policy.kind(layer, k) for layer in range(g.n_layers) for k in range(g.n_kv_heads)]
                        for T in contexts:
                            points.append({"score": score, "dir": direction, "f": f, "T": T, "S": S, "W": W, "M": M,
                                           "b": b})
                            expected.append((policy.kv_bytes(T, dtype_bytes=b),
                                             HeadPolicy.full_cache(g).kv_bytes(T, dtype_bytes=b), kinds,
                                             entry["needs_full"] or "high", entry["needs_full"] is None))
        got = page.evaluate(_DRIVE_KV, points)
        n_points += len(points)
        for p, (aware, full, kinds, default, unsaid), r in zip(points, expected, got):
            checks = {"fraction control": (float(r["fraction"]), p["f"]),
                      "bytes (aware, full)": ((r["aware"], r["full"]), (str(aware), str(full))),
                      "KV grid": (r["kinds"], kinds),
                      "default 'keep whole'": (r["default_order"], default),
                      "note that the score does not say": (bool(r["note"].strip()), unsaid)}
            for what, (page_has, policy_has) in checks.items():
                if page_has != policy_has:
                    problems.setdefault(what, []).append(f"{g.model_type} {p}: page {page_has}, "
                                                         f"HeadPolicy {policy_has}")
        assert w.errors == [] and w.dialogs == []
        page.close()
    assert n_points == 2 * 4 * 2 * len(fractions) * len(shapes) * len(contexts)
    assert not problems, "".join(f"\n{len(v)} of {n_points} points: {k} differs, e.g.\n  " + "\n  ".join(v[:3])
                                 for k, v in problems.items())
