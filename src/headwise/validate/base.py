"""What a validation task is: a task metric measured under several head ablations at once."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class TaskOutcome:
    """The metric under each condition (one per row of `scales`), plus optional per-condition details."""

    values: list[float]
    details: list[Any] = field(default_factory=list)


class ValidationTask(ABC):
    """A task metric measured under several head ablations at once."""

    name: str
    metric: str
    higher_is_better: bool
    modality: str = "text"  # the kind of model the task runs on (geometry.modality)

    @abstractmethod
    def evaluate(self, loaded: Any, scales: Tensor) -> TaskOutcome:
        """scales: [conditions, layers, heads] head multipliers (0 = ablated). One value per condition."""

    def settings(self) -> dict[str, Any]:
        """Everything needed to rebuild the task's inputs."""
        return {}


__all__ = ["TaskOutcome", "ValidationTask"]
