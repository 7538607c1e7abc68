"""Run probes, score every head, return an Atlas.

Score families that share a probe share its forward passes: one pass of the natural-text
probe feeds the sink, streaming and distance observers at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ._progress import progress
from .atlas import Atlas
from .errors import HeadwiseError
from .instrument import DEFAULT_CHUNK_BYTES, Session
from .load import LoadedModel, load
from .scores import DEFAULT_SCORES, family_of
from .scores.base import ComputedScoreFamily, ScoreResult


@dataclass(frozen=True)
class ProfileSettings:
    """Everything that determines the scores besides the model. Written into the atlas."""

    seed: int = 0
    context: int = 2048  # tokens per natural-text sequence (sink, streaming, distance)
    text: str | None = None  # a UTF-8 text file to use instead of the bundled public-domain prose
    text_sequences: int = 2
    block_len: int = 64  # random tokens per block of the repeated probes
    repeated_sequences: int = 8  # sequences of the 2x repeated probe (TransformerLens scores)
    razor_sequences: int = 4  # sequences of the 4x repeated probe (RazorAttention scores)
    sink_tokens: int = 64  # S of the streaming cache behind streamable_mass
    window: int = 256  # W of the streaming cache behind streamable_mass
    exclude_bos: bool = False  # TransformerLens detector options (its defaults)
    exclude_current_token: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    importance_context: int = 128  # tokens per text sequence behind the importance_* scores
    importance_sequences: int = 4  # sequences of that text set
    importance_batch: int = 4  # sequences per forward/backward pass of importance_grad and importance_norm
    ablation_tokens: int = 16384  # rows x tokens per batched-ablation pass (bounds its memory)
    retrieval_grid: str = "default"  # needle trials behind retrieval scores: 'default' (minutes) or 'full' (paper)
    duo_steps: int = 100  # DuoAttention gate training steps (the paper: 2000 on GPUs)
    duo_haystack: int = 1024  # prose tokens per DuoAttention training sample (the paper: 1K-32K)
    duo_passkeys: int = 10
    duo_passkey_words: int = 32
    duo_sink: int = 128
    duo_window: int = 256
    duo_lr: float = 0.02
    duo_reg: float = 0.05

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["text"] = "bundled" if self.text is None else str(self.text)
        return d


def profile(model: LoadedModel | str, scores: Sequence[str] | None = None,
            settings: ProfileSettings | None = None) -> Atlas:
    """Score every head of `model` (a LoadedModel or a spec for headwise.load)."""
    loaded = load(model) if isinstance(model, str) else model
    settings = settings or ProfileSettings()
    names = list(dict.fromkeys(scores or DEFAULT_SCORES))
    if not names:
        raise HeadwiseError("no scores requested")
    geometry = loaded.geometry
    atlas = Atlas.new(loaded.info.to_dict(), geometry, {"scores": names, **settings.to_dict()})

    groups: dict[object, list] = {}
    computed: dict[ComputedScoreFamily, list[str]] = {}
    for name in names:
        family = family_of(name)
        if isinstance(family, ComputedScoreFamily):
            computed.setdefault(family, []).append(name)
            continue
        groups.setdefault(family.probe_key(settings), [])
        if family not in groups[family.probe_key(settings)]:
            groups[family.probe_key(settings)].append(family)

    torch.manual_seed(settings.seed)
    for families in groups.values():
        probe = families[0].make_probe(loaded.tokenizer, geometry, settings)
        geometry.check_context(probe.length)
        observers = [f.observer(geometry, probe, settings) for f in families]
        batch_size = min(f.batch_size for f in families)
        label = ", ".join(n for f in families for n in f.names if n in names)
        n_batches = -(-probe.n_sequences // batch_size)
        with torch.inference_mode(), Session(geometry, observers, chunk_bytes=settings.chunk_bytes):
            for batch in progress(probe.batches(batch_size), desc=f"{probe.name} probe ({label})", total=n_batches,
                                  unit="batch"):
                for observer in observers:
                    observer.begin(batch)
                loaded.model(input_ids=batch.to(loaded.device), use_cache=False, logits_to_keep=1)
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


def _store(atlas: Atlas, family, result: ScoreResult, names: list[str], probe_name: str) -> None:
    for name, values in result.scores.items():
        if name in names:
            atlas.set_score(name, values, family=family.family, probe=probe_name,
                            description=family.description[name], settings=result.settings)
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


def profile_to_dir(model: LoadedModel | str, out: str | Path, scores: Sequence[str] | None = None,
                   settings: ProfileSettings | None = None) -> tuple[Atlas, Path]:
    atlas = profile(model, scores, settings)
    return atlas, atlas.save(out)
