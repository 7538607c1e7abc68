"""importance_grad / _norm / _ablation equal naive references: explicit masks on the output
projection's input under eager attention, one forward pass per head, explicit W_O slices."""

import numpy as np
import pytest
import torch

from headwise import Session, ablation_scale
from headwise.ablation import Readout, head_ablation_effects
from headwise.probes import natural_text
from headwise.profile import ProfileSettings, profile
from headwise.scores.importance import ablation_importance, gradient_importance, norm_importance


def _out_proj(model, layer):
    block = model.transformer.h[layer].attn if hasattr(model, "transformer") else model.model.layers[layer].self_attn
    return block.c_proj if hasattr(block, "c_proj") else block.o_proj


def _head_slice_weight(proj, head, hd):
    """[head_dim, hidden]: the explicit W_O slice (GPT-2's Conv1D stores [in, out], nn.Linear [out, in])."""
    w = proj.weight
    return w[head * hd:(head + 1) * hd, :] if type(proj).__name__ == "Conv1D" else w[:, head * hd:(head + 1) * hd].T


def _seq_losses(logits, ids):
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)


def _ids(tiny, word_file, n=3, t=12):
    return natural_text(tiny.tokenizer, context=t, n_sequences=n, seed=2, text=word_file).input_ids


def test_ablation_equals_one_forward_pass_per_head(tiny, word_file):
    ids, g, model = _ids(tiny, word_file), tiny.geometry, tiny.model
    # a small token budget forces several passes, some starting above layer 0 (replayed prefix)
    batched = ablation_importance(model, g, ids, max_tokens=5 * ids.numel())
    expected = np.zeros((g.n_layers, g.n_heads))
    with torch.no_grad():
        clean = _seq_losses(model(ids).logits, ids)
        for layer in range(g.n_layers):
            for head in range(g.n_heads):
                with Session(g, head_scale=ablation_scale(g, [(layer, head)])):
                    expected[layer, head] = (_seq_losses(model(ids).logits, ids) - clean).mean()
    np.testing.assert_allclose(batched, expected, atol=2e-5)
    assert np.abs(expected).max() > 1e-3  # ablations changed the loss


def test_kl_readout_equals_one_forward_pass_per_head(tiny, word_file):
    ids, g, model = _ids(tiny, word_file, n=2, t=9), tiny.geometry, tiny.model
    heads = [(0, 1), (1, 3), (2, 0), (2, 2)]
    readout = Readout(positions=torch.tensor([[8], [8]]), mask=torch.ones(2, 1, dtype=torch.bool))
    effects = head_ablation_effects(model, g, ids, readout, heads=heads, max_tokens=2 * ids.numel())
    with torch.no_grad():
        p = torch.log_softmax(model(ids).logits[:, -1].double(), -1)
        for layer, head in heads:
            with Session(g, head_scale=ablation_scale(g, [(layer, head)])):
                q = torch.log_softmax(model(ids).logits[:, -1].double(), -1)
            kl = (p.exp() * (p - q)).sum(-1)
            np.testing.assert_allclose(effects[:, layer, head].numpy(), kl.numpy(), atol=1e-6)
    assert torch.isnan(effects[:, 0, 0]).all()  # heads not asked for stay unscored


