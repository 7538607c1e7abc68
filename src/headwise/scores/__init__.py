"""Score families, one per file, and the registry the profiler, the CLI, the KV cache and the
report read every score's metadata from.

A new family is one file plus `register(MyFamily())`; nothing else in headwise lists scores.
"""

from __future__ import annotations

from ..errors import HeadwiseError
from ..roles import RoleRule
from .autoencoder import AutoencoderPatterns
from .base import (
    CORE_SETTINGS,
    ComputedScoreFamily,
    NeedsFull,
    PerSequence,
    ProbeScoreFamily,
    Score,
    ScoreFamily,
    ScoreObserver,
    ScoreResult,
    Setting,
    mean_ratio,
    weighted_sum,
)
from .distance import DistanceScores
from .duo import DuoScores
from .importance import ImportanceScores
from .patterns import PatternScores
from .razor import RazorScores
from .retrieval import RetrievalScores
from .semantic_retrieval import SemanticRetrievalScores
from .sink import SinkScores
from .spatial import SpatialScores
from .streaming import StreamingScores
from .successor import SuccessorScores

FAMILIES: list[ScoreFamily] = []


def all_score_names() -> list[str]:
    return [name for family in FAMILIES for name in family.names]


def family_of(name: str) -> ScoreFamily:
    for family in FAMILIES:
        if name in family.names:
            return family
    raise HeadwiseError(f"unknown score '{name}'; choose from {', '.join(all_score_names())}")


def score_info(name: str) -> Score | None:
    """The registered metadata of a score, or None for a score no family declares (an attribution)."""
    for family in FAMILIES:
        for score in family.scores:
            if score.name == name:
                return score
    return None


def needs_full(name: str, recorded: str | None = None) -> NeedsFull | None:
    """Which end of a score marks a head that needs the full KV cache: what an atlas recorded for it,
    else what its family declares (atlases from before scores recorded it), else None."""
    if recorded in ("high", "low"):
        return recorded  # type: ignore[return-value]
    info = score_info(name)
    return info.needs_full if info is not None else None


def default_scores(modality: str = "text") -> list[str]:
    """The battery `headwise profile` runs without --scores for a kind of model, in registration order."""
    return [s.name for family in FAMILIES if modality in family.modalities for s in family.scores
            if s.default_for(modality)]


def check_modality(names: list[str], modality: str) -> None:
    """Refuse scores that cannot measure this kind of model (one line naming those that can)."""
    wrong = [n for n in names if modality not in family_of(n).modalities]
    if wrong:
        fits = [n for f in FAMILIES if modality in f.modalities for n in f.names]
        raise HeadwiseError(f"score(s) {', '.join(wrong)} cannot measure {modality} models; for this model "
                            f"choose from {', '.join(fits) or 'none registered'}")


def role_rules() -> list[RoleRule]:
    return [s.role for family in FAMILIES for s in family.scores if s.role is not None]


def all_settings() -> dict[str, Setting]:
    """Every setting a profile can take: the core ones, then each family's, in registration order."""
    out: dict[str, Setting] = {s.name: s for s in CORE_SETTINGS}
    for family in FAMILIES:
        for s in family.settings:
            out.setdefault(s.name, s)
    return out


def register(family: ScoreFamily) -> None:
    """Add a score family; its score names must be new, and a setting it shares with another family
    (same name) must be the same setting."""
    clash = set(family.names) & set(all_score_names())
    if clash:
        raise HeadwiseError(f"score names already registered: {', '.join(sorted(clash))}")
    if not family.names or len(set(family.names)) != len(family.names):
        raise HeadwiseError(f"score family {family.family!r} must declare distinct score names")
    known = all_settings()
    for s in family.settings:
        if s.name in known and known[s.name] != s:
            raise HeadwiseError(f"score family {family.family!r} redefines setting {s.name!r} differently")
    FAMILIES.append(family)


def unregister(family_name: str) -> None:
    """Remove a registered family (plug-ins and tests)."""
    FAMILIES[:] = [f for f in FAMILIES if f.family != family_name]


for _family in (PatternScores(), RazorScores(), SinkScores(), StreamingScores(), DistanceScores(),
                RetrievalScores(), ImportanceScores(), SuccessorScores(), DuoScores(), SpatialScores(),
                AutoencoderPatterns()):
    register(_family)
register(SemanticRetrievalScores())

__all__ = ["CORE_SETTINGS", "FAMILIES", "ComputedScoreFamily", "NeedsFull", "PerSequence", "ProbeScoreFamily",
           "Score", "ScoreFamily", "ScoreObserver", "ScoreResult", "Setting", "all_score_names", "all_settings",
           "check_modality", "default_scores", "family_of", "mean_ratio", "needs_full", "register", "role_rules",
           "score_info", "unregister", "weighted_sum"]
