"""Role labels from scores: a head gets a label when its score passes the rule's threshold.

Each score family declares the rule of the scores it yields (headwise.scores); where a paper
gives a cut it is used, otherwise the convention named in `source`. The rules used are
written into each atlas, so a label can always be traced to the number and the threshold
behind it, and an atlas relabels itself from its own rules.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import HeadwiseError

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


@dataclass(frozen=True)
class RoleRule:
    role: str
    score: str
    op: str
    threshold: float
    source: str
    # Where the label stands among a head's labels (lowest first; the first is the head's primary role in the
    # report and figures). Not saved: an atlas keeps its rules in this order.
    precedence: int = field(default=100, compare=False)

    def applies(self, values: np.ndarray) -> np.ndarray:
        return _OPS[self.op](values, self.threshold)

    def to_dict(self) -> dict:
        return {"role": self.role, "score": self.score, "op": self.op, "threshold": self.threshold,
                "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> RoleRule:
        if d.get("op") not in _OPS:
            raise HeadwiseError(f"role rule {d.get('role')!r} has an unknown comparison {d.get('op')!r}")
        return cls(str(d["role"]), str(d["score"]), str(d["op"]), float(d["threshold"]), str(d.get("source", "")))


def assign_roles(scores: dict[str, np.ndarray], rules: Sequence[RoleRule]) -> list[list[list[str]]]:
    """[layers][heads] lists of role names, from whichever rules' scores are present."""
    shape = next(iter(scores.values())).shape if scores else (0, 0)
    labels: list[list[list[str]]] = [[[] for _ in range(shape[1])] for _ in range(shape[0])]
    for rule in rules:
        if rule.score not in scores:
            continue
        hits = rule.applies(np.asarray(scores[rule.score], dtype=float))
        for layer, head in zip(*np.nonzero(hits)):
            labels[layer][head].append(rule.role)
    return labels



__all__ = ["RoleRule", "assign_roles"]
