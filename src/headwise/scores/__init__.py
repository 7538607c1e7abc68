"""Score families, one per file, and the registry the profiler and CLI select from."""

from __future__ import annotations

from ..errors import HeadwiseError
from .base import ComputedScoreFamily, ScoreFamily, ScoreObserver, ScoreResult
from .distance import DistanceScores
from .duo import DuoScores
from .importance import ImportanceScores
from .patterns import PatternScores
from .razor import RazorScores
from .retrieval import RetrievalScores
from .sink import SinkScores
from .streaming import StreamingScores
from .successor import SuccessorScores

FAMILIES: list[ScoreFamily] = [PatternScores(), RazorScores(), SinkScores(), StreamingScores(), DistanceScores()]
FAMILIES.append(RetrievalScores())  # decodes needle trials: minutes, so not in DEFAULT_SCORES
FAMILIES.append(ImportanceScores())  # gradients and 1 pass per few heads: opt-in via --scores
FAMILIES.append(SuccessorScores())  # weights-based OV circuit on ordinal tokens: opt-in via --scores
FAMILIES.append(DuoScores())  # trains DuoAttention's gates (backward passes): opt-in via --scores

# The pattern battery `headwise profile` runs when --scores is not given.
DEFAULT_SCORES: tuple[str, ...] = ("previous_token", "duplicate_token", "induction", "echo", "razor_induction",
                                   "sink", "streamable_mass", "mean_distance", "entropy")


def all_score_names() -> list[str]:
    return [name for family in FAMILIES for name in family.names]


def family_of(name: str) -> ScoreFamily:
    for family in FAMILIES:
        if name in family.names:
            return family
    raise HeadwiseError(f"unknown score '{name}'; choose from {', '.join(all_score_names())}")


def register(family: ScoreFamily) -> None:
    """Add a score family (later issues and plug-ins); names must be new."""
    clash = set(family.names) & set(all_score_names())
    if clash:
        raise HeadwiseError(f"score names already registered: {', '.join(sorted(clash))}")
    FAMILIES.append(family)


__all__ = ["FAMILIES", "DEFAULT_SCORES", "ComputedScoreFamily", "ScoreFamily", "ScoreObserver", "ScoreResult",
           "all_score_names", "family_of", "register"]
