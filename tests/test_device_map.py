"""headwise.load(spec, device_map=...): a model split over devices scores and caches exactly as unsplit.

This machine has one CPU and no GPU, so the split is "cpu" + "disk": accelerate keeps the disk
modules' weights in the safetensors file ("meta" tensors in the model) and its hooks load them
when the module runs. That exercises every place headwise finds a device (offloaded weights on
"meta", accelerate's own forward on each layer, which the batched ablation's replay swaps out and
back), but not two compute devices: the per-layer .to(device) edits are not exercised here.

Equality is exact (torch.equal / np.array_equal): both models run the same CPU kernels on the same
float32 weights read from the same file, in the same order; accelerate only moves tensors, which on
one CPU copies bits. Any difference means a layer was skipped, run twice or fed the wrong input.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import headwise
from headwise import HeadwiseError
from headwise.decode import forward
from headwise.kv import HeadPolicy, HeadwiseCache, parse_policy
from headwise.kv.generate import generate
from headwise.profile import ProfileSettings, profile
from tests.conftest import tiny_model, tiny_tokenizer

# Embeddings, one decoder layer and the unembedding on disk: the inputs' first module is offloaded too.
SPLIT = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
         "model.norm": "cpu", "lm_head": "disk"}
SCORES = ["previous_token", "induction", "sink", "importance_ablation", "importance_norm", "importance_grad"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama-gqa").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    rng = np.random.default_rng(0)
    (d / "words.txt").write_text(" ".join(f"t{rng.integers(0, 30)}" for _ in range(600)))
    return d


@pytest.fixture(scope="module")
def pair(saved, tmp_path_factory):
    whole = headwise.load(str(saved))
    split = headwise.load(str(saved), device_map=SPLIT, offload_folder=tmp_path_factory.mktemp("offload"))
    return whole, split


def test_the_split_is_real_and_recorded(pair):
    whole, split = pair
    assert split.model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    assert split.model.model.embed_tokens.weight.device.type == "meta"
    assert split.device == torch.device("cpu")  # where inputs go, although the first parameter is on "meta"
    assert split.info.device_map == SPLIT and split.info.to_dict()["device_map"] == SPLIT
    assert "device_map" not in whole.info.to_dict()  # unsplit outputs keep their old model record
    assert split.info.weights_sha256 == whole.info.weights_sha256


def test_profile_scores_equal_unsplit(pair, saved):
    whole, split = pair
    settings = ProfileSettings(context=64, text=str(saved / "words.txt"), block_len=8, repeated_sequences=2,
                               importance_context=12, importance_sequences=2, ablation_tokens=48)
    a, b = profile(whole, SCORES, settings), profile(split, SCORES, settings)
    for name in SCORES:
        assert np.isfinite(a.score(name)).all(), name
        assert np.array_equal(a.score(name), b.score(name)), name
    assert b.model["device_map"] == SPLIT
    # ablation_tokens=48 forces several passes, so layers 0-1 are replayed (their hooked forward swapped out
    # and back): after profiling, every layer still runs through accelerate's hook (layer 1's weights are on disk).
    assert all("forward" in vars(layer) for layer in split.model.model.layers)
    with torch.inference_mode():
        assert torch.equal(whole.model(_prompt()).logits, split.model(_prompt()).logits)


def test_a_score_that_reads_offloaded_weights_is_refused_in_one_line(pair):
    from headwise.probes.ordinal import OrdinalTask
    from headwise.scores.successor import successor_scores

    split = pair[1]
    with pytest.raises(HeadwiseError, match="lm_head"):
        successor_scores(split.model, split.geometry, [OrdinalTask("t", ("a", "b"), (3, 4), (True,), "bare")])


def _prompt() -> torch.Tensor:
    return torch.tensor([[1] + [3 + (i * 7) % 40 for i in range(40)]])


@pytest.mark.parametrize("spec", ["full", "random@0.5+whole", "random@0.5", "snapkv@16"])
def test_generation_equals_unsplit(pair, spec):
    whole, split = pair
    policy = parse_policy(spec, whole.geometry, sink=4, window=8)
    a = generate(whole, _prompt(), policy, max_new_tokens=8, until="budget")
    b = generate(split, _prompt(), policy, max_new_tokens=8, until="budget")
    assert len(a.tokens) == 8 and a.tokens == b.tokens
    assert a.kv_report["per_head_bytes"] == b.kv_report["per_head_bytes"]


def _cached(loaded, policy) -> list[torch.Tensor]:
    """Every tensor a HeadwiseCache holds after the prompt and two decoded tokens."""
    cache = HeadwiseCache(policy, max_length=48)
    with torch.inference_mode():
        logits, cache = forward(loaded.model, _prompt(), cache)
        for _ in range(2):
            logits, cache = forward(loaded.model, logits.argmax(-1), cache)
    held = []
    for layer in cache.layers:  # what each layer holds, not the unwritten slots of its buffers
        if hasattr(layer, "store"):
            held += [layer.store.keys, layer.store.values]
        else:
            held += [layer.full.keys, layer.full.values, *layer.streaming.visible()] if layer.full.k is not None \
                else list(layer.streaming.visible())
    return held


def test_cache_contents_equal_unsplit(pair):
    whole, split = pair
    mixed = HeadPolicy.random(whole.geometry, 0.5, seed=1, sink=4, window=8)
    assert 0 < mixed.n_full < mixed.n_selectable
    a, b = _cached(whole, mixed), _cached(split, mixed)
    assert len(a) == len(b) and a and all(torch.equal(x, y) for x, y in zip(a, b))


def test_auto_map_loads_and_is_recorded(saved):
    loaded = headwise.load(str(saved), device_map="auto")
    assert loaded.info.device_map == {"": "cuda:0" if torch.cuda.is_available() else "cpu"}  # fits on one device


@pytest.mark.parametrize("device_map,offload,said", [
    ({k: v for k, v in SPLIT.items() if k != "model.layers.1"}, None, "leaves model.layers.1 on no device"),
    ({"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu"}, None, "leaves lm_head on no device"),
    ({**SPLIT, "model.layer.3": "cpu"}, None, "'model.layer.3', which LlamaForCausalLM does not have"),
    ({**SPLIT, "model.layers.0": "meta"}, None, "on 'meta', which holds no weights"),
    ({**SPLIT, "model.layers.0": "tpu"}, None, "which is not a device"),
    ({**SPLIT, "model.layers": "cpu"}, None, "gives both 'model.layers' and 'model.layers.0'"),
    ("balanced", None, "device_map 'balanced' is not understood"),
    ({}, None, "non-empty dict"),
    (None, "offload", "offload_folder is only used with a device_map"),
])
def test_bad_maps_are_refused_in_one_line(saved, tmp_path, device_map, offload, said):
    with pytest.raises(HeadwiseError) as e:
        headwise.load(str(saved), device_map=device_map, offload_folder=tmp_path / offload if offload else None)
    assert said in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_is_refused_without_a_gpu(saved):
    for device in ("cuda:0", 0):
        with pytest.raises(HeadwiseError, match="this machine has no CUDA device"):
            headwise.load(str(saved), device_map={**SPLIT, "model.layers.2": device})


def test_tied_weights_on_two_devices_are_refused(tmp_path):
    tiny_model("gemma3-sliding").save_pretrained(tmp_path)  # ties its unembedding to its embeddings
    tiny_tokenizer().save_pretrained(tmp_path)
    said = "'model.embed_tokens' (cpu) and 'lm_head' (disk), which share tied weights"
    with pytest.raises(HeadwiseError, match=re.escape(said)):
        headwise.load(str(tmp_path), device_map={**SPLIT, "model.embed_tokens": "cpu"})
    same = headwise.load(str(tmp_path), device_map=SPLIT)  # both on disk: read from the one stored tensor
    ids = torch.tensor([[1, 5, 9, 12, 30, 7]])
    with torch.inference_mode():
        assert torch.equal(same.model(ids).logits, tiny_model("gemma3-sliding")(ids).logits)


def test_device_and_device_map_together_are_refused(saved):
    with pytest.raises(HeadwiseError, match="not both"):
        headwise.load(str(saved), device="cuda", device_map=SPLIT)


def test_the_map_is_checked_before_any_weight_is_read(saved, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in saved.iterdir():
        (broken / f.name).write_bytes(b"not safetensors" if f.suffix == ".safetensors" else f.read_bytes())
    with pytest.raises(HeadwiseError, match="leaves lm_head on no device"):
        headwise.load(str(broken), device_map={k: v for k, v in SPLIT.items() if k != "lm_head"})


@pytest.mark.slow
def test_bundled_gguf_model_splits(smollm2, tmp_path):
    """The GGUF path: de-quantized once into safetensors, then loaded with the map like any directory."""
    n = smollm2.geometry.n_layers
    device_map = {"model.embed_tokens": "disk", "model.norm": "cpu", "lm_head": "disk",  # tied: one device
                  **{f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(n)}}
    split = headwise.load("smollm2-135m", device_map=device_map, offload_folder=tmp_path)
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        a, b = smollm2.model(ids).logits, split.model(ids).logits
    assert torch.equal(a, b) and split.info.device_map == device_map
