"""The shape of a model's attention: what every later stage indexes heads by."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import HeadwiseError


@dataclass(frozen=True)
class Geometry:
    """Layers x query heads, grouped onto KV heads, with each layer's attention type.

    `layer_types[l]` is "full" or "sliding"; `sliding_window[l]` is the window of a sliding
    layer (None for full layers). Query head h of a layer reads KV head h // group_size.

    Image models add where their patches sit in the token sequence: `prefix_tokens` tokens
    (CLS, distillation, register tokens) come first, then the `patch_grid` (rows, columns) in
    row-major order, then `suffix_tokens` (YOLOS's detection tokens). Language models have no
    grid; their `vocab_size` is the vocabulary's (0 for image models).
    """

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: tuple[int | None, ...]
    max_positions: int | None
    vocab_size: int
    patch_grid: tuple[int, int] | None = None
    prefix_tokens: int = 0
    suffix_tokens: int = 0

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise HeadwiseError(f"{self.n_heads} query heads do not split evenly over {self.n_kv_heads} KV heads")
        if len(self.layer_types) != self.n_layers or len(self.sliding_window) != self.n_layers:
            raise HeadwiseError("geometry lists one layer type and window per layer")

    @property
    def modality(self) -> str:
        """"image" for models whose tokens are patches of an image, else "text"."""
        return "image" if self.patch_grid is not None else "text"

    @property
    def n_patches(self) -> int:
        return 0 if self.patch_grid is None else self.patch_grid[0] * self.patch_grid[1]

    @property
    def n_tokens(self) -> int | None:
        """Tokens of every input of an image model (prefix + patches + suffix); None for text."""
        return None if self.patch_grid is None else self.prefix_tokens + self.n_patches + self.suffix_tokens

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def windowed(self) -> tuple[bool, ...]:
        """Per layer: whether the model itself limits attention to a sliding window (Gemma3's local layers)."""
        return tuple(t == "sliding" for t in self.layer_types)

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["sliding_window"] = list(self.sliding_window)
        if self.patch_grid is None:  # text geometries are written as before images existed
            for key in ("patch_grid", "prefix_tokens", "suffix_tokens"):
                del d[key]
        else:
            d["patch_grid"] = list(self.patch_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        try:
            return cls(
                model_type=str(d["model_type"]), n_layers=int(d["n_layers"]), n_heads=int(d["n_heads"]),
                n_kv_heads=int(d["n_kv_heads"]), head_dim=int(d["head_dim"]),
                layer_types=tuple(str(t) for t in d["layer_types"]),
                sliding_window=tuple(None if w is None else int(w) for w in d["sliding_window"]),
                max_positions=None if d.get("max_positions") is None else int(d["max_positions"]),
                vocab_size=int(d["vocab_size"]),
                patch_grid=None if d.get("patch_grid") is None else (int(d["patch_grid"][0]), int(d["patch_grid"][1])),
                prefix_tokens=int(d.get("prefix_tokens", 0)), suffix_tokens=int(d.get("suffix_tokens", 0)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise HeadwiseError(f"geometry record is incomplete or malformed ({e!r})") from None

    @classmethod
    def from_config(cls, config: Any) -> Geometry:
        """Read the geometry from a transformers config (text config for multimodal wrappers)."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers = int(config.num_hidden_layers)
        n_heads = int(config.num_attention_heads)
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        raw_types = getattr(config, "layer_types", None) or ["full_attention"] * n_layers
        window = getattr(config, "sliding_window", None)
        types, windows = [], []
        for t in raw_types:
            sliding = t in ("sliding_attention", "chunked_attention", "local") and window is not None
            types.append("sliding" if sliding else "full")
            windows.append(int(window) if sliding else None)
        max_pos = getattr(config, "max_position_embeddings", None)
        return cls(
            model_type=str(config.model_type), n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=int(head_dim), layer_types=tuple(types), sliding_window=tuple(windows),
            max_positions=None if max_pos is None else int(max_pos),
            vocab_size=int(getattr(config, "vocab_size", None) or 0),
        )

    def check_context(self, n_tokens: int) -> None:
        """Refuse contexts the model cannot position (silently wrong results otherwise)."""
        if self.max_positions is not None and n_tokens > self.max_positions:
            raise HeadwiseError(
                f"context of {n_tokens} tokens is longer than this model allows ({self.max_positions}); "
                f"pass a shorter --context"
            )


__all__ = ["Geometry"]
