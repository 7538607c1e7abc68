"""The registered attention function: exact outputs, observers, and head interventions."""

import numpy as np
import pytest
import torch

import headwise
from headwise import Session, ablation_scale, single_head_ablation_scales
from headwise.errors import HeadwiseError
from headwise.instrument import Observer
from tests.conftest import tiny_model, tiny_tokenizer, tiny_vision_model
from tests.reference import eager_attentions


def _out_proj(model, layer):
    """The module that projects concatenated head outputs back to the residual stream."""
    block = model.transformer.h[layer].attn if hasattr(model, "transformer") else model.model.layers[layer].self_attn
    return block.c_proj if hasattr(block, "c_proj") else block.o_proj


def _ids(seed=0, batch=2, length=20):
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


class _Keep(Observer):
    def __init__(self):
        self.chunks = {}

    def observe(self, chunk):
        n = chunk.weights.shape[-1]
        full = torch.nn.functional.pad(chunk.weights, (0, chunk.n_queries - n))
        self.chunks.setdefault(chunk.layer, []).append(full)


def test_plain_forward_equals_sdpa_and_eager(tiny):
    ids = _ids()
    with torch.no_grad():
        ours = tiny.model(ids).logits
        tiny.model.set_attn_implementation("eager")
        eager = tiny.model(ids).logits
        tiny.model.set_attn_implementation("headwise")
        keep = _Keep()
        with Session(tiny.geometry, [keep], chunk_bytes=1500):
            observed = tiny.model(ids).logits
    torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(observed, eager, atol=1e-5, rtol=1e-5)
    atts = eager_attentions(tiny.model, ids)
    for layer, chunks in keep.chunks.items():
        assert len(chunks) > 1  # the small budget really chunked the queries
        np.testing.assert_allclose(torch.cat(chunks, dim=2).numpy(), atts[layer], atol=1e-6)


@pytest.mark.parametrize("heads", [[(1, 2)], [(0, 0), (2, 3), (2, 1)]])
def test_ablation_equals_zeroing_the_heads_input_to_the_output_projection(tiny, heads):
    ids = _ids(1)
    hd = tiny.geometry.head_dim
    hooks = []
    for layer, head in heads:
        def zero(module, args, head=head):
            x = args[0].clone()
            x[..., head * hd:(head + 1) * hd] = 0
            return (x,)
        hooks.append(_out_proj(tiny.model, layer).register_forward_pre_hook(zero))
    tiny.model.set_attn_implementation("eager")
    with torch.no_grad():
        reference = tiny.model(ids).logits
    for h in hooks:
        h.remove()
    tiny.model.set_attn_implementation("headwise")
    with torch.no_grad(), Session(tiny.geometry, head_scale=ablation_scale(tiny.geometry, heads)):
        ablated = tiny.model(ids).logits
    with torch.no_grad():
        clean = tiny.model(ids).logits
    torch.testing.assert_close(ablated, reference, atol=1e-5, rtol=1e-5)
    assert (ablated - clean).abs().max() > 1e-3  # the ablation did something


def test_ablation_touches_only_that_heads_slice(tiny):
    layer, head, hd = 1, 2, tiny.geometry.head_dim
    seen = {}
    proj = _out_proj(tiny.model, layer)
    handle = proj.register_forward_pre_hook(lambda m, a: seen.setdefault(len(seen), a[0].clone()))
    ids = _ids(2)
    with torch.no_grad():
        tiny.model(ids)
        with Session(tiny.geometry, head_scale=ablation_scale(tiny.geometry, [(layer, head)], 0.5)):
            tiny.model(ids)
    handle.remove()
    clean, scaled = seen[0], seen[1]
    part = slice(head * hd, (head + 1) * hd)
    torch.testing.assert_close(scaled[..., part], 0.5 * clean[..., part])
    others = torch.ones(clean.shape[-1], dtype=torch.bool)
    others[part] = False
    torch.testing.assert_close(scaled[..., others], clean[..., others])


def test_batched_single_head_ablations_equal_one_pass_per_head(tiny):
    g = tiny.geometry
    heads = [(layer, head) for layer in range(g.n_layers) for head in range(g.n_heads)]
    ids = _ids(3, batch=1)
    scales = single_head_ablation_scales(g, heads)
    with torch.no_grad(), Session(g, head_scale=scales):
        batched = tiny.model(ids.expand(len(heads), -1)).logits
    for i, h in enumerate(heads):
        with torch.no_grad(), Session(g, head_scale=ablation_scale(g, [h])):
            single = tiny.model(ids).logits
        torch.testing.assert_close(batched[i:i + 1], single, atol=2e-5, rtol=1e-5)


