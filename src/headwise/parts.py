"""The parts of a decoder every method reaches into, found the same way for any architecture.

headwise never patches a model class. Methods that need more than the attention function
(the batched ablation replays layer outputs, the successor score runs OV circuits, pruning
slices projections) find the decoder layers, each layer's attention module and output
projection, the final norm and the logits here, by structure rather than by class name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .devices import execution_device
from .errors import HeadwiseError
from .geometry import Geometry


def attention_modules(model: torch.nn.Module, geometry: Geometry) -> list[torch.nn.Module]:
    """The attention module of every layer, as headwise.attach registered them."""
    found = {m._headwise_layer: m for m in model.modules() if getattr(m, "_headwise_layer", None) is not None}
    if sorted(found) != list(range(geometry.n_layers)):
        raise HeadwiseError("the model's attention modules are not registered; load it with headwise.load or "
                            "headwise.from_model")
    return [found[i] for i in range(geometry.n_layers)]


def decoder_layers(model: torch.nn.Module, geometry: Geometry) -> list[torch.nn.Module]:
    """The blocks the residual stream passes through, in order (the ModuleList holding the attention)."""
    attn = attention_modules(model, geometry)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == geometry.n_layers and all(
                any(sub is attn[i] for sub in block.modules()) for i, block in enumerate(module)):
            return list(module)
    raise HeadwiseError(f"could not find the decoder layers of {type(model).__name__}")


_PROJECTION_NAMES = ("o_proj", "c_proj", "out_proj", "dense", "wo")


def output_projection(attention: torch.nn.Module) -> torch.nn.Module:
    """The module mapping the concatenated head outputs back to the residual stream."""
    for name in _PROJECTION_NAMES:
        proj = getattr(attention, name, None)
        if isinstance(proj, torch.nn.Module):
            return proj
    raise HeadwiseError(f"{type(attention).__name__} has no output projection named {', '.join(_PROJECTION_NAMES)}")


@torch.no_grad()
def projection_matrix(attention: torch.nn.Module, geometry: Geometry) -> Tensor:
    """[q_heads, head_dim, hidden]: head h's slice of the output projection, without its bias.

    Read by applying the projection to unit vectors, so the weight layout (nn.Linear's
    [out, in], GPT-2 Conv1D's transposed [in, out]) never has to be known.
    """
    proj = output_projection(attention)
    width = geometry.n_heads * geometry.head_dim
    dtype, device = next(proj.parameters()).dtype, execution_device(proj)  # offloaded weights sit on "meta"
    eye = torch.eye(width, dtype=dtype, device=device)
    rows = proj(torch.cat([eye, torch.zeros(1, width, dtype=dtype, device=device)]))
    matrix = (rows[:-1] - rows[-1:]).float()
    return matrix.reshape(geometry.n_heads, geometry.head_dim, -1)


def lm_logits(model: torch.nn.Module, hidden: Tensor) -> Tensor:
    """The model's logits from its final (normed) hidden states, as its own forward computes them."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def final_hidden(model: torch.nn.Module, input_ids: Tensor) -> Tensor:
    """[batch, T, hidden]: the base model's output (after the final norm), without the vocabulary logits."""
    return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_norm")


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm applied to the residual stream before the unembedding."""
    for name in _FINAL_NORMS:
        module = getattr(model.base_model, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise HeadwiseError(f"could not find the final norm of {type(model).__name__}")


__all__ = ["attention_modules", "decoder_layers", "final_hidden", "final_norm", "lm_logits", "output_projection",
           "projection_matrix"]
