"""successor: how often a head's OV circuit increments an ordinal token (Gould et al., arXiv 2312.09230).

The variant implemented is the paper's succession score, computed from weights:

    for each ordinal token t (probes/ordinal.py: numbers, number words, ordinal words, days,
    day prefixes, months, month prefixes, letters; single tokens only), take its effective
    embedding e(t), put it through head h's OV circuit and the unembedding,
        logits_h(t) = W_U . norm_final( W_O^h W_V^h norm_L(e(t)) ),
    and count a success when succ(t) has the highest logit among the members of t's own
    sequence. successor[L][H] = successes / successions, pooled over every task.

Details, and why:
- Effective embedding (the paper: the token through MLP0, since the embedding alone carries
  little of a token's meaning in most LMs): e(t) = the residual stream after block 0 when t is
  the whole input, for heads of layers >= 1. Heads of layer 0 read what that layer actually
  reads, the embedding of t.
- The OV circuit is evaluated by running the model's own modules (the layer's input norm,
  value projection, grouped KV heads) on e(t) as a one-token sequence, where attention puts
  weight 1 on the only key: the output-projection input is exactly head h's value of t. The
  value of a zero residual (biases: the norm's and the value projection's) is subtracted, as in
  TransformerLens's bias-free W_OV = W_V W_O, so only the token-dependent part is scored.
- Gemma2/3 normalise the attention output before adding it to the residual stream; that
  norm is applied to the head's output. The final norm and the unembedding are applied
  without their additive biases, which favour the same token for every t and every head.
- "Highest among the members of its sequence" is the paper's criterion: a successor head
  need not make succ(t) the top token of the whole vocabulary.
Chance level is about 1/(members of the task) per succession.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._progress import progress
from ..errors import HeadwiseError
from ..geometry import Geometry
from ..parts import attention_modules, decoder_layers, final_norm, output_projection, projection_matrix
from ..probes.ordinal import OrdinalTask, ordinal_tasks
from ..roles import RoleRule
from .base import ComputedScoreFamily, Score, ScoreResult


class _Stop(Exception):
    pass


def _run_until(model: torch.nn.Module, n: int) -> None:
    """Run the base model on n one-token rows until a hook raises _Stop."""
    device = next(model.parameters()).device
    try:
        model.base_model(input_ids=torch.zeros(n, 1, dtype=torch.long, device=device), use_cache=False)
    except _Stop:
        return
    raise HeadwiseError("the successor probe never reached the module it waits for")  # pragma: no cover


@torch.no_grad()
def token_embeddings(model: torch.nn.Module, geometry: Geometry, token_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(what layer 0 reads, the residual stream after block 0) for each token alone: [n, hidden] each."""
    layers = decoder_layers(model, geometry)
    seen: dict[str, Tensor] = {}

    def before(module, args, kwargs):
        seen["input"] = (args[0] if args else kwargs["hidden_states"])[:, 0].float()

    def after(module, args, kwargs, out):
        seen["output"] = (out[0] if isinstance(out, tuple) else out)[:, 0].float()
        raise _Stop

    h1 = layers[0].register_forward_pre_hook(before, with_kwargs=True)
    h2 = layers[0].register_forward_hook(after, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        model.base_model(input_ids=token_ids.reshape(-1, 1).to(device), use_cache=False)
    except _Stop:
        pass
    finally:
        h1.remove()
        h2.remove()
    return seen["input"], seen["output"]


@torch.no_grad()
def head_values(model: torch.nn.Module, geometry: Geometry, residuals: Sequence[Tensor]) -> list[Tensor]:
    """Per layer, [n, q_heads, head_dim]: each query head's value of `residuals[layer]` [n, hidden]
    entering that layer as a one-token sequence (attention weight 1 on it), as the output
    projection receives it. One forward pass serves every layer: each layer's input is replaced."""
    layers = decoder_layers(model, geometry)
    attention = attention_modules(model, geometry)
    dtype = next(model.parameters()).dtype
    n = residuals[0].shape[0]
    seen: dict[int, Tensor] = {}
    hooks = []
    for layer, block in enumerate(layers):
        def replace_input(module, args, kwargs, layer=layer):
            x = residuals[layer][:, None, :].to(dtype)
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        def capture(module, args, layer=layer):
            seen[layer] = args[0][:, 0].float()
            if layer == len(layers) - 1:
                raise _Stop

        hooks.append(block.register_forward_pre_hook(replace_input, with_kwargs=True))
        hooks.append(output_projection(attention[layer]).register_forward_pre_hook(capture))
    try:
        _run_until(model, n)
    finally:
        for hook in hooks:
            hook.remove()
    return [seen[layer].reshape(n, geometry.n_heads, geometry.head_dim) for layer in range(len(layers))]


@torch.no_grad()
def ov_outputs(model: torch.nn.Module, geometry: Geometry, layer: int, values: Tensor) -> Tensor:
    """[n, q_heads, hidden]: each head's OV output for values [n + 1, q_heads, head_dim] (the last
    row: the value of a zero residual, subtracted), through the attention-output norm (Gemma) and
    the final norm, biases removed (see the module docstring). Multiply by unembedding rows to get logits."""
    values = values[:-1] - values[-1:]
    w_o = projection_matrix(attention_modules(model, geometry)[layer], geometry)  # [H, d, hidden]
    out = torch.einsum("nhd,hdm->nhm", values, w_o)
    block = decoder_layers(model, geometry)[layer]
    dtype = next(model.parameters()).dtype
    if hasattr(block, "pre_feedforward_layernorm") and hasattr(block, "post_attention_layernorm"):
        out = block.post_attention_layernorm(out.to(dtype)).float()  # Gemma's sandwich norm on the attention output
    norm = final_norm(model)
    return (norm(out.to(dtype)) - norm(torch.zeros_like(out[:1, :1]).to(dtype))).float()


@torch.no_grad()
def successor_scores(model: torch.nn.Module, geometry: Geometry,
                     tasks: Sequence[OrdinalTask]) -> tuple[np.ndarray, np.ndarray]:
    """(successor [layers, heads], per-task successor [layers, heads, tasks])."""
    unembed = model.get_output_embeddings().weight
    if unembed.device.type == "meta":  # offloaded by a device map: only a forward pass brings it in
        raise HeadwiseError("the successor score reads the unembedding's weights, which the device map offloads to "
                            "disk; keep lm_head on a device (e.g. device_map {..., 'lm_head': 'cpu'}) or drop "
                            "--scores successor")
    tasks = list(tasks)
    all_ids = torch.tensor(sorted({i for t in tasks for i in t.members}), dtype=torch.long)
    row_of = {int(i): r for r, i in enumerate(all_ids)}
    embedding, effective = token_embeddings(model, geometry, all_ids)
    zero = embedding.new_zeros(1, embedding.shape[1])
    inputs = [torch.cat([embedding if layer == 0 else effective, zero]) for layer in range(geometry.n_layers)]
    values = head_values(model, geometry, inputs)
    hits = np.zeros((geometry.n_layers, geometry.n_heads, len(tasks)))
    counts = np.array([len(t.pairs) for t in tasks], dtype=float)
    for layer in progress(range(geometry.n_layers), desc="successor", total=geometry.n_layers, unit="layer"):
        out = ov_outputs(model, geometry, layer, values[layer])  # [N, H, hidden]
        for k, task in enumerate(tasks):
            members = torch.tensor(task.members)
            rows = torch.tensor([row_of[a] for a, _ in task.pairs])
            logits = out[rows] @ unembed[members.to(unembed.device)].float().T  # [pairs, H, members]
            predicted = members[logits.argmax(-1).cpu()]
            successors = torch.tensor([b for _, b in task.pairs])
            hits[layer, :, k] = (predicted == successors[:, None]).sum(0).numpy()
    return hits.sum(-1) / counts.sum(), hits / counts


class SuccessorScores(ComputedScoreFamily):
    family = "successor"
    scores = (Score("successor", "fraction of ordinal tokens whose successor the head's OV circuit ranks top among "
                                 "its sequence (Gould et al. 2023)",
                    role=RoleRule("successor", "successor", ">", 0.5,
                                  "Gould et al. 2023 (arXiv 2312.09230) report the succession score (fraction of "
                                  "ordinal tokens whose successor the head's OV circuit ranks top in its sequence) "
                                  "without a cut; headwise: the head increments most (> 50%) of the probe's ordinal "
                                  "tokens", precedence=6)),)

    def compute(self, loaded: Any, settings: Any, names: list[str]) -> ScoreResult:
        tasks = ordinal_tasks(loaded.tokenizer)
        score, per_task = successor_scores(loaded.model, loaded.geometry, tasks)
        run = {"probe": "ordinal", "tasks": [t.to_dict() for t in tasks],
               "effective_embedding": "residual after block 0, token alone (layer 0: the embedding)"}
        profile = {"bins": [t.name for t in tasks], "values": per_task}
        return ScoreResult(scores={"successor": score}, profiles={"successor_tasks": profile}, settings=run)


__all__ = ["SuccessorScores", "head_values", "ov_outputs", "successor_scores", "token_embeddings"]
