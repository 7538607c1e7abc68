"""Downsampled attention samples against a naive computation from eager attention maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from headwise.report import load_samples
from headwise.report.samples import REGIONS, SINK_TOKENS
from tests.conftest import tiny_model, tiny_tokenizer
from tests.report.conftest import profile_tiny


def eager_attention(arch: str, ids: torch.Tensor) -> np.ndarray:
    """[L, H, T, T] from transformers' own eager attention on an identical model."""
    model = tiny_model(arch)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
    return torch.stack([a[0] for a in out.attentions]).double().numpy()


def naive_pool(a: np.ndarray, side: int) -> np.ndarray:
    """Block (I, J): sum over keys of block J, mean over queries of block I, one block at a time."""
    T = a.shape[-1]
    n = min(side, T)
    edges = [min(p for p in range(T) if p * n // T == k) for k in range(n)] + [T]
    out = np.zeros(a.shape[:2] + (n, n))
    for i in range(n):
        for j in range(n):
            q0, q1, k0, k1 = edges[i], edges[i + 1], edges[j], edges[j + 1]
            out[:, :, i, j] = a[:, :, q0:q1, k0:k1].sum(-1).mean(-1)
    return out


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3-sliding"])
def test_samples_match_eager_attention(arch, tmp_path):
    out = tmp_path / "atlas"
    loaded, settings = profile_tiny(out, arch)
    arrays, meta = load_samples(out)
    tok = tiny_tokenizer()

    vocab = tok.get_vocab()  # word-level: each stored token string maps back to its id
    short_ids = torch.tensor([[vocab.get(t, 0) for t in meta["short"]["tokens"]]])
    long_ids = torch.tensor([[vocab.get(t.strip(), 0) for t in meta["long"]["tokens"]]])
    assert short_ids.shape[1] == meta["short"]["length"] == 1 + 2 * 16
    assert long_ids.shape[1] == meta["long"]["length"] == settings.context

    # The short map is the exact attention map (33 tokens <= 64).
    a_short = eager_attention(arch, short_ids)
    np.testing.assert_allclose(arrays["short_map"].astype(float), a_short, atol=2e-3, rtol=2e-3)

    a_long = eager_attention(arch, long_ids)
    np.testing.assert_allclose(arrays["long_map"].astype(float), naive_pool(a_long, 64), atol=2e-3, rtol=2e-3)

    # Regions, one query at a time.
    T = a_long.shape[-1]
    lo, hi = meta["long"]["needle_span"]
    window = meta["long"]["window"]
    expect_mean = np.zeros(a_long.shape[:2] + (4,))
    queries = range(hi, T)
    for q in queries:
        row = a_long[:, :, q]
        masses = np.zeros(a_long.shape[:2] + (4,))
        for k in range(q + 1):
            region = ("sink" if k < SINK_TOKENS else "needle" if lo <= k < hi else "recent" if k > q - window
                      else "other")
            masses[..., REGIONS.index(region)] += row[..., k]
        expect_mean += masses / len(queries)
        if q == T - 1:
            np.testing.assert_allclose(arrays["long_regions_last"], masses, atol=1e-5)
    np.testing.assert_allclose(arrays["long_regions_mean"], expect_mean, atol=1e-5)

    # The last query's row, pooled to 128 bins.
    bins = arrays["long_last_row"].shape[-1]
    expect_row = np.zeros(a_long.shape[:2] + (bins,))
    for k in range(T):
        expect_row[..., k * bins // T] += a_long[:, :, T - 1, k]
    np.testing.assert_allclose(arrays["long_last_row"].astype(float), expect_row, atol=2e-3, rtol=2e-3)
    assert meta["model"]["weights_sha256"] == loaded.info.weights_sha256


def test_samples_files_are_json_and_safetensors(hostile_atlas_dir):
    out = hostile_atlas_dir
    meta = json.loads((out / "attention_samples.json").read_text())
    assert meta["schema"] == "headwise.attention_samples/1"
    assert (out / "attention_samples.safetensors").read_bytes()[8:9] == b"{"  # safetensors: u64 length + JSON header


def test_corrupt_samples_are_a_clear_error(hostile_atlas_dir, tmp_path):
    import shutil

    from headwise.errors import HeadwiseError

    out = tmp_path / "atlas"
    shutil.copytree(hostile_atlas_dir, out)
    (out / "attention_samples.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HeadwiseError, match="unreadable"):
        load_samples(out)


def test_map_side_keeps_big_models_within_budget():
    from headwise.geometry import Geometry
    from headwise.report.samples import MAP_BUDGET, map_side

    def geometry(layers, heads):
        return Geometry("llama", layers, heads, heads, 64, ("full",) * layers, (None,) * layers, 4096, 1000)

    assert map_side(geometry(30, 9), 64) == 64  # smollm2-135m: full resolution
    big = geometry(80, 64)  # a 70B-class model
    side = map_side(big, 64)
    assert side < 64 and big.n_total_heads * side**2 <= MAP_BUDGET < big.n_total_heads * (side + 1) ** 2


def test_context_too_short_for_a_needle_falls_back_to_plain_text(tmp_path):
    out = tmp_path / "atlas"
    profile_tiny(out, context=24)
    arrays, meta = load_samples(out)
    assert meta["long"]["needle"] is None and meta["long"]["length"] == 24 and meta["long"]["needle_span"] == [0, 0]
    assert np.all(arrays["long_regions_mean"][..., REGIONS.index("needle")] == 0)
    np.testing.assert_allclose(arrays["long_regions_mean"].sum(-1), 1.0, atol=1e-5)


def test_samples_with_zero_row_bins_are_refused_in_one_line(hostile_atlas_dir, tmp_path):
    """Arrays of zero size fit a meta saying row_bins 0, but nothing can be drawn from them."""
    import hashlib
    import json
    import shutil

    from safetensors.numpy import save

    from headwise.errors import HeadwiseError
    from headwise.report import write_report

    out = tmp_path / "atlas"
    shutil.copytree(hostile_atlas_dir, out)
    arrays, meta = load_samples(out)
    arrays = {**arrays, "long_last_row": arrays["long_last_row"][..., :0]}
    data = save(arrays)
    (out / "attention_samples.safetensors").write_bytes(data)
    meta["long"]["row_bins"], meta["tensors_sha256"] = 0, hashlib.sha256(data).hexdigest()
    (out / "attention_samples.json").write_text(json.dumps(meta))
    with pytest.raises(HeadwiseError) as e:
        write_report(out)
    assert "long.row_bins must be >= 1 (got 0)" in str(e.value) and "\n" not in str(e.value)