def test_padded_batch_rows_equal_unpadded_rows():
    m = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer())
    ids = _ids(4, batch=1, length=12)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    keep = _Keep()
    with torch.no_grad():
        plain = m.model(ids).logits
        with Session(m.geometry, [keep]):
            pad_out = m.model(padded, attention_mask=mask).logits
    torch.testing.assert_close(pad_out[:, 4:], plain, atol=1e-4, rtol=1e-4)
    assert all(torch.isfinite(torch.cat(c, 2)).all() for c in keep.chunks.values())


def test_bad_head_scale_and_heads_are_refused(tiny):
    g = tiny.geometry
    with pytest.raises(HeadwiseError, match="head_scale must be"):
        Session(g, head_scale=torch.ones(g.n_layers + 1, g.n_heads))
    with pytest.raises(HeadwiseError, match="outside"):
        ablation_scale(g, [(g.n_layers, 0)])
    with torch.no_grad(), Session(g, head_scale=torch.ones(3, g.n_layers, g.n_heads)):
        with pytest.raises(HeadwiseError, match="batch rows"):
            tiny.model(_ids(batch=2))


def test_architecture_outside_the_attention_interface_is_refused():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=96, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(HeadwiseError, match="outside transformers' AttentionInterface"):
        headwise.from_model(model, tiny_tokenizer())


def test_geometry_is_verified_from_the_layers_themselves(tiny):
    g = tiny.geometry
    assert g.n_layers == 3 and g.n_heads == 4 and g.n_heads % g.n_kv_heads == 0
    if g.model_type == "gemma3_text":
        assert g.layer_types == ("sliding", "sliding", "full") and g.sliding_window == (8, 8, None)


# ---- image models ---------------------------------------------------------------------------
def test_image_geometry_counts_prefix_tokens_from_the_layers(tiny_vision, vision_arch):
    g = tiny_vision.geometry
    prefix = {"vit": 1, "deit": 2, "dinov2-registers": 3}[vision_arch]  # CLS; + distillation; + 2 registers
    assert g.modality == "image" and g.patch_grid == (4, 4) and g.prefix_tokens == prefix and g.n_tokens == 16 + prefix
    assert headwise.Geometry.from_dict(g.to_dict()) == g


def test_image_model_forward_through_headwise_equals_eager(tiny_vision, vision_arch):
    pixels = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    eager = tiny_vision_model(vision_arch)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        ours, ref = tiny_vision.model(pixel_values=pixels).logits, eager(pixel_values=pixels).logits
        with Session(tiny_vision.geometry, [_Null()]):  # the observed (explicit) path too
            observed = tiny_vision.model(pixel_values=pixels).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(observed, ref, atol=1e-5, rtol=1e-5)


class _Null(Observer):
    def observe(self, chunk):
        pass


def test_text_geometry_json_is_unchanged_by_image_fields(tiny):
    assert "patch_grid" not in tiny.geometry.to_dict() and tiny.geometry.modality == "text"


@pytest.mark.parametrize("arch, prefix, suffix", [("clip", 1, 0), ("siglip", 0, 0), ("beit", 1, 0), ("yolos", 1, 5)])
def test_more_image_architectures_attach_without_adapters(arch, prefix, suffix):
    """CLIP and SigLIP vision towers, BEiT and YOLOS (whose detection tokens come after the patches)."""
    import transformers

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=3)
    cls, config = {"clip": ("CLIPVisionModel", "CLIPVisionConfig"),
                   "siglip": ("SiglipVisionModel", "SiglipVisionConfig"),
                   "beit": ("BeitForImageClassification", "BeitConfig"),
                   "yolos": ("YolosForObjectDetection", "YolosConfig")}[arch]
    extra = {"image_size": [12, 12], "num_detection_tokens": 5} if arch == "yolos" else {"image_size": 12}
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config)(**common, **extra))
    g = headwise.from_model(model, name=arch).geometry
    assert (g.patch_grid, g.prefix_tokens, g.suffix_tokens) == ((4, 4), prefix, suffix)
