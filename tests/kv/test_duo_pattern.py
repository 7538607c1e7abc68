"""DuoAttention pattern export: read back as DuoAttention reads it, ranked as headwise ranks it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from headwise.atlas import Atlas
from headwise.cli import main
from headwise.errors import HeadwiseError
from headwise.geometry import Geometry
from headwise.kv import HeadPolicy
from headwise.kv.duo_pattern import export_duo_pattern

G = Geometry(model_type="llama", n_layers=4, n_heads=6, n_kv_heads=2, head_dim=8, layer_types=("full",) * 4,
             sliding_window=(None,) * 4, max_positions=4096, vocab_size=100)
GS = Geometry(model_type="gemma3_text", n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
              layer_types=("sliding", "full", "full"), sliding_window=(16, None, None), max_positions=4096,
              vocab_size=100)
MODEL = {"spec": "tiny", "kind": "in-memory", "path": None, "weights_sha256": "ab" * 32, "config_sha256": "cd" * 32}
REAL_ATLAS = Path(__file__).resolve().parents[2] / "bench" / "results" / "atlas-smollm2-duo4k.json"


def duoattention_load_attn_pattern(directory: Path) -> tuple[np.ndarray, int, int]:
    """mit-han-lab/duo-attention duo_attn/utils.py load_attn_pattern, as written there."""
    full_attention_heads = np.loadtxt(directory / "full_attention_heads.tsv", dtype=float, delimiter="\t")
    full_attention_heads = np.clip(full_attention_heads, 0, 1)
    config = json.load(open(directory / "config.json"))
    return full_attention_heads, config["sink_size"], config["recent_size"]


def naive_rows(path: Path) -> list[list[float]]:
    """The TSV by hand: lines, tabs, Python floats."""
    return [[float(cell) for cell in line.split("\t")] for line in path.read_text().split("\n") if line]


def top_heads(gates: np.ndarray, n: int) -> set[tuple[int, int]]:
    """The n KV heads with the highest gates, by a plain sort (the gates in these tests are distinct)."""
    cells = sorted(((gates[i, j], i, j) for i in range(gates.shape[0]) for j in range(gates.shape[1])), reverse=True)
    return {(i, j) for _, i, j in cells[:n]}


def full_heads(policy: HeadPolicy) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for i, j in zip(*np.nonzero(policy.full))}


def _duo_atlas(geometry: Geometry, kv_gates: np.ndarray, path: Path, **trained) -> Path:
    atlas = Atlas.new(MODEL, geometry, {"duo_sink": 7, "duo_window": 9})
    per_head = np.repeat(kv_gates, geometry.group_size, axis=1)
    atlas.set_score("duo", per_head, family="duo", probe="duo", description="gates", needs_full="high",
                    settings={"duo": {"sink": 16, "window": 32, "steps": 5, "lr": 0.02, "reg": 0.05, **trained}})
    return atlas.save(path)


def test_round_trip_reads_as_duoattention_and_ranks_as_headwise(tmp_path):
    gates = np.random.default_rng(3).uniform(0.0, 1.0, (4, 2))
    gates[0, 0], gates[2, 1] = 0.0, 1.0  # DuoAttention's gates reach both ends
    out = export_duo_pattern(gates, tmp_path / "pattern", sink=64, recent=256, source={"test": True})
    read, sink, recent = duoattention_load_attn_pattern(out)
    assert (sink, recent) == (64, 256)
    assert np.array_equal(read, gates)  # %.18e round-trips a float64 exactly
    assert naive_rows(out / "full_attention_heads.tsv") == gates.tolist()
    for fraction in (0.125, 0.25, 0.5, 0.75):
        policy = HeadPolicy.from_duo_file(out / "full_attention_heads.tsv", G, full_fraction=fraction)
        assert full_heads(policy) == top_heads(gates, policy.n_full)
        assert policy.n_full == round(fraction * 8)


def test_cli_exports_an_atlas_with_provenance(tmp_path, capsys):
    kv = np.random.default_rng(0).uniform(0.0, 1.0, (4, 2))
    atlas_path = _duo_atlas(G, kv, tmp_path / "atlas.json")
    assert main(["export-duo", "--atlas", str(atlas_path), "--out", str(tmp_path / "p")]) == 0
    assert "sink_size 16, recent_size 32" in capsys.readouterr().out  # what the gates were trained with
    read, sink, recent = duoattention_load_attn_pattern(tmp_path / "p")
    assert np.allclose(read, kv, atol=1e-6) and (sink, recent) == (16, 32)
    atlas = Atlas.load(atlas_path)
    for fraction in (0.25, 0.5):
        exported = HeadPolicy.from_duo_file(tmp_path / "p" / "full_attention_heads.tsv", G, full_fraction=fraction)
        assert np.array_equal(exported.full, HeadPolicy.from_atlas(atlas, "duo", full_fraction=fraction).full)
        assert full_heads(exported) == top_heads(kv, exported.n_full)
    prov = json.loads((tmp_path / "p" / "headwise-provenance.json").read_text())
    assert prov["source"]["model"]["weights_sha256"] == "ab" * 32
    assert prov["source"]["atlas"]["sha256"] == hashlib.sha256(atlas_path.read_bytes()).hexdigest()
    assert prov["source"]["training"]["steps"] == 5 and prov["versions"]["headwise"]
    for name, digest in prov["files_sha256"].items():
        assert hashlib.sha256((tmp_path / "p" / name).read_bytes()).hexdigest() == digest
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["num_steps"] == 5 and config["reg_weight"] == 0.05  # DuoAttention's own argument names
    assert main(["export-duo", "--atlas", str(atlas_path), "--out", str(tmp_path / "q"), "--sink", "4",
                 "--recent", "8"]) == 0
    assert duoattention_load_attn_pattern(tmp_path / "q")[1:] == (4, 8)


def test_windowed_layers_are_written_full_and_stay_unselectable(tmp_path):
    kv = np.array([[np.nan, np.nan], [0.2, 0.9], [0.6, 0.1]])  # layer 0 is a model-windowed layer
    atlas_path = _duo_atlas(GS, kv, tmp_path / "atlas.json")
    assert main(["export-duo", "--atlas", str(atlas_path), "--out", str(tmp_path / "p")]) == 0
    read = duoattention_load_attn_pattern(tmp_path / "p")[0]
    assert read[0].tolist() == [1.0, 1.0] and np.allclose(read[1:], kv[1:], atol=1e-6)
    exported = HeadPolicy.from_duo_file(tmp_path / "p" / "full_attention_heads.tsv", GS, full_fraction=0.5)
    assert np.array_equal(exported.full, HeadPolicy.from_atlas(Atlas.load(atlas_path), "duo", full_fraction=0.5).full)


def test_atlas_without_duo_score_is_one_line(tmp_path, capsys):
    atlas = Atlas.new(MODEL, G, {})
    atlas.set_score("retrieval", np.zeros((4, 6)), family="retrieval", probe=None, description="r", needs_full="high")
    path = atlas.save(tmp_path / "atlas.json")
    assert main(["export-duo", "--atlas", str(path), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "headwise profile --scores duo" in err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("gates, sink, match", [
    (np.array([0.1, 0.2]), 4, "matrix"),
    (np.array([[0.1, np.nan]]), 4, "finite"),
    (np.array([[0.1, 1.5]]), 4, r"\[0, 1\]"),
    (np.array([[0.1, 0.5]]), -1, "--sink"),
])
def test_bad_gates_are_refused(tmp_path, gates, sink, match):
    with pytest.raises(HeadwiseError, match=match):
        export_duo_pattern(gates, tmp_path / "p", sink=sink, recent=8, source={})


@pytest.mark.skipif(not REAL_ATLAS.is_file(), reason="the repository's smollm2 duo atlas is not here")
def test_the_repositorys_smollm2_gates_export_the_same_ranking(tmp_path):
    assert main(["export-duo", "--atlas", str(REAL_ATLAS), "--out", str(tmp_path / "p")]) == 0
    atlas = Atlas.load(REAL_ATLAS)
    read, sink, recent = duoattention_load_attn_pattern(tmp_path / "p")
    assert read.shape == (30, 3) and (sink, recent) == (128, 256)
    assert np.array_equal(read, atlas.score("duo", "kv_max"))
    for fraction in (0.25, 0.5):
        exported = HeadPolicy.from_duo_file(tmp_path / "p" / "full_attention_heads.tsv", atlas.geometry,
                                            full_fraction=fraction)
        assert np.array_equal(exported.full, HeadPolicy.from_atlas(atlas, "duo", full_fraction=fraction).full)
