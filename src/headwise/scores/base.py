"""The small base classes every score family implements (one family, one file), and what a
family declares about itself.

A family declares
- `scores`: each score it yields (`Score`): a one-line description, which end of its scale
  marks a head that needs the full KV cache, whether `headwise profile` runs it by default,
  and the role label it earns past a threshold;
- `settings`: the knobs that change its numbers (`Setting`); `headwise profile` turns each
  into a command-line flag, and the atlas records its value.
It then either observes the forward passes of a probe it may share with other families
(`ProbeScoreFamily`: a probe and an observer) or drives the model itself
(`ComputedScoreFamily`: greedy decoding, gradients, ablations).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import HeadwiseError
from ..geometry import Geometry
from ..instrument import DEFAULT_CHUNK_BYTES, Observer
from ..probes import Probe
from ..roles import RoleRule

NeedsFull = Literal["high", "low"]


@dataclass(frozen=True)
class Setting:
    """One knob of a score family: its default, its bounds, its command-line flag."""

    name: str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    flag: str | None = None  # the command-line flag when it is not --name-with-dashes
    kind: type | None = None  # int, float, str or bool; default: the default's type (str when it is None)

    @property
    def type(self) -> type:
        return self.kind or (str if self.default is None else type(self.default))

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def coerce(self, value: Any) -> Any:
        """The value as this setting's type, or a one-line error naming the setting."""
        if value is None and self.default is None:
            return None
        kind = self.type
        where = f"{self.cli_flag} (setting {self.name})"
        if kind is bool:
            if not isinstance(value, bool):
                raise HeadwiseError(f"{where} must be true or false, got {value!r}")
            return value
        if kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise HeadwiseError(f"{where} must be a finite number, got {value!r}")
            if kind is int and float(value) != int(value):
                raise HeadwiseError(f"{where} must be a whole number, got {value!r}")
            value = kind(value)
            if self.minimum is not None and value < self.minimum:
                need = "a positive integer" if kind is int and self.minimum == 1 else f"at least {self.minimum:g}"
                raise HeadwiseError(f"{self.cli_flag} must be {need} (setting {self.name}), got {value:g}")
            if self.maximum is not None and value > self.maximum:
                raise HeadwiseError(f"{where} must be at most {self.maximum:g}, got {value:g}")
        elif not isinstance(value, kind):
            raise HeadwiseError(f"{where} must be a {kind.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise HeadwiseError(f"{where} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        return value


# Settings every family may read: not owned by any one of them.
CORE_SETTINGS: tuple[Setting, ...] = (
    Setting("seed", 0, "seed of every probe and of the profile's random choices", minimum=0),
    Setting("text", None, "UTF-8 text file (or JSONL) for the natural-text probes (default: the bundled prose)",
            kind=str),
    Setting("chunk_bytes", DEFAULT_CHUNK_BYTES, "bytes of one [batch, heads, chunk, keys] float32 block of "
            "observed attention (bounds memory)", minimum=1024),
)


@dataclass(frozen=True)
class Score:
    """One score a family yields, and what it means for the rest of headwise."""

    name: str
    description: str
    # Which end of the scale marks a head that needs the full KV cache (None: the score does not say).
    needs_full: NeedsFull | None = None
    # In the battery `headwise profile` runs without --scores: True for every modality the family
    # measures, or a tuple of modalities ("text", "image").
    default: bool | tuple[str, ...] = False
    role: RoleRule | None = None  # the label a head earns past a threshold

    def default_for(self, modality: str) -> bool:
        return self.default if isinstance(self.default, bool) else modality in self.default

    def __post_init__(self) -> None:
        if self.needs_full not in (None, "high", "low"):
            raise HeadwiseError(f"score {self.name}: needs_full must be 'high', 'low' or None")
        if not isinstance(self.default, bool) and not set(self.default) <= {"text", "image"}:
            raise HeadwiseError(f"score {self.name}: default must be True, False or a tuple of 'text'/'image'")
        if self.role is not None and self.role.score != self.name:
            raise HeadwiseError(f"score {self.name}: its role rule reads score {self.role.score!r}")


@dataclass
class ScoreResult:
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [layers, heads]
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"values": [L][H][...], ...}
    settings: dict[str, Any] = field(default_factory=dict)


