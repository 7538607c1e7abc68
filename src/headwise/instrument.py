"""One registered attention function through which headwise observes and edits every head.

`attach(model)` switches a model's attention implementation to "headwise", a function
registered in transformers' AttentionInterface. Every architecture whose modeling code calls
that interface (Llama, Mistral, Qwen2/3, Gemma2/3, GPT-2, ...) then hands us, per layer, the
queries, the keys and values (KV heads before the GQA repeat), the mask and the sliding
window. No module class is patched.

Outside a `Session` the function is plain SDPA. Inside one:
- observers receive the attention probabilities one query chunk at a time and keep only
  statistics, so no layer's T x T map is ever held whole, let alone all layers' maps;
- `head_scale` multiplies each query head's output before the output projection (0 ablates
  a head). It may differ per batch row, so one forward pass can ablate many heads, one
  per row;
- `edits` (HeadEdits) change chosen heads' outputs or attention weights: how steering
  (headwise.steer) acts on a model.

Peak extra memory of the observed path: the repeated keys and values of one layer plus about
four [batch, heads, chunk, keys] float32 tensors, where the chunk is sized so that one such
tensor stays under `chunk_bytes` (default 8 MB: small blocks stay in the allocator's
cache; large ones are mapped and unmapped on every chunk, which costs more than the maths).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .devices import execution_device
from .errors import HeadwiseError
from .geometry import Geometry

IMPLEMENTATION = "headwise"
DEFAULT_CHUNK_BYTES = 8 * 2**20


@dataclass
class AttentionChunk:
    """The attention of a block of consecutive queries of one layer.

    Key index j is absolute position `key_offset + j`. Query row i sits at key index
    `query_index[i]` (its own key); causal heads attend to key indices <= that. `weights`
    covers key indices [0, keys_seen): keys that no row of the chunk may see (the causal
    future) are left out, and have zero attention.
    """

    layer: int
    weights: Tensor  # [batch, q_heads, chunk, keys_seen] float32 probabilities
    output: Tensor  # [batch, q_heads, chunk, head_dim] per-head output, before head_scale
    query_index: Tensor  # [chunk] long
    query_start: int  # first row of this chunk among the call's queries
    n_queries: int  # queries in the whole call
    key_offset: int
    module: torch.nn.Module


class Observer:
    """Receives every attention chunk of the forward passes it is active for."""

    def observe(self, chunk: AttentionChunk) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class HeadEdits:
    """Edits of heads applied in every forward pass of a Session (steering acts through these).

    output(layer, out) -> out: out [batch, queries, q_heads, head_dim] is each query head's
    attention output before the output projection (and before head_scale). It runs on every
    attention path, KV-cache views included, so a steered model decodes under any cache policy.
    weights(layer, probs, query_index, key_offset) -> probs: probs [batch, q_heads, chunk, keys]
    are the attention probabilities of a query chunk (query_index as in AttentionChunk). It
    forces the explicit path; a KV-cache view computes its own attention, so it is refused there.
    """

    output: Callable[[int, Tensor], Tensor] | None = None
    weights: Callable[[int, Tensor, Tensor, int], Tensor] | None = None


class Session:
    """Activate observers and head interventions for the forward passes inside `with`.

    head_scale: [layers, q_heads] applied to every batch row, or [batch, layers, q_heads].
    mix: replaces each layer's attention output, mix(module, layer, query, key, value, scaling,
    out) -> out with out [batch, queries, q_heads, head_dim] (DuoAttention's gated blend).
    edits: HeadEdits (steering).
    """

    def __init__(self, geometry: Geometry, observers: Sequence[Observer] = (), head_scale: Tensor | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, mix: Callable[..., Tensor] | None = None,
                 edits: HeadEdits | None = None):
        self.geometry = geometry
        self.mix = mix
        self.edits = edits
        self.observers = list(observers)
        self.chunk_bytes = int(chunk_bytes)
        if head_scale is not None:
            shape = tuple(head_scale.shape[-2:])
            if shape != (geometry.n_layers, geometry.n_heads) or head_scale.dim() not in (2, 3):
                raise HeadwiseError(f"head_scale must be [layers, heads] = [{geometry.n_layers}, {geometry.n_heads}] "
                                    f"(optionally with a leading batch dim); got {list(head_scale.shape)}")
        self.head_scale = head_scale
        self._token: contextvars.Token | None = None

    def __enter__(self) -> Session:
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.reset(self._token)

    def scale_for(self, layer: int, batch: int) -> Tensor | None:
        if self.head_scale is None:
            return None
        s = self.head_scale[..., layer, :]
        if s.dim() == 2 and s.shape[0] != batch:
            raise HeadwiseError(f"head_scale has {s.shape[0]} batch rows but the input has {batch}")
        return s if s.dim() == 2 else s.unsqueeze(0)


_ACTIVE: contextvars.ContextVar[Session | None] = contextvars.ContextVar("headwise_session", default=None)


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def _layer_of(module: torch.nn.Module) -> int:
    layer = getattr(module, "_headwise_layer", None)
    if layer is None:
        layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise HeadwiseError(f"{type(module).__name__} was not registered by headwise.attach(); attach the model first")
    return int(layer)


def observed_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, scaling: float, dropout: float, session: Session | None,
                       layer: int, **kwargs: Any) -> Tensor:
    """Explicit attention, query chunk by query chunk. Returns [batch, q_heads, queries, head_dim]."""
    b, hq, tq, _ = query.shape
    nk = key.shape[2]
    groups = hq // key.shape[1]
    k = _repeat_kv(key, groups).float()
    v = _repeat_kv(value, groups)
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    position_ids = kwargs.get("position_ids")
    key_offset = int(position_ids[0, -1]) - (nk - 1) if isinstance(position_ids, Tensor) and position_ids.numel() else 0
    query_index = torch.arange(nk - tq, nk, device=query.device)
    budget = session.chunk_bytes if session is not None else DEFAULT_CHUNK_BYTES
    step = max(1, min(tq, budget // max(1, b * hq * nk * 4)))
    out = query.new_empty(b, hq, tq, value.shape[-1])
    observers = session.observers if session is not None else []
    all_keys = torch.arange(nk, device=query.device)
    for start in range(0, tq, step):
        stop = min(start + step, tq)
        mask = None
        if attention_mask is not None:
            rows = slice(start, stop) if attention_mask.shape[-2] == tq else slice(None)
            mask = attention_mask[..., rows, -nk:]
        # Keys no row of this chunk may see are left out: under a causal mask that halves the work.
        if mask is None:
            n_seen = int(query_index[stop - 1]) + 1 if causal else nk
        elif mask.dtype == torch.bool:
            visible = torch.nonzero(mask.any(dim=tuple(range(mask.dim() - 1))))
            n_seen = int(visible[-1]) + 1 if len(visible) else 1
        else:
            n_seen = nk
        scores = torch.matmul(query[:, :, start:stop].float(), k[:, :, :n_seen].transpose(-1, -2)) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if mask is None:
            if causal:
                allowed = all_keys[None, :n_seen] <= query_index[start:stop, None]
                scores = scores.masked_fill_(~allowed, float("-inf"))
        elif mask.dtype == torch.bool:
            scores = scores.masked_fill_(~mask[..., :n_seen], float("-inf"))
        else:
            scores = scores + mask[..., :n_seen].float()
        if sinks is not None:
            sink_col = sinks.float().reshape(1, -1, 1, 1).expand(b, hq, stop - start, 1)
            probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        del scores
        probs.nan_to_num_(nan=0.0)  # fully masked rows (padding) attend to nothing
        if session is not None and session.edits is not None and session.edits.weights is not None:
            probs = session.edits.weights(layer, probs, query_index[start:stop], key_offset)
        if dropout and module.training:
            probs = torch.nn.functional.dropout(probs, p=dropout)
        chunk_out = torch.matmul(probs.to(v.dtype), v[:, :, :n_seen])
        out[:, :, start:stop] = chunk_out
        if observers:
            chunk = AttentionChunk(layer=layer, weights=probs, output=chunk_out, query_index=query_index[start:stop],
                                   query_start=start, n_queries=tq, key_offset=key_offset, module=module)
            for observer in observers:
                observer.observe(chunk)
        del probs
    return out


def headwise_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs: Any) -> tuple[Tensor, None]:
    """The function registered as attn_implementation="headwise"."""
    session = _ACTIVE.get()
    layer = _layer_of(module)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    edits = session.edits if session is not None else None
    explicit = (session is not None and session.observers) or kwargs.get("softcap") is not None \
        or kwargs.get("s_aux") is not None or (edits is not None and edits.weights is not None)
    # headwise.kv: a HeadwiseCache layer whose heads keep different tokens (streaming heads, SnapKV) returns a
    # view instead of plain [b, kv_heads, T, d] tensors from cache.update(); the view computes its own attention.
    attend = getattr(key, "headwise_attend", None)
    if attend is not None and edits is not None and edits.weights is not None:
        raise HeadwiseError("an edit of attention weights (ACT steering) runs with the full KV cache only; drop the "
                            "cache policy or use a steering method that edits head outputs")
    if attend is not None:
        out = attend(module, query, attention_mask, scaling, session=session, **kwargs)
    elif explicit:
        out = observed_attention(module, query, key, value, attention_mask, scaling, dropout, session, layer, **kwargs)
        out = out.transpose(1, 2)
    else:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        kwargs.pop("sliding_window", None)  # already folded into the mask by transformers
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        **kwargs)
    # out: [batch, queries, q_heads, head_dim], the layout the output projection reads.
    if session is not None and session.mix is not None and attend is None:
        out = session.mix(module, layer, query, key, value, scaling, out)
    if edits is not None and edits.output is not None:
        out = edits.output(layer, out)
    if session is not None:
        scale = session.scale_for(layer, out.shape[0])
        if scale is not None:
            out = out * scale.to(device=out.device, dtype=out.dtype)[:, None, :, None]  # layers may sit apart
    return out.contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, headwise_attention)
    # Boolean masks, omitted (None) when purely causal: the same masks SDPA gets.
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


_register()


def attach(model: Any, pixel_shape: tuple[int, int, int] | None = None) -> Geometry:
    """Route a model's attention through headwise and return its verified geometry.

    pixel_shape: (channels, height, width) of the images an image model will be fed (what its image
    processor produces; default: the config's image size). The patch grid is measured at that size.

    Raises HeadwiseError when the architecture computes attention outside transformers'
    AttentionInterface (headwise could neither observe nor edit its heads).
    """
    name = type(model).__name__
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        raise HeadwiseError(f"{name} computes attention outside transformers' AttentionInterface, so headwise cannot "
                            f"see its heads; use an architecture that routes through it (Llama, Mistral, Qwen2/3, "
                            f"Gemma2/3, GPT-2, ...)")
    try:
        model.set_attn_implementation(IMPLEMENTATION)
    except Exception as e:
        raise HeadwiseError(f"{name} does not accept a custom attention implementation ({str(e).splitlines()[0]})") \
            from None
    grid = image_grid(model, pixel_shape)
    # An image model's geometry is its vision tower's (CLIP and SigLIP classifiers hold a text config too).
    config = getattr(model.config, "vision_config", None) if grid is not None else None
    geometry = Geometry.from_config(config or model.config)

    seen: list[tuple[torch.nn.Module, tuple[int, ...], tuple[int, ...], Any]] = []

    def probe(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
              **kwargs: Any) -> tuple[Tensor, None]:
        seen.append((module, tuple(query.shape), tuple(key.shape), kwargs.get("sliding_window")))
        module._headwise_layer = len(seen) - 1
        return headwise_attention(module, query, key, value, attention_mask, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, probe)
    try:
        device = execution_device(model)  # with a device_map, offloaded parameters sit on "meta"
        with torch.no_grad():
            if grid is not None:
                model(pixel_values=torch.zeros(1, *grid[1], device=device))
            else:
                ids = torch.tensor([[1, 2, 3, 4]], device=device) % max(1, geometry.vocab_size)
                model(input_ids=ids, use_cache=False)
    except HeadwiseError:
        raise
    except Exception as e:
        raise HeadwiseError(f"{name} failed on a test input ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                            f"headwise cannot instrument it") from None
    finally:
        AttentionInterface.register(IMPLEMENTATION, headwise_attention)
    if len(seen) != geometry.n_layers:
        raise HeadwiseError(f"{name}: only {len(seen)} of {geometry.n_layers} layers route attention through "
                            f"transformers' AttentionInterface; headwise cannot instrument this architecture")
    windows = list(geometry.sliding_window)
    types = list(geometry.layer_types)
    for layer, (_, q_shape, k_shape, window) in enumerate(seen):
        if (q_shape[1], k_shape[1], q_shape[3]) != (geometry.n_heads, geometry.n_kv_heads, geometry.head_dim):
            raise HeadwiseError(f"{name} layer {layer} has {q_shape[1]} query / {k_shape[1]} KV heads of dim "
                                f"{q_shape[3]}, but its config says {geometry.n_heads} / {geometry.n_kv_heads} of dim "
                                f"{geometry.head_dim}; headwise cannot trust this model's geometry")
        if window is not None:  # the layer itself says how far it sees
            windows[layer], types[layer] = int(window), "sliding"
    image: dict[str, Any] = {}
    if grid is not None:  # where the patches sit: measured from the tokens the layers saw, not assumed
        (rows, cols), _ = grid
        n_tokens = seen[0][1][2]
        suffix = int(getattr(model.config, "num_detection_tokens", 0) or 0)  # YOLOS appends its detection tokens
        prefix = n_tokens - rows * cols - suffix
        if prefix < 0:
            raise HeadwiseError(f"{name} attends over {n_tokens} tokens, fewer than its {rows} x {cols} patches; "
                                f"headwise cannot tell which tokens are patches")
        image = {"patch_grid": (rows, cols), "prefix_tokens": prefix, "suffix_tokens": suffix}
    return Geometry(model_type=geometry.model_type, n_layers=geometry.n_layers, n_heads=geometry.n_heads,
                    n_kv_heads=geometry.n_kv_heads, head_dim=geometry.head_dim, layer_types=tuple(types),
                    sliding_window=tuple(windows), max_positions=geometry.max_positions,
                    vocab_size=geometry.vocab_size, **image)


def image_grid(model: Any, pixel_shape: tuple[int, int, int] | None = None
               ) -> tuple[tuple[int, int], tuple[int, int, int]] | None:
    """((rows, columns) of patches, (channels, height, width) of an input) for a model that reads
    pixel_values, from its config (or from `pixel_shape`, the size its inputs will have); None for
    models that read tokens."""
    if getattr(model, "main_input_name", "input_ids") != "pixel_values":
        return None
    config = model.config
    config = getattr(config, "vision_config", None) or config

    def pair(value: Any) -> tuple[int, int]:
        return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))

    try:
        (height, width), (ph, pw) = pair(config.image_size), pair(config.patch_size)
    except (AttributeError, TypeError, ValueError, IndexError):
        raise HeadwiseError(f"{type(model).__name__} reads images but its config gives no image_size and "
                            f"patch_size; headwise cannot place its patches") from None
    channels = int(getattr(config, "num_channels", 3))
    if pixel_shape is not None:
        channels, height, width = (int(x) for x in pixel_shape)
    return (height // ph, width // pw), (channels, height, width)


def check_tokens(chunk: AttentionChunk, n_tokens: int | None) -> None:
    """Refuse attention over another number of tokens than the image geometry places on its grid (an input
    of another size than the geometry was measured with would put patches in the wrong cells)."""
    if n_tokens is not None and chunk.weights.shape[-1] != n_tokens:
        raise HeadwiseError(f"layer {chunk.layer} attends over {chunk.weights.shape[-1]} tokens per image, but the "
                            f"model's geometry places {n_tokens}; feed images of the size the geometry was measured "
                            f"with (the model's image processor does so)")


def sink_window_mask(query_positions: Tensor, key_positions: Tensor, sink: int, window: int) -> Tensor:
    """[q, k] True where a streaming head keeps key j for the query at position i: j <= i and
    j is one of the first `sink` tokens or one of the last `window` (the query's own included)."""
    k, q = key_positions[None, :], query_positions[:, None]
    return (k <= q) & ((k < sink) | (k > q - window))


def ablation_scale(geometry: Geometry, heads: Sequence[tuple[int, int]], value: float = 0.0) -> Tensor:
    """A [layers, heads] scale that multiplies the given (layer, head) outputs by `value`."""
    scale = torch.ones(geometry.n_layers, geometry.n_heads)
    for layer, head in heads:
        if not (0 <= layer < geometry.n_layers and 0 <= head < geometry.n_heads):
            raise HeadwiseError(f"head ({layer}, {head}) is outside this model's {geometry.n_layers} layers x "
                                f"{geometry.n_heads} heads")
        scale[layer, head] = value
    return scale


def single_head_ablation_scales(geometry: Geometry, heads: Sequence[tuple[int, int]], value: float = 0.0) -> Tensor:
    """[len(heads), layers, heads]: row i ablates heads[i] only, for one batched forward pass."""
    return torch.stack([ablation_scale(geometry, [h], value) for h in heads]) if heads else \
        torch.ones(0, geometry.n_layers, geometry.n_heads)


__all__ = ["AttentionChunk", "DEFAULT_CHUNK_BYTES", "HeadEdits", "IMPLEMENTATION", "Observer", "Session",
           "ablation_scale", "attach", "check_tokens", "image_grid", "headwise_attention",
           "single_head_ablation_scales", "sink_window_mask"]
