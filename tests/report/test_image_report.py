"""The report of an image model: attention samples over images, the image views, figures.

Atlases are built by hand (Atlas.new + set_score + set_profile, in the shapes the spatial,
importance and pattern-summary families write), with real attention samples of tiny ViT, DeiT
and DINOv2-with-registers models, so these tests hold whatever those families compute.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

import headwise
from headwise.atlas import Atlas
from headwise.errors import HeadwiseError
from headwise.profile import ProfileSettings
from headwise.report import load_samples, render_html, sample_attention, write_report, write_unit
from headwise.report.html import report_data
from headwise.roles import RoleRule
from tests.conftest import VISION_ARCHS, tiny_vision_model
from tests.report.conftest import HOSTILE_CLOSE, HOSTILE_IMG, HOSTILE_SCRIPT

SETTINGS = ProfileSettings(image_count=8)


def image_atlas(loaded, settings=SETTINGS, *, seed: int = 0, hostile: bool = False, validation: bool = True) -> Atlas:
    """An atlas of `loaded` holding every image score and profile, with made-up values of the real shapes."""
    rng = np.random.default_rng(seed)
    g = loaded.geometry
    L, H, (R, C) = g.n_layers, g.n_heads, g.patch_grid
    atlas = Atlas.new(loaded.info.to_dict(), g, settings.to_dict())

    def score(name, values, family, rule=None, description=None):
        atlas.set_score(name, values, family=family, probe="images", rule=rule,
                        description=description or f"{name} (made up for a test)")

    score("attention_distance", rng.uniform(0.5, 3, (L, H)), "spatial",
          description=f"mean distance {HOSTILE_SCRIPT}" if hostile else None)
    score("local_attention", rng.uniform(0, 1, (L, H)), "spatial", RoleRule("local", "local_attention", ">", 0.5, "t"))
    score("prefix_attention", rng.uniform(0, 1, (L, H)), "spatial",
          RoleRule("prefix-sink", "prefix_attention", ">", 0.5, "t"))
    accuracy = rng.uniform(-0.01, 0.1, (L, H))
    score("importance_accuracy", accuracy, "importance", RoleRule("important", "importance_accuracy", ">", 0.05, "t"))
    for name in ("importance_ablation", "importance_grad", "importance_norm"):
        score(name, rng.uniform(0, 1, (L, H)), "importance")
    score("pattern_ae_error", rng.uniform(0, 1, (L, H)), "pattern_summary")
    dy, dx = np.meshgrid(np.arange(1 - R, R), np.arange(1 - C, C), indexing="ij")
    rel = rng.dirichlet(np.ones(dy.size), (L, H))
    atlas.set_profile("relative_position", {"values": rel, "bins": [{"dy": int(y), "dx": int(x)}
                                                                    for y, x in zip(dy.ravel(), dx.ravel())],
                                            "grid": [R, C], "description": "mean attention by offset"})
    rings = int(np.ceil(np.hypot(R - 1, C - 1))) + 1
    atlas.set_profile("spatial_distance", {"values": rng.uniform(0, 0.1, (L, H, rings)),
                                           "bins": [[k - 0.5, k + 0.5] for k in range(rings)],
                                           "description": "mean attention per patch pair by distance"})
    for name in ("pattern_ae", "pattern_pca"):
        groups = rng.integers(0, 3, L * H)
        groups[:3] = [0, 1, 2]
        values = np.concatenate([rng.normal(size=(L * H, 2)), groups[:, None]], 1).reshape(L, H, 3)
        records = [{"group": k, "heads": [[int(i) // H, int(i) % H] for i in np.flatnonzero(groups == k)],
                    "decoded": rng.uniform(0, 0.2, R * C).round(6).tolist(),
                    "mean_map": rng.dirichlet(np.ones(R * C)).round(6).tolist(), "side": [R, C]} for k in range(3)]
        atlas.set_profile(name, {"values": values, "bins": ["x", "y", "group"], "records": records,
                                 "method": f"{name} method", "description": f"{name} layout",
                                 "settings": {"seed": 0}})
    if validation:
        top = [[int(i) // H, int(i) % H, float(accuracy.flat[i])] for i in np.argsort(-accuracy.ravel())[:2]]
        atlas.set_validation("important@k2", {
            "role": "important", "k": 2, "score": "importance_accuracy", "task": "classification",
            "metric": "accuracy", "higher_is_better": True, "baseline": 0.9, "targeted": 0.5,
            "random": [0.85, 0.88, 0.9, 0.86, 0.87], "passes": True,
            "verdict": "passes: " + HOSTILE_IMG if hostile else "passes", "targeted_heads": top})
    return atlas


def image_atlas_dir(out, arch: str = "vit", **kwargs):
    """An atlas directory of a tiny image model with its attention samples (and report.html); (loaded, dir)."""
    loaded = headwise.from_model(tiny_vision_model(arch), name=f"tiny-{arch}")
    atlas = image_atlas(loaded, **kwargs)
    write_unit(out, atlas, samples=sample_attention(loaded, SETTINGS), report=True)
    return loaded, out


def eager_rows(model, pixel_values, queries):
    """[images, L, H, queries, tokens] from transformers' own eager attention on an identical model."""
    import torch

    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(pixel_values=pixel_values, output_attentions=True)
    return torch.stack(out.attentions, 1)[:, :, :, queries].double().numpy(), out.logits.argmax(-1).tolist()