class ScoreFamily(ABC):
    """One method: the scores it yields and the settings that change them."""

    family: ClassVar[str]
    scores: ClassVar[tuple[Score, ...]]
    settings: ClassVar[tuple[Setting, ...]] = ()
    # The kinds of model it can measure: "text" (language models), "image" (geometry.modality).
    modalities: ClassVar[tuple[str, ...]] = ("text",)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.scores)

    @property
    def description(self) -> dict[str, str]:
        return {s.name: s.description for s in self.scores}


class ScoreObserver(Observer):
    """Accumulates statistics over the probe's batches; `begin` is called before each one.

    Every PerSequence attribute (or dict of them) is started for the new batch automatically.
    """

    def begin(self, input_ids: Tensor) -> None:
        self.tokens = input_ids
        for value in list(vars(self).values()):
            for acc in value.values() if isinstance(value, dict) else [value]:
                if isinstance(acc, PerSequence):
                    acc.start(input_ids.shape[0])

    @abstractmethod
    def result(self) -> ScoreResult: ...


class ProbeScoreFamily(ScoreFamily):
    """A family that watches the forward passes of a probe. Families whose `probe_key` is equal
    share one probe and one set of forward passes."""

    batch_size: ClassVar[int] = 1

    @abstractmethod
    def probe_key(self, settings: Any) -> Hashable: ...

    @abstractmethod
    def make_probe(self, preprocessor: Any, geometry: Geometry, settings: Any) -> Probe:
        """preprocessor: the tokenizer of a language model, the image processor of an image model."""

    def check_probe(self, probe: Probe, settings: Any) -> None:
        """Refuse (HeadwiseError) a probe this family cannot measure, whichever family made it."""

    @abstractmethod
    def observer(self, geometry: Geometry, probe: Probe, settings: Any) -> ScoreObserver: ...


class ComputedScoreFamily(ScoreFamily):
    """A family that drives the model itself (greedy decoding, gradients, ablations).

    The profiler calls `compute` once with every requested name of the family.
    """

    def check(self, geometry: Geometry, settings: Any) -> None:
        """Refuse settings this family cannot run with, before any family spends time."""

    def check_names(self, loaded: Any, names: list[str]) -> None:
        """Refuse requested scores this model (a LoadedModel) cannot have, before any family spends time
        (one score of a family may fit one modality only, or need a classifier)."""

    @abstractmethod
    def compute(self, loaded: Any, settings: Any, names: list[str]) -> ScoreResult:
        """loaded: a headwise.LoadedModel; settings: ProfileSettings."""


class PerSequence:
    """Per-sequence sums [n_seq, layers, heads] gathered across batches; mean of ratios at the end."""

    def __init__(self, geometry: Geometry, *extra: int):
        self.shape = (geometry.n_layers, geometry.n_heads, *extra)
        self.done: list[Tensor] = []
        self.current: Tensor | None = None

    def start(self, batch: int) -> None:
        if self.current is not None:
            self.done.append(self.current)
        self.current = torch.zeros(batch, *self.shape, dtype=torch.float64)

    def add(self, layer: int, values: Tensor) -> None:
        self.current[:, layer] += values.double().cpu()

    def all(self) -> Tensor:
        parts = self.done + ([self.current] if self.current is not None else [])
        return torch.cat(parts) if parts else torch.zeros(0, *self.shape, dtype=torch.float64)


def weighted_sum(a: Tensor, template: Tensor) -> Tensor:
    """sum over queries and keys of a * template: [b, h, q, k] x ([b, q, k] or [q, k]) -> [b, h].

    Written as a batched matrix-vector product: einsum takes ~25x longer on CPU here.
    """
    b, h, q, k = a.shape
    flat = a.reshape(b, h, q * k)
    if template.dim() == 2:
        return flat @ template.reshape(q * k).to(a.dtype)
    return torch.bmm(flat, template.reshape(b, q * k, 1).to(a.dtype)).squeeze(-1)


def mean_ratio(numerator: PerSequence, denominator: PerSequence) -> np.ndarray:
    """Mean over sequences of num/den (each sequence scored on its own, as TransformerLens does)."""
    num, den = numerator.all(), denominator.all()
    ratio = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
    return ratio.mean(0).numpy()


__all__ = ["CORE_SETTINGS", "ComputedScoreFamily", "NeedsFull", "PerSequence", "ProbeScoreFamily", "Score",
           "ScoreFamily", "ScoreObserver", "ScoreResult", "Setting", "mean_ratio", "weighted_sum"]
