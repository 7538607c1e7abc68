"""Pattern summary: the maps equal explicit loops over eager attention, the summaries are seeded, the
PCA baseline equals numpy's SVD, and both profiles survive an atlas save and load."""

import numpy as np
import pytest
import torch

import headwise
from headwise.profile import ProfileSettings
from headwise.scores.autoencoder import (
    AutoencoderPatterns,
    autoencoder_summary,
    collect_maps,
    neighbour_role_agreement,
    pca_summary,
    query_patches,
)
from tests.conftest import tiny_model, tiny_tokenizer, tiny_vision_model

# chunk_bytes at its minimum: queries are observed in many chunks, which the maps must not notice.
SMALL = dict(image_count=3, pattern_queries=5, pattern_context=20, pattern_sequences=3, pattern_side=6,
             pattern_latent=4, pattern_epochs=3, pattern_groups=3, chunk_bytes=1024)


def _eager(model, **inputs):
    model.set_attn_implementation("eager")
    with torch.no_grad():
        return [a.double() for a in model(**inputs, output_attentions=True).attentions]


@pytest.mark.parametrize("arch", ["vit", "deit", "dinov2-registers"])
def test_image_maps_equal_eager_loops(arch):
    loaded = headwise.from_model(tiny_vision_model(arch), name=arch)
    g = loaded.geometry
    maps = collect_maps(loaded, ProfileSettings(**SMALL))
    patches = [1, 4, 8, 11, 14]  # the centres of 5 equal runs of the 16 patches
    assert query_patches(16, 5).tolist() == patches and query_patches(16, 99).tolist() == list(range(16))
    att = _eager(tiny_vision_model(arch), pixel_values=maps.probe.input_ids)
    first, n = g.prefix_tokens, g.n_patches
    expected = np.zeros((g.n_layers, g.n_heads, 3 * len(patches), n))
    for layer in range(g.n_layers):
        for head in range(g.n_heads):
            for image in range(3):
                for i, p in enumerate(patches):
                    row = att[layer][image, head, first + p, first:first + n]
                    expected[layer, head, image * len(patches) + i] = (row / row.sum()).numpy()
    assert maps.side == (4, 4) and maps.maps.shape == expected.shape
    np.testing.assert_allclose(maps.maps, expected, atol=2e-6)


def test_text_maps_equal_eager_loops(word_file):
    loaded = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer(), name="llama")
    g = loaded.geometry
    maps = collect_maps(loaded, ProfileSettings(**SMALL, text=word_file))
    ids = maps.probe.input_ids
    assert ids.shape == (3, 20)
    att = _eager(tiny_model("llama-gqa"), input_ids=ids)
    side, T = 6, 20
    edges = [i * T // side for i in range(side + 1)]  # blocks of 3 or 4 tokens: 20 does not split evenly
    expected = np.zeros((g.n_layers, g.n_heads, 3, side, side))
    for layer in range(g.n_layers):
        for head in range(g.n_heads):
            for seq in range(3):
                for i in range(side):
                    for j in range(side):
                        block = att[layer][seq, head, edges[i]:edges[i + 1], edges[j]:edges[j + 1]]
                        expected[layer, head, seq, i, j] = float(block.mean())
                    expected[layer, head, seq, i] /= expected[layer, head, seq, i].sum()
    np.testing.assert_allclose(maps.maps, expected.reshape(g.n_layers, g.n_heads, 3, 36), atol=2e-6)
    assert maps.side == (6, 6) and maps.scale == 6.0


@pytest.fixture(scope="module")
def vit_maps():
    return collect_maps(headwise.from_model(tiny_vision_model("vit"), name="vit"), ProfileSettings(**SMALL))


def _same(a, b):
    for name in ("codes", "coords", "groups", "decoded", "mean_maps", "errors"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_seeded_summaries(vit_maps):
    kwargs = dict(latent=4, epochs=3, groups=3)
    first = autoencoder_summary(vit_maps, seed=0, **kwargs)
    _same(first, autoencoder_summary(vit_maps, seed=0, **kwargs))
    other = autoencoder_summary(vit_maps, seed=1, **kwargs)
    assert np.abs(other.coords - first.coords).max() > 1e-3
    # PCA needs no seed: the same maps give the same layout whatever the seed (k-means alone draws on it)
    a, b = pca_summary(vit_maps, latent=4, groups=3, seed=0), pca_summary(vit_maps, latent=4, groups=3, seed=1)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.coords, b.coords)
    # The family end to end: same seed, same numbers (timings aside)
    loaded = headwise.from_model(tiny_vision_model("vit"), name="vit")
    runs = [AutoencoderPatterns().compute(loaded, ProfileSettings(**SMALL), ["pattern_ae_error"]) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].scores["pattern_ae_error"], runs[1].scores["pattern_ae_error"])
    for name in ("pattern_ae", "pattern_pca"):
        one, two = runs[0].profiles[name], runs[1].profiles[name]
        np.testing.assert_array_equal(one["values"], two["values"])
        assert one["records"] == two["records"]


