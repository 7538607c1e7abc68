"""Role labels from scores: every threshold headwise uses, in one place.

A head gets a label when its score passes the rule's threshold. Where a paper gives a cut we
use it; otherwise the convention named in `source`. The rules used are written into each
atlas, so a label can always be traced to the number and the threshold behind it.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass

import numpy as np

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


@dataclass(frozen=True)
class RoleRule:
    role: str
    score: str
    op: str
    threshold: float
    source: str

    def applies(self, values: np.ndarray) -> np.ndarray:
        return _OPS[self.op](values, self.threshold)

    def to_dict(self) -> dict:
        return asdict(self)


ROLE_RULES: tuple[RoleRule, ...] = (
    RoleRule("sink", "sink", ">", 0.3, "Gu et al. 2024 (arXiv 2410.10781): sink heads put > 0.3 on the first token"),
    RoleRule("previous-token", "previous_token", ">", 0.4,
             "TransformerLens detector score; 0.4 is the cut used with it in ARENA's induction-head exercises"),
    RoleRule("duplicate-token", "duplicate_token", ">", 0.4, "as previous-token"),
    RoleRule("induction", "induction", ">", 0.4, "as previous-token"),
    RoleRule("streaming", "streamable_mass", ">=", 0.95,
             "headwise: a sink + recent-window cache keeps >= 95% of the head's attention mass"),
    RoleRule("retrieval", "retrieval", ">", 0.1, "Wu et al. 2024 (arXiv 2404.15574): retrieval score > 0.1"),
    RoleRule("successor", "successor", ">", 0.5,
             "Gould et al. 2023 (arXiv 2312.09230) report the succession score (fraction of ordinal tokens whose "
             "successor the head's OV circuit ranks top in its sequence) without a cut; headwise: the head "
             "increments most (> 50%) of the probe's ordinal tokens"),
)


def assign_roles(scores: dict[str, np.ndarray], rules: tuple[RoleRule, ...] = ROLE_RULES) -> list[list[list[str]]]:
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


def rules_in_use(scores: dict[str, np.ndarray], rules: tuple[RoleRule, ...] = ROLE_RULES) -> list[RoleRule]:
    return [r for r in rules if r.score in scores]
