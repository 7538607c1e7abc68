"""The spatial family equals naive loops over eager attention, and a hand-built pattern gives known values."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import headwise
from headwise.errors import HeadwiseError
from headwise.geometry import Geometry
from headwise.instrument import AttentionChunk
from headwise.probes import repeated_tokens
from headwise.profile import ProfileSettings, profile
from headwise.scores.shared_probes import make_image_probe
from headwise.scores.spatial import SpatialScores, layer_means
from tests.conftest import tiny_model, tiny_tokenizer, tiny_vision_model

NAMES = ["attention_distance", "local_attention", "prefix_attention"]


def naive(atts, prefix, rows, cols):
    """Every quantity from its definition, with explicit loops over images, heads, queries, keys and offsets."""
    n_layers, (n_img, n_heads) = len(atts), atts[0].shape[:2]
    offsets = [(dy, dx) for dy in range(1 - rows, rows) for dx in range(1 - cols, cols)]
    n_rings = int(math.floor(math.hypot(rows - 1, cols - 1) + 0.5)) + 1
    out = {n: np.zeros((n_layers, n_heads)) for n in NAMES}
    rel = np.zeros((n_layers, n_heads, len(offsets)))
    ring = np.zeros((n_layers, n_heads, n_rings))
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    tok = {rc: prefix + i for i, rc in enumerate(cells)}
    for layer, att in enumerate(atts):
        for head in range(n_heads):
            for img in range(n_img):
                a = att[img, head]
                for (r, c) in cells:
                    q = tok[r, c]
                    patch_mass = sum(a[q, tok[k]] for k in cells)
                    dist = sum(a[q, tok[rk, ck]] * math.hypot(rk - r, ck - c) for (rk, ck) in cells)
                    out["attention_distance"][layer, head] += dist / patch_mass / (n_img * len(cells))
                    local = sum(a[q, tok[rk, ck]] for (rk, ck) in cells if max(abs(rk - r), abs(ck - c)) <= 1)
                    out["local_attention"][layer, head] += local / (n_img * len(cells))
                    out["prefix_attention"][layer, head] += sum(a[q, :prefix]) / (n_img * len(cells))
            for i, (dy, dx) in enumerate(offsets):
                vals = [att[img, head, tok[r, c], tok[r + dy, c + dx]] for img in range(n_img) for (r, c) in cells
                        if 0 <= r + dy < rows and 0 <= c + dx < cols]
                rel[layer, head, i] = np.mean(vals)
            for k in range(n_rings):
                vals = [att[img, head, tok[q], tok[kk]] for img in range(n_img) for q in cells for kk in cells
                        if k - 0.5 <= math.hypot(kk[0] - q[0], kk[1] - q[1]) < k + 0.5]
                ring[layer, head, k] = np.mean(vals)
    return out, rel, ring, offsets


def test_spatial_matches_naive_loops_over_eager_attention(tiny_vision, vision_arch):
    # chunk_bytes at its minimum: one query row per chunk, so prefix-only chunks and chunk seams are exercised.
    settings = ProfileSettings(image_count=3, chunk_bytes=1024)
    atlas = profile(tiny_vision, NAMES, settings)
    g = tiny_vision.geometry
    pixels = make_image_probe(tiny_vision.preprocessor, g, settings).pixel_values
    model = tiny_vision_model(vision_arch)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        atts = [a.double().numpy() for a in model(pixel_values=pixels, output_attentions=True).attentions]
    rows, cols = g.patch_grid
    assert g.prefix_tokens == {"vit": 1, "deit": 2, "dinov2-registers": 3}[vision_arch] and (rows, cols) == (4, 4)
    scores, rel, ring, offsets = naive(atts, g.prefix_tokens, rows, cols)
    # 1e-5 holds with room: the atlas keeps 6 significant digits (distances here are < 5, so < 5e-6 off).
    for name in NAMES:
        np.testing.assert_allclose(atlas.score(name), scores[name], atol=1e-5, err_msg=name)
    rp, sd = atlas.data["profiles"]["relative_position"], atlas.data["profiles"]["spatial_distance"]
    assert rp["bins"] == [{"dy": dy, "dx": dx} for dy, dx in offsets] and rp["grid"] == [4, 4]
    np.testing.assert_allclose(np.array(rp["values"]), rel, atol=1e-5)
    assert sd["bins"] == [[k - 0.5, k + 0.5] for k in range(ring.shape[-1])]
    np.testing.assert_allclose(np.array(sd["values"]), ring, atol=1e-5)
    assert atlas.data["scores"]["local_attention"]["settings"]["image_count"] == 3
    assert layer_means(atlas.score("prefix_attention")).shape == (g.n_layers,)


def test_hand_built_attention_gives_known_values():
    rows, cols, prefix = 3, 4, 1
    g = Geometry(model_type="toy", n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4, layer_types=("full",),
                 sliding_window=(None,), max_positions=None, vocab_size=0, patch_grid=(rows, cols),
                 prefix_tokens=prefix)
    T = prefix + rows * cols
    a = torch.zeros(2, 2, T, T)  # 2 images
    a[:, :, 0, :] = 1 / T  # the CLS query: not scored
    for p in range(rows * cols):
        right = p if p % cols == cols - 1 else p + 1  # head 0: the patch to the right (itself at the right edge)
        a[:, 0, prefix + p, prefix + right] = 1
        a[:, 1, prefix + p, 0] = 1  # head 1: everything on CLS
    obs = SpatialScores().observer(g, SimpleNamespace(name="toy"), None)
    obs.begin(torch.zeros(2, 3, 8, 8))
    for start, stop in [(0, 5), (5, T)]:  # two query chunks
        obs.observe(AttentionChunk(layer=0, weights=a[:, :, start:stop], output=None, module=None, key_offset=0,
                                   query_index=torch.arange(start, stop), query_start=start, n_queries=T))
    res = obs.result()
    np.testing.assert_allclose(res.scores["attention_distance"], [[(cols - 1) / cols, 0.0]])
    np.testing.assert_allclose(res.scores["local_attention"], [[1.0, 0.0]])
    np.testing.assert_allclose(res.scores["prefix_attention"], [[0.0, 1.0]])
    rel = res.profiles["relative_position"]
    expect = np.zeros((2 * rows - 1) * (2 * cols - 1))
    expect[rel["bins"].index({"dy": 0, "dx": 1})] = 1.0  # every query with a right neighbour uses it
    expect[rel["bins"].index({"dy": 0, "dx": 0})] = 1 / cols  # the right-edge column, out of all queries
    np.testing.assert_allclose(rel["values"][0, 0], expect)
    np.testing.assert_allclose(rel["values"][0, 1], 0.0)
    # ring 1 holds the 4-neighbours and diagonals: R(C-1) units of mass over all their pairs
    ring1_pairs = 2 * rows * (cols - 1) + 2 * (rows - 1) * cols + 4 * (rows - 1) * (cols - 1)
    ring = res.profiles["spatial_distance"]["values"][0, 0]
    np.testing.assert_allclose(ring[:2], [1 / cols, rows * (cols - 1) / ring1_pairs])
    np.testing.assert_allclose(ring[2:], 0.0)


def test_refuses_text_probes_and_text_models():
    tok = tiny_tokenizer()
    probe = repeated_tokens(tok, 96, block_len=4, repeats=2, n_sequences=1, seed=0)
    with pytest.raises(HeadwiseError, match="image probe"):
        SpatialScores().check_probe(probe, ProfileSettings())
    text = headwise.from_model(tiny_model("llama-gqa"), tok)
    with pytest.raises(HeadwiseError) as e:
        profile(text, ["attention_distance"])
    assert "\n" not in str(e.value) and "cannot measure text models" in str(e.value)