def _signs(vt):
    return vt * np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]


def test_pca_equals_numpy_svd(vit_maps):
    L, H, n, cells = vit_maps.maps.shape
    x = vit_maps.maps.reshape(-1, cells).astype(np.float64) * 16
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    v = _signs(vt[:4])
    codes = ((x - mean) @ v.T).reshape(L * H, n, 4).mean(1)
    got = pca_summary(vit_maps, latent=4, groups=3, seed=0)
    np.testing.assert_allclose(got.codes, codes, atol=1e-9)
    np.testing.assert_allclose(got.info["explained_variance"], (s**2 / (s**2).sum())[:4], atol=1e-6)
    z = codes - codes.mean(0)
    _, _, wt = np.linalg.svd(z, full_matrices=False)
    np.testing.assert_allclose(got.coords, z @ _signs(wt[:2]).T, atol=1e-9)
    for g in range(got.groups.max() + 1):
        centroid = codes[got.groups == g].mean(0)
        np.testing.assert_allclose(got.decoded[g], (mean + centroid @ v) / 16, atol=1e-9)
    assert got.groups[0] == 0 and len(set(got.groups.tolist())) == 3


def test_neighbour_role_agreement_known_answer():
    coords = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    labels = ["a", "a", "b", {"c"}, {"c", "d"}, set()]
    # k=2 neighbours: 0 -> 1 (a, yes), 2 (no); 1 -> 0 (yes), 2 (no); 2 -> 1, 0 (no, no);
    # 3 -> 4 (c, yes), 5 (no); 4 -> 3 (yes), 5 (no); 5 -> 4, 3 (none meets neither): 4 of 12
    assert neighbour_role_agreement(coords, labels, k=2) == pytest.approx(4 / 12)
    assert neighbour_role_agreement(coords, labels, k=1) == pytest.approx(4 / 6)  # 0-1, 1-0, 3-4, 4-3
    assert neighbour_role_agreement(np.zeros((2, 2)), [set(), set()], k=5) == 1.0  # both "none"; k capped


def test_profile_saves_and_loads(tmp_path, word_file):
    models = [headwise.from_model(tiny_vision_model("vit"), name="vit"),
              headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer(), name="llama")]
    for loaded in models:
        g = loaded.geometry
        atlas = headwise.profile(loaded, scores=["pattern_ae_error"], settings=ProfileSettings(**SMALL, text=word_file))
        atlas.save(tmp_path / g.modality)
        back = headwise.Atlas.load(tmp_path / g.modality)
        assert back.score("pattern_ae_error").shape == (g.n_layers, g.n_heads)
        for name in ("pattern_ae", "pattern_pca"):
            prof = back.profile(name)
            values = np.asarray(prof["values"])
            assert values.shape == (g.n_layers, g.n_heads, 3) and prof["bins"] == ["x", "y", "group"]
            side = [4, 4] if g.modality == "image" else [6, 6]
            heads = sorted(tuple(h) for r in prof["records"] for h in r["heads"])
            assert heads == [(layer, head) for layer in range(g.n_layers) for head in range(g.n_heads)]
            for r in prof["records"]:
                assert r["side"] == side and len(r["decoded"]) == len(r["mean_map"]) == side[0] * side[1]
                assert all(values[layer, head, 2] == r["group"] for layer, head in r["heads"])
            assert prof["settings"]["pattern_latent"] == 4 and "seconds" not in prof["settings"]
