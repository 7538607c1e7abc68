"""A small profiled atlas (tiny random model) with attention samples, shared by the report tests."""

from __future__ import annotations

import json

import numpy as np
import pytest

HOSTILE_SCRIPT = "<script>alert(1)</script>"
HOSTILE_IMG = "<img src=x onerror=alert(2)>"
HOSTILE_CLOSE = "</script><script>alert(3)</script>"


def profile_tiny(out, arch: str = "llama-gqa", name: str | None = None, context: int = 400):
    """Profile a tiny model quickly and collect its attention samples into `out`; returns (loaded, settings)."""
    import headwise
    from headwise.profile import ProfileSettings, profile
    from headwise.report import collect_samples
    from tests.conftest import tiny_model, tiny_tokenizer

    loaded = headwise.from_model(tiny_model(arch), tiny_tokenizer(), name=name or f"tiny-{arch}")
    text = out.parent / f"{out.name}-text.txt"
    text.write_text(" ".join(f"t{(i * 7) % 90}" for i in range(3000)))
    # A streaming cache smaller than the context, so that streamable_mass measures something.
    small = {} if context > 64 + 256 else {"sink_tokens": 4, "window": context // 4}
    settings = ProfileSettings(context=context, text=str(text), text_sequences=1, repeated_sequences=2,
                               razor_sequences=1, block_len=16, **small)
    profile(loaded, None, settings).save(out)
    collect_samples(loaded, settings, out)
    return loaded, settings


@pytest.fixture(scope="session")
def hostile_atlas_dir(tmp_path_factory):
    """An atlas whose model name, tokens, needle and validation text are HTML/script injections."""
    out = tmp_path_factory.mktemp("report") / "atlas"
    profile_tiny(out, name=HOSTILE_IMG)
    meta_path = out / "attention_samples.json"
    meta = json.loads(meta_path.read_text())
    meta["short"]["tokens"][1] = HOSTILE_SCRIPT
    meta["short"]["tokens"][2] = HOSTILE_CLOSE
    meta["long"]["tokens"][:3] = [HOSTILE_SCRIPT, HOSTILE_IMG, HOSTILE_CLOSE]
    meta["long"]["needle"] = HOSTILE_SCRIPT
    meta_path.write_text(json.dumps(meta))
    atlas_path = out / "atlas.json"
    atlas = json.loads(atlas_path.read_text())
    L, H = atlas["geometry"]["n_layers"], atlas["geometry"]["n_heads"]
    # Every validation entry is an object, as the atlas schema requires (and headwise validate writes).
    atlas["validation"] = {"notes": {"note": HOSTILE_CLOSE,
                                     "heads": [{"layer": 1, "head": 2, "verdict": HOSTILE_SCRIPT}]},
                           "ablation": {"loss_increase": [[0.01 * (layer * H + h) for h in range(H)]
                                                          for layer in range(L)]},
                           # the shape headwise validate writes
                           "induction@k2": {"role": "induction", "verdict": "FAILS: " + HOSTILE_IMG, "passes": False,
                                            "targeted_heads": [[1, 2, 0.5], [0, 0, 0.25]], "baseline": 1.5}}
    atlas_path.write_text(json.dumps(atlas))
    # Edited by hand after headwise wrote them: drop the manifest that would (rightly) refuse the edit.
    (out / "headwise-manifest.json").unlink()
    return out


def synthetic_atlas(L=30, H=9, KV=3, T=2048, short=63, short_side=63, long_side=64, seed=0):
    """An atlas and samples of the given shapes with random contents (default: smollm2-135m's shapes)."""
    rng = np.random.default_rng(seed)

    def m():
        return [[float(x) for x in row] for row in rng.random((L, H))]

    scores = {f"score_{i}": {"family": "f", "probe": "p", "description": "d", "settings": {}, "heads": m(),
                             "kv_max": [[0.0] * KV] * L, "kv_mean": [[0.0] * KV] * L} for i in range(14)}
    bins = [[0, 0]] + [[2 ** (k - 1), 2 ** k - 1] for k in range(1, 12)]
    data = {"model": {"spec": "shape-test", "weights_sha256": "0" * 64},
            "geometry": {"model_type": "llama", "n_layers": L, "n_heads": H, "n_kv_heads": KV, "head_dim": 64,
                         "layer_types": ["full"] * L, "sliding_window": [None] * L, "max_positions": 8192,
                         "vocab_size": 49152},
            "settings": {"context": T}, "versions": {}, "scores": scores,
            "profiles": {"distance": {"bins": bins, "values": rng.dirichlet(np.ones(12), (L, H)).tolist()}},
            "roles": {"rules": [], "labels": [[["sink"] if rng.random() < .4 else [] for _ in range(H)]
                                              for _ in range(L)]},
            "validation": {}}
    arrays = {"short_map": rng.random((L, H, short_side, short_side)).astype(np.float16),
              "long_map": rng.random((L, H, long_side, long_side)).astype(np.float16),
              "long_regions_mean": rng.dirichlet(np.ones(4), (L, H)).astype(np.float32),
              "long_regions_last": rng.dirichlet(np.ones(4), (L, H)).astype(np.float32),
              "long_last_row": rng.random((L, H, 128)).astype(np.float16)}
    words = ["the", " quick", " brown", " fox", "\u00e9t\u00e9", " \u4e2d\u6587"]
    meta = {"model": data["model"],
            "short": {"tokens": [words[i % 6] for i in range(short)], "block_len": 31, "prefix_len": 1,
                      "length": short},
            "long": {"tokens": [words[i % 6] for i in range(T)], "length": T, "regions": ["sink", "needle", "recent",
                                                                                          "other"],
                     "needle_span": [1000, 1024], "needle": "n", "question": "q", "sink_tokens": 4, "window": 256}}
    return data, (arrays, meta)