def test_gradient_equals_autograd_on_an_explicit_mask(tiny, word_file):
    ids, g, model = _ids(tiny, word_file), tiny.geometry, tiny.model
    ours = gradient_importance(model, g, ids, batch_size=2)
    hd = g.head_dim
    model.set_attn_implementation("eager")
    try:
        per_seq = []
        for b in range(ids.shape[0]):
            xi = torch.ones(g.n_layers, g.n_heads, requires_grad=True)
            hooks = []
            for layer in range(g.n_layers):
                def mask(module, args, layer=layer, xi=xi):
                    x = args[0]
                    parts = [x[..., h * hd:(h + 1) * hd] * xi[layer, h] for h in range(g.n_heads)]
                    return (torch.cat(parts, -1),)
                hooks.append(_out_proj(model, layer).register_forward_pre_hook(mask))
            loss = _seq_losses(model(ids[b:b + 1]).logits, ids[b:b + 1]).sum()
            (grad,) = torch.autograd.grad(loss, xi)
            for h in hooks:
                h.remove()
            per_seq.append(grad.abs())
    finally:
        model.set_attn_implementation("headwise")
    expected = torch.stack(per_seq).mean(0).double().numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)
    assert expected.max() > 1e-4
    # and finite differences agree with the autograd reference, for one head of sequence 0
    eps, (layer, head) = 1e-2, (1, 2)
    with torch.no_grad():
        with Session(g, head_scale=ablation_scale(g, [(layer, head)], 1 + eps)):
            up = _seq_losses(model(ids[:1]).logits, ids[:1])
        with Session(g, head_scale=ablation_scale(g, [(layer, head)], 1 - eps)):
            down = _seq_losses(model(ids[:1]).logits, ids[:1])
    assert abs(float((up - down) / (2 * eps))) == pytest.approx(float(per_seq[0][layer, head]), rel=2e-2, abs=2e-5)


def test_norm_equals_explicit_output_projection_slices(tiny, word_file):
    ids, g, model = _ids(tiny, word_file), tiny.geometry, tiny.model
    ours = norm_importance(model, g, ids, batch_size=2, chunk_bytes=4 * g.n_heads * 12 * 4 * 3)
    hd = g.head_dim
    seen = {}
    hooks = [_out_proj(model, layer).register_forward_pre_hook(lambda m, a, layer=layer: seen.__setitem__(layer, a[0]))
             for layer in range(g.n_layers)]
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            model(ids)
    finally:
        model.set_attn_implementation("headwise")
        for h in hooks:
            h.remove()
    expected = np.zeros((g.n_layers, g.n_heads))
    with torch.no_grad():
        for layer in range(g.n_layers):
            proj = _out_proj(model, layer)
            for head in range(g.n_heads):
                contrib = seen[layer][..., head * hd:(head + 1) * hd] @ _head_slice_weight(proj, head, hd)
                expected[layer, head] = contrib.abs().sum(-1).double().mean()
    np.testing.assert_allclose(ours, expected, rtol=1e-4)


def test_profile_lands_all_three_in_the_atlas(tiny, word_file):
    settings = ProfileSettings(text=word_file, importance_context=10, importance_sequences=2)
    atlas = profile(tiny, ["importance_grad", "importance_norm", "importance_ablation"], settings)
    g = tiny.geometry
    for name in ("importance_grad", "importance_norm", "importance_ablation"):
        assert atlas.score(name).shape == (g.n_layers, g.n_heads)
        assert np.isfinite(atlas.score(name)).all()
    assert atlas.data["settings"]["probes"]["importance_text"]["context"] == 10
    assert (atlas.score("importance_norm") > 0).all()


@pytest.mark.slow
def test_smollm2_gradient_importance_tracks_ablation(smollm2, tmp_path):
    """Michel et al.'s premise on the real model: the one-backward-pass gradient score ranks
    heads like their exact ablation effect (Spearman rho over every 5th layer's 54 heads, above
    0.23, the one-sided p < 0.05 bound for n = 54), and a few heads matter far more than the
    median head."""
    g = smollm2.geometry
    text = natural_text(smollm2.tokenizer, context=48, n_sequences=2, seed=0, text=_real_text(tmp_path)).input_ids
    grad = gradient_importance(smollm2.model, g, text, batch_size=2)
    heads = [(layer, head) for layer in range(0, g.n_layers, 5) for head in range(g.n_heads)]
    effects = head_ablation_effects(smollm2.model, g, text, Readout.language_model(text), heads=heads)
    abl = np.array([float(effects[:, layer, head].mean()) for layer, head in heads])
    sub = np.array([grad[layer, head] for layer, head in heads])
    rho = np.corrcoef(_ranks(sub), _ranks(abl))[0, 1]
    assert rho > 0.23, rho
    assert abl.max() > 10 * np.median(np.abs(abl))


def _ranks(x):
    return np.argsort(np.argsort(x)).astype(float)


def _real_text(tmp_path):
    from headwise.probes import bundled_text_files

    files = bundled_text_files()
    if files:
        return str(files[0])
    path = tmp_path / "prose.txt"
    path.write_text(_PROSE * 4)
    return str(path)


