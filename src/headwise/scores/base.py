"""The small base class every score family implements (one family, one file).

A family owns one probe and one observer. The observer sees each attention chunk of the
probe's forward passes, accumulates per-head statistics, and finally returns [layers, heads]
matrices (plus optional per-head profiles such as the distance histogram).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..geometry import Geometry
from ..instrument import Observer
from ..probes import Probe


@dataclass
class ScoreResult:
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [layers, heads]
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"values": [L][H][...], ...}
    settings: dict[str, Any] = field(default_factory=dict)


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


class ScoreFamily(ABC):
    """One method: which probe it runs, what it observes, which scores it yields."""

    family: str
    names: tuple[str, ...]
    description: dict[str, str]
    batch_size: int = 1

    @abstractmethod
    def probe_key(self, settings: Any) -> Hashable:
        """Families with equal keys share one probe and one set of forward passes."""

    @abstractmethod
    def make_probe(self, tokenizer: Any, geometry: Geometry, settings: Any) -> Probe: ...

    @abstractmethod
    def observer(self, geometry: Geometry, probe: Probe, settings: Any) -> ScoreObserver: ...


class ComputedScoreFamily(ABC):
    """A method that drives the model itself (greedy decoding, gradients, ablations)
    instead of observing the forward passes of one shared probe.

    The profiler calls `compute` once with every requested name of the family.
    """

    family: str
    names: tuple[str, ...]
    description: dict[str, str]

    @abstractmethod
    def compute(self, loaded: Any, settings: Any, names: list[str]) -> ScoreResult:
        """loaded: a headwise.load.LoadedModel (already attached); settings: ProfileSettings."""


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