@pytest.mark.parametrize("arch", VISION_ARCHS)
def test_image_samples_round_trip_and_bind(arch, tmp_path):
    from headwise.scores.shared_probes import make_image_probe

    loaded, out = image_atlas_dir(tmp_path / "atlas", arch)
    arrays, meta = load_samples(out)
    g, im = loaded.geometry, meta["images"]
    n, L, H = 4, g.n_layers, g.n_heads
    # Every prefix token (CLS, distillation, registers) and every patch of the 4 x 4 grid is a query.
    assert im["queries"] == list(range(g.n_tokens)) and im["count"] == n and im["tokens"] == g.n_tokens
    assert len(im["prefix_names"]) == g.prefix_tokens and im["prefix_names"][0] == "CLS"
    assert arrays["image_attention"].shape == (n, L, H, g.n_tokens, g.n_tokens)
    assert arrays["thumbnails"].shape == (n, 64, 64, 3) and arrays["thumbnails"].dtype == np.uint8
    # The profile's first images, rows equal to eager attention, predictions its argmax.
    probe = make_image_probe(loaded.preprocessor, g, SETTINGS)
    expect, predictions = eager_rows(tiny_vision_model(arch), probe.pixel_values[:n], im["queries"])
    np.testing.assert_allclose(arrays["image_attention"].astype(float), expect, atol=2e-3)
    np.testing.assert_array_equal(arrays["thumbnails"], probe.thumbnails[:n])
    assert im["labels"] == probe.labels[:n].tolist() and im["predictions"] == predictions
    assert im["sources"] == probe.sources[:n] and meta["profile"] == {"seed": 0, "images": None, "image_count": 8}

    # Bound to their atlas: collected again beside it, kept when it is saved again, refused by another model's
    # atlas or other image settings.
    from headwise.report import collect_for_atlas, collect_samples

    collect_samples(loaded, SETTINGS, out)
    collect_for_atlas(loaded, out, report=True)
    Atlas.load(out).save(out)
    assert load_samples(out)[1] == meta
    other = headwise.from_model(tiny_vision_model(arch, seed=1), name=f"tiny-{arch}")
    with pytest.raises(HeadwiseError, match="another model"):
        write_unit(tmp_path / "other", image_atlas(other), samples=sample_attention(loaded, SETTINGS))
    changed = image_atlas(loaded, ProfileSettings(image_count=9))
    with pytest.raises(HeadwiseError, match="image_count 8 vs 9"):
        write_unit(tmp_path / "changed", changed, samples=sample_attention(loaded, SETTINGS))
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    atlas = json.loads((moved / "atlas.json").read_text())
    atlas["settings"]["seed"] = 3
    (moved / "atlas.json").write_text(json.dumps(atlas))
    (moved / "headwise-manifest.json").unlink()
    with pytest.raises(HeadwiseError, match="seed 0 vs 3"):
        write_report(moved)


