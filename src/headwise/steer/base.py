"""What every steering method is: a small set of head edits fitted on a task, saved and loaded back.

One method, one file (soft_injection.py, lofit.py, act.py), each a `Steering` subclass registered
with `register_method`. A Steering acts on the model only through instrument.HeadEdits, so it
applies the same way in task scoring, in `headwise generate --steer FILE` and under any KV-cache
policy (output edits; weight edits need the full cache).

`strength` scales the edit: 0 leaves the model's logits exactly as they are, 1 is the fitted edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor

from ..errors import HeadwiseError
from ..geometry import Geometry
from ..instrument import HeadEdits


class Steering:
    """Head edits fitted on a task. Subclasses set `method` and implement the four methods below.

    heads: the (layer, query head) pairs the edit touches (for the report and the random-heads control).
    settings: JSON-able choices the method was fitted with (recorded in the saved file).
    """

    method: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # True: the edit acts at the prompt's last token, so the prompt must reach the model in one call
    # (`headwise generate --steer` then refuses --prefill-chunk and feeds the prompt whole).
    whole_prompt: ClassVar[bool] = False

    def __init__(self, geometry: Geometry, heads: Sequence[tuple[int, int]], strength: float = 1.0,
                 settings: dict[str, Any] | None = None):
        for layer, head in heads:
            if not (0 <= layer < geometry.n_layers and 0 <= head < geometry.n_heads):
                raise HeadwiseError(f"head ({layer}, {head}) is outside this model's {geometry.n_layers} layers x "
                                    f"{geometry.n_heads} heads")
        self.geometry = geometry
        self.heads = sorted((int(layer), int(head)) for layer, head in heads)
        self.strength = float(strength)
        self.settings = dict(settings or {})

    # ---- what a method implements ---------------------------------------------------------------
    @classmethod
    def fit(cls, loaded: Any, task: Any, *, heads: Sequence[tuple[int, int]] | None = None, seed: int = 0,
            **options: Any) -> Steering:
        """Fit on task.train. heads: force these heads instead of the method's own choice (the random control)."""
        raise NotImplementedError

    def edits(self) -> HeadEdits:
        """The edits applied at this steering's strength."""
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor needed to rebuild this steering (saved as safetensors)."""
        raise NotImplementedError

    @classmethod
    def from_saved(cls, geometry: Geometry, heads: Sequence[tuple[int, int]], tensors: dict[str, Tensor],
                   settings: dict[str, Any], strength: float = 1.0) -> Steering:
        """Rebuild from tensors() and settings (refusing tensors of the wrong shape in one line)."""
        raise NotImplementedError

    # ---- shared -----------------------------------------------------------------------------------
    def trained_parameters(self) -> int:
        """Numbers fitted by gradient descent (0 for training-free methods); a method may override."""
        return sum(t.numel() for t in self.tensors().values())

    def with_strength(self, strength: float) -> Steering:
        return type(self).from_saved(self.geometry, self.heads, self.tensors(), self.settings, strength=strength)


METHODS: dict[str, type[Steering]] = {}


def register_method(cls: type[Steering]) -> type[Steering]:
    """Make a Steering subclass available by its `method` name (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Steering)) or not cls.method:
        raise HeadwiseError("a steering method must subclass headwise.steer.Steering and set `method`")
    METHODS[cls.method] = cls
    return cls


def method_class(name: str) -> type[Steering]:
    if name not in METHODS:
        raise HeadwiseError(f"unknown steering method '{name}'; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["METHODS", "Steering", "method_class", "register_method"]