_PROSE = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
    "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
    "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the "
    "other way. There were a king with a large jaw and a queen with a plain face, on the throne of England; "
    "there were a king with a large jaw and a queen with a fair face, on the throne of France. "
)


# ---- image classifiers: the paper's pruning metrics ---------------------------------------------
def _image_reference(arch, pixels, labels):
    """One eager forward per head with that head's slice of the output projection's input zeroed by a hook."""
    from headwise.parts import output_projection
    from tests.conftest import tiny_vision_model

    model = tiny_vision_model(arch)
    model.set_attn_implementation("eager")
    attn = [m for m in model.modules() if hasattr(m, "o_proj") or type(m).__name__.endswith("SelfOutput")]
    projs = [output_projection(m) if hasattr(m, "o_proj") else m.dense for m in attn]
    L, H = len(projs), model.config.num_attention_heads
    hd = model.config.hidden_size // H
    with torch.no_grad():
        clean = model(pixel_values=pixels).logits
    loss0 = torch.nn.functional.cross_entropy(clean, labels, reduction="none")
    right0 = (clean.argmax(-1) == labels).double()
    loss_up, acc_drop, grad = np.zeros((L, H)), np.zeros((L, H)), np.zeros((L, H))
    for layer in range(L):
        for head in range(H):
            def mask(mod, args, head=head):
                x = args[0].clone()
                x[..., head * hd:(head + 1) * hd] = 0
                return (x,)
            handle = projs[layer].register_forward_pre_hook(mask)
            with torch.no_grad():
                out = model(pixel_values=pixels).logits
            handle.remove()
            loss_up[layer, head] = float((torch.nn.functional.cross_entropy(out, labels, reduction="none")
                                          - loss0).mean())
            acc_drop[layer, head] = float((right0 - (out.argmax(-1) == labels).double()).mean())
    # Michel et al.: per image, d loss / d xi for a mask xi = 1 on the head's slice.
    for i in range(pixels.shape[0]):
        xis = [torch.ones(H, requires_grad=True) for _ in range(L)]
        handles = [p.register_forward_pre_hook(lambda mod, args, xi=xi: (
            (args[0].reshape(*args[0].shape[:-1], H, hd) * xi[:, None]).reshape(args[0].shape),))
            for p, xi in zip(projs, xis)]
        loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels[i:i + 1]).logits, labels[i:i + 1])
        for layer, g in enumerate(torch.autograd.grad(loss, xis)):
            grad[layer] += g.abs().numpy() / pixels.shape[0]
        for h in handles:
            h.remove()
    return loss_up, acc_drop, grad


@pytest.mark.parametrize("arch", ["vit", "deit", "dinov2-registers"])
def test_image_importance_equals_one_pruned_head_at_a_time(arch):
    import headwise
    from headwise.scores.shared_probes import make_image_probe
    from tests.conftest import tiny_vision_model

    lm = headwise.from_model(tiny_vision_model(arch), name=arch)
    settings = ProfileSettings(image_count=6, ablation_tokens=3 * 6 * lm.geometry.n_tokens)  # 3 heads per pass
    atlas = profile(lm, ["importance_accuracy", "importance_ablation", "importance_grad"], settings)
    probe = make_image_probe(lm.preprocessor, lm.geometry, settings)
    loss_up, acc_drop, grad = _image_reference(arch, probe.pixel_values, probe.labels)
    np.testing.assert_allclose(atlas.score("importance_ablation"), loss_up, atol=2e-5)
    np.testing.assert_allclose(atlas.score("importance_accuracy"), acc_drop, atol=1e-6)  # the atlas keeps 6 digits
    np.testing.assert_allclose(atlas.score("importance_grad"), grad, rtol=1e-3, atol=1e-6)
    assert atlas.data["settings"]["probes"]["importance_images"]["labels"] == "true labels"


def test_importance_accuracy_is_refused_for_language_models(tiny):
    from headwise.errors import HeadwiseError

    with pytest.raises(HeadwiseError, match="importance_accuracy measures image classifiers"):
        profile(tiny, ["importance_accuracy"], ProfileSettings())