def test_big_grids_keep_a_sub_grid_of_queries_within_the_budget():
    from headwise.geometry import Geometry
    from headwise.report.samples import IMAGE_BUDGET, image_sample_plan, query_grid

    def vit(layers, heads, side, prefix=1):
        return Geometry("vit", layers, heads, heads, 64, ("full",) * layers, (None,) * layers, None, 0, (side, side),
                        prefix)

    assert image_sample_plan(vit(4, 4, 8)) == (4, list(range(8)), list(range(8)))  # digits: every patch
    for g in (vit(12, 12, 14), vit(24, 16, 16), vit(12, 12, 14, prefix=5)):
        images, rows, cols = image_sample_plan(g)
        assert images * g.n_total_heads * (g.prefix_tokens + len(rows) * len(cols)) * g.n_tokens <= IMAGE_BUDGET
        assert len(rows) * len(cols) >= 16 and rows == sorted(set(rows)) and cols == sorted(set(cols))
    assert image_sample_plan(vit(12, 12, 14))[0] == 4  # ViT-Base: 4 images, a 5 x 5 sub-grid
    assert query_grid(14, 14, 64) == ([0, 2, 4, 6, 7, 9, 11, 13],) * 2  # 8 x 8 spread evenly
    rows, cols = query_grid(15, 15, 25)
    assert 7 in rows and 7 in cols  # the central patch of an odd grid is a query


def embedded(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="headwise-data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def hostile_image(tmp_path_factory):
    """(atlas data, samples) of a tiny ViT whose score description, image source, class name and verdict are
    injections."""
    loaded = headwise.from_model(tiny_vision_model("vit"), name=HOSTILE_IMG)
    atlas = image_atlas(loaded, hostile=True)
    data, meta = sample_attention(loaded, SETTINGS)
    meta["images"]["sources"][0] = HOSTILE_CLOSE
    meta["images"]["class_names"] = {"1": HOSTILE_SCRIPT}
    from safetensors.numpy import load

    return atlas.data, (load(data), meta)


def test_image_page_has_the_image_views_and_no_text_views(hostile_image):
    atlas_data, samples = hostile_image
    d = report_data(atlas_data, samples)
    assert d["modality"] == "image"
    im = d["samples"]["images"]
    assert "short" not in d["samples"] and "long" not in d["samples"]  # no token maps, needle or last-query row
    L, H, T = 2, 4, 17
    assert im["attention"]["shape"] == [L * H, 4 * T, T] and len(im["attention"]["max"]) == L * H * 4 * T
    assert im["thumbnails"]["shape"] == [4, 64, 64, 3]
    assert d["relative_position"]["map"]["shape"] == [L * H, 1, 7, 7] and d["relative_position"]["grid"] == [4, 4]
    assert [x["name"] for x in d["pattern_layouts"]] == ["pattern_ae", "pattern_pca"]
    assert all(len(x["x"]) == L * H and len(x["records"]) == 3 for x in d["pattern_layouts"])
    assert set(d["profiles"]) == {"spatial_distance"}  # the others are drawn by their own views
    imp = d["importance"]
    assert imp["columns"][0] == "importance_accuracy" and imp["validations"][0]["key"] == "important@k2"
    assert imp["validations"][0]["random"] == [0.85, 0.88, 0.9, 0.86, 0.87] and imp["validations"][0]["passes"]
    # The same atlas without samples still renders (the page says how to collect them).
    assert report_data(atlas_data, None)["samples"] is None


def test_image_page_escapes_every_text(hostile_image):
    atlas_data, samples = hostile_image
    page = render_html(atlas_data, samples)
    assert page.count("<script") == 2 and page.count("</script>") == 2 and "<img" not in page
    d = embedded(page)
    assert d["samples"]["images"]["sources"][0] == HOSTILE_CLOSE
    assert d["samples"]["images"]["class_names"]["1"] == HOSTILE_SCRIPT
    assert next(s for s in d["scores"] if s["name"] == "attention_distance")["description"].endswith(HOSTILE_SCRIPT)
    assert d["importance"]["validations"][0]["verdict"] == "passes: " + HOSTILE_IMG
    js = page.split("<script>")[1]
    assert "innerHTML" not in js and "outerHTML" not in js and "insertAdjacentHTML" not in js


def test_plot_writes_the_image_figures(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is in the dev extra (pip install -e '.[dev]')")
    from headwise.report import plot

    _, out = image_atlas_dir(tmp_path / "atlas")
    paths = plot(out)
    assert [p.name for p in paths] == ["grid.png", "layer_trends.png", "pattern_map.png", "image_overlays.png",
                                       "relative_position.png", "spatial_distance.png", "attention_distance.png",
                                       "pattern_summary.png", "importance.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    from matplotlib.image import imread

    overlays = imread(paths[3])
    assert overlays[..., :3].std() > 0.05  # not a blank canvas
