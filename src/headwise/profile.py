"""Run probes, score every head, return an Atlas.

Score families that share a probe share its forward passes: one pass of the natural-text
probe feeds the sink, streaming and distance observers at once. Every family checks the
probe and settings before anything runs, whichever family made the probe.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from ._progress import progress
from .atlas import Atlas
from .errors import HeadwiseError
from .instrument import Session
from .load import LoadedModel, load
from .scores import (
    ComputedScoreFamily,
    ProbeScoreFamily,
    ScoreFamily,
    ScoreResult,
    all_settings,
    check_modality,
    default_scores,
    family_of,
    score_info,
)


class ProfileSettings(Mapping[str, Any]):
    """Everything that determines the scores besides the model, written into the atlas: the core
    settings and those every registered score family declares (headwise.scores.Setting), each
    checked against its bounds. Read them as attributes: `settings.context`."""

    def __init__(self, **values: Any):
        known = all_settings()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise HeadwiseError(f"unknown profile setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        coerced = {name: s.coerce(values.get(name, s.default)) for name, s in known.items()}
        object.__setattr__(self, "_values", coerced)

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> ProfileSettings:
        """The settings an atlas records (keys of families not registered here are ignored)."""
        known = all_settings()
        values = {k: v for k, v in saved.items() if k in known}
        if values.get("text") == "bundled":
            values["text"] = None
        return cls(**values)

    def replace(self, **changes: Any) -> ProfileSettings:
        return ProfileSettings(**{**self._values, **changes})

    def to_dict(self) -> dict[str, Any]:
        d = dict(self._values)
        d["text"] = "bundled" if self.text is None else str(self.text)
        return d

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(f"no profile setting {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ProfileSettings is immutable; use .replace(...)")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProfileSettings) and other._values == self._values

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self._values.items())))

    def __repr__(self) -> str:
        return "ProfileSettings(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"


def _plan(names: list[str], settings: ProfileSettings) -> tuple[dict[Any, list[ProbeScoreFamily]],
                                                                  dict[ComputedScoreFamily, list[str]]]:
    """Families grouped by the probe they share, and the computed families with their names."""
    groups: dict[Any, list[ProbeScoreFamily]] = {}
    computed: dict[ComputedScoreFamily, list[str]] = {}
    for name in names:
        family = family_of(name)
        if isinstance(family, ComputedScoreFamily):
            computed.setdefault(family, []).append(name)
        elif isinstance(family, ProbeScoreFamily):
            group = groups.setdefault(family.probe_key(settings), [])
            if family not in group:
                group.append(family)
        else:
            raise HeadwiseError(f"score family {family.family!r} is neither a probe nor a computed family")
    return groups, computed


def profile(model: LoadedModel | str, scores: Sequence[str] | None = None,
            settings: ProfileSettings | None = None) -> Atlas:
    """Score every head of `model` (a LoadedModel or a spec for headwise.load)."""
    loaded = load(model) if isinstance(model, str) else model
    settings = settings or ProfileSettings()
    geometry = loaded.geometry
    names = list(dict.fromkeys(scores or default_scores(geometry.modality)))
    if not names:
        raise HeadwiseError("no scores requested")
    for name in names:
        family_of(name)  # an unknown name fails here, with the known ones listed
    check_modality(names, geometry.modality)
    groups, computed = _plan(names, settings)
    # Build and check every probe, and let every computed family check its settings, before any work.
    probes = {}
    for key, families in groups.items():
        probe = families[0].make_probe(loaded.preprocessor, geometry, settings)
        geometry.check_context(probe.length)
        for family in families:
            family.check_probe(probe, settings)
        probes[key] = probe
    for family, wanted in computed.items():
        family.check(geometry, settings)
        family.check_names(loaded, wanted)

    atlas = Atlas.new(loaded.info.to_dict(), geometry, {"scores": names, **settings.to_dict()})
    torch.manual_seed(settings.seed)
    for key, families in groups.items():
        probe = probes[key]
        observers = [f.observer(geometry, probe, settings) for f in families]
        batch_size = min(f.batch_size for f in families)
        label = ", ".join(n for f in families for n in f.names if n in names)
        n_batches = -(-probe.n_sequences // batch_size)
        with torch.inference_mode(), Session(geometry, observers, chunk_bytes=settings.chunk_bytes):
            for batch in progress(probe.batches(batch_size), desc=f"{probe.name} probe ({label})", total=n_batches,
                                  unit="batch"):
                for observer in observers:
                    observer.begin(batch)
                loaded.model(**probe.model_inputs(batch.to(loaded.device)))
        atlas.set_probe(probe.name, probe.settings)
        for family, observer in zip(families, observers):
            _store(atlas, family, observer.result(), names, probe.name)
    for family, wanted in computed.items():
        torch.manual_seed(settings.seed)
        result = family.compute(loaded, settings, wanted)
        probe_name = result.settings.get("probe", family.family)
        atlas.set_probe(probe_name, result.settings)
        _store(atlas, family, result, names, probe_name)
    return atlas


def _store(atlas: Atlas, family: ScoreFamily, result: ScoreResult, names: list[str], probe_name: str) -> None:
    for name, values in result.scores.items():
        if name in names:
            info = score_info(name)
            atlas.set_score(name, values, family=family.family, probe=probe_name,
                            description=family.description[name], settings=result.settings,
                            needs_full=info.needs_full if info else None, rule=info.role if info else None)
    for name, prof in result.profiles.items():
        atlas.set_profile(name, {**prof, "probe": probe_name})


def summary(atlas: Atlas, k: int = 5) -> str:
    """Top heads per score and role counts, for the terminal."""
    g = atlas.geometry
    lines = [f"{atlas.model['spec']}: {g.n_layers} layers x {g.n_heads} heads ({g.n_kv_heads} KV heads)"]
    width = max((len(n) for n in atlas.score_names), default=0)
    for name in atlas.score_names:
        tops = "  ".join(f"L{layer}.H{head} {value:.3g}" for layer, head, value in atlas.top(name, k))
        lines.append(f"  {name:<{width}}  top: {tops}")
    counts = atlas.role_counts()
    total = g.n_total_heads
    roles = ", ".join(f"{role} {n}/{total}" for role, n in sorted(counts.items())) or "none"
    lines.append(f"  roles: {roles}")
    return "\n".join(lines)


__all__ = ["ProfileSettings", "profile", "summary"]
