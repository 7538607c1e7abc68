"""AttentionInfluence (Hua et al. 2025, arXiv 2505.07293): rank documents by how much masking a
role's heads raises a small model's language-model loss on them.

score(doc) = (masked_loss - clean_loss) / clean_loss, each loss the mean next-token cross-entropy
over the document's tokens (truncated to `max_tokens` and the model's context). The heads are a
role's top k by the score behind the role's rule (k defaults to the heads the atlas labels with
the role), or any explicit set (`random_heads`: the control). Masking zeroes a head's output, or,
with ablation="uniform", spreads its attention evenly over the keys it may see (see ABLATIONS).

Both conditions are rows of the same forward passes (instrument.Session takes a head scale per
row), and documents of similar length share a pass, right-padded: under causal attention no real
token sees a pad, so padding changes no loss. docs/influence.md has the departures from the paper.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._io import deferred_interrupt, write_text_atomic
from ._jsonl import json_lines
from ._progress import note, progress
from .ablation import Readout, sequence_losses
from .atlas import Atlas
from .errors import HeadwiseError
from .instrument import HeadEdits, Session, ablation_scale
from .parts import final_hidden
from .scores import role_rules

DEFAULT_MAX_TOKENS = 1024
DEFAULT_BATCH_TOKENS = 16384  # rows x padded length of one forward pass, both conditions counted
SCHEMA = "headwise.influence/1"
# How a head is masked. AttentionInfluence's abstract says only "masking"; AIR (arXiv 2512.13279), which
# builds on it, sets the masked heads' attention weights to uniform. Both are offered; zero is headwise's
# ablation everywhere else (validate, importance), so scores stay comparable with the atlas's.
ABLATIONS = {"zero": "head output multiplied by 0 before the output projection",
             "uniform": "head attention weights replaced by uniform weights over the keys it may see (AIR)"}


# ---- the corpus ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    id: str | int
    text: str


def load_documents(path: str | Path) -> list[Document]:
    """A JSON Lines corpus, one {"text": ..., "id": ...} per line (id optional: the line number)."""
    path = Path(path)
    if not path.is_file():
        raise HeadwiseError(f"data file not found: {path}")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HeadwiseError(f"{path} is not UTF-8 text; pass a JSON Lines file") from None
    expected = '{"text": "...", "id": "..."} on each line (id optional)'
    docs, seen = [], set()
    for number, item in json_lines(path, raw, expected):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise HeadwiseError(f'{path} line {number} has no "text" string; write {expected}')
        doc_id = item.get("id", number)
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
            raise HeadwiseError(f'{path} line {number}: "id" must be a string or an integer')
        if doc_id in seen:
            raise HeadwiseError(f"{path} line {number}: id {doc_id!r} is used twice; give every document its own id")
        seen.add(doc_id)
        docs.append(Document(doc_id, item["text"]))
    if not docs:
        raise HeadwiseError(f"{path} holds no documents; write {expected}")
    return docs


# ---- which heads -------------------------------------------------------------------------------
def role_score(atlas: Atlas | None, role: str) -> tuple[str, bool]:
    """The score ranking a role's heads and whether larger means more of the role: the role's rule as
    the atlas recorded it, else as the score families declare it (validate reads rules the same way)."""
    rules = [*(atlas.data["roles"].get("rules", []) if atlas is not None else []), *(r.to_dict() for r in role_rules())]
    for rule in rules:
        if rule["role"] == role:
            return rule["score"], rule["op"] in (">", ">=")
    known = sorted({r["role"] for r in rules})
    raise HeadwiseError(f"no role rule knows role '{role}'; choose from {', '.join(known)}")


def _check_k(k: int, total: int) -> None:
    if not 1 <= k <= total:
        raise HeadwiseError(f"k must be between 1 and {total} (this model has {total} heads); got {k}")


def role_heads(atlas: Atlas, role: str, k: int | None = None) -> list[tuple[int, int]]:
    """The top-k heads of `role` by its score (k: the heads the atlas labels with the role)."""
    name, larger = role_score(atlas, role)
    atlas.score(name)  # a one-line error for an atlas without the score
    if k is None:
        k = len(atlas.heads_with_role(role))
        if k == 0:
            raise HeadwiseError(f"no head of this atlas is labelled '{role}'; pass --k to mask the top-k heads by "
                                f"'{name}' anyway")
    _check_k(k, atlas.geometry.n_total_heads)
    return sorted((layer, head) for layer, head, _ in atlas.top(name, k, largest=larger))


def random_heads(n_layers: int, n_heads: int, k: int, seed: int,
                 exclude: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """k heads drawn without replacement from those not in `exclude` (numpy default_rng(seed))."""
    _check_k(k, n_layers * n_heads)
    rest = [(layer, head) for layer in range(n_layers) for head in range(n_heads) if (layer, head) not in set(exclude)]
    if len(rest) < k:
        raise HeadwiseError(f"only {len(rest)} heads are left to draw {k} random heads from; lower --k")
    rng = np.random.default_rng(seed)
    return sorted(rest[i] for i in rng.choice(len(rest), size=k, replace=False))


# ---- the engine ------------------------------------------------------------------------------
def _uniform_attention(rows: Tensor) -> HeadEdits:
    """Attention of the heads marked in rows [batch, layers, heads] (bool) made uniform over the keys
    each query may see (causal: keys up to its own position)."""

    def weights(layer: int, probs: Tensor, query_index: Tensor, key_offset: int) -> Tensor:
        marked = rows[:, layer].to(probs.device)
        if not marked.any():
            return probs
        keys = torch.arange(probs.shape[-1], device=probs.device)
        visible = (keys[None, :] <= query_index[:, None]).to(probs.dtype)
        uniform = visible / visible.sum(-1, keepdim=True)
        return torch.where(marked[:, :, None, None], uniform, probs)

    return HeadEdits(weights=weights)


def document_losses(loaded: Any, token_ids: Sequence[Sequence[int]], scales: Tensor,
                    batch_tokens: int = DEFAULT_BATCH_TOKENS, ablation: str = "zero") -> Tensor:
    """[conditions, documents] float64: each document's mean next-token loss with head outputs
    multiplied by scales[c] ([conditions, layers, heads]); with ablation="uniform", the heads whose
    scale is 0 get uniform attention instead. Every document needs >= 2 tokens."""
    if ablation not in ABLATIONS:
        raise HeadwiseError(f"unknown ablation '{ablation}'; choose from {', '.join(ABLATIONS)}")
    g = loaded.geometry
    lengths = [len(t) for t in token_ids]
    if min(lengths, default=2) < 2:
        raise HeadwiseError("every document needs at least 2 tokens to have a next-token loss")
    c = scales.shape[0]
    out = torch.empty(c, len(lengths), dtype=torch.float64)
    # Longest first, so each pass pads to its first document; ties keep input order (deterministic).
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and c * (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    device = loaded.device
    with torch.inference_mode():
        for group in progress(groups, desc="influence", total=len(groups), unit="pass"):
            t = lengths[group[0]]
            ids = torch.full((len(group), t), pad, dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, :lengths[i]] = torch.as_tensor(token_ids[i])
            real = torch.arange(t - 1)[None, :] < torch.tensor([lengths[i] - 1 for i in group])[:, None]
            readout = Readout(torch.arange(t - 1).expand(len(group), -1), real, ids[:, 1:]).rows(c)
            rows = scales.repeat_interleave(len(group), 0)
            session = Session(g, head_scale=rows.to(device)) if ablation == "zero" else \
                Session(g, edits=_uniform_attention(rows == 0))
            with session:
                hidden = final_hidden(loaded.model, ids.repeat(c, 1).to(device))
            out[:, group] = sequence_losses(loaded.model, hidden, readout).reshape(c, len(group))
    return out


# ---- the method ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DocumentScore:
    index: int  # position in the input
    id: str | int
    score: float  # (masked_loss - clean_loss) / clean_loss
    clean_loss: float
    masked_loss: float
    tokens: int  # tokens fed to the model (tokens - 1 predictions scored)
    truncated: bool


@dataclass
class InfluenceResult:
    ranked: list[DocumentScore]  # by score, descending (ties: input order)
    heads: list[tuple[int, int]]
    role: str | None
    head_score: str | None  # the atlas score that chose the heads (None: heads given)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"index", "id", "reason"}
    settings: dict[str, Any] = field(default_factory=dict)

    def records(self) -> list[dict[str, Any]]:
        return [{"rank": r, "id": d.id, "score": d.score, "clean_loss": d.clean_loss, "masked_loss": d.masked_loss,
                 "tokens": d.tokens, "truncated": d.truncated} for r, d in enumerate(self.ranked, 1)]

    def describe(self) -> dict[str, Any]:
        return {"method": "AttentionInfluence (arXiv 2505.07293)",
                "score": "(masked_loss - clean_loss) / clean_loss, mean next-token loss per document",
                "role": self.role, "head_score": self.head_score, "k": len(self.heads),
                "heads": [list(h) for h in self.heads], "ablation": ABLATIONS[self.settings.get("ablation", "zero")],
                "settings": self.settings,
                "documents": len(self.ranked) + len(self.skipped), "scored": len(self.ranked),
                "truncated": sum(d.truncated for d in self.ranked), "skipped": self.skipped}


def influence_scores(loaded: Any, atlas: Atlas | None, documents: Sequence[str | Document], *,
                     role: str | None = None, k: int | None = None, heads: Sequence[tuple[int, int]] | None = None,
                     max_tokens: int = DEFAULT_MAX_TOKENS, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                     ablation: str = "zero") -> InfluenceResult:
    """Score and rank `documents` by the relative loss increase when `heads` (default: the top-k heads
    of `role` in `atlas`) are masked (ablation: "zero" their outputs, or "uniform" their attention).
    Documents under 2 tokens, or that the model predicts with zero loss, are skipped (listed in the
    result, with a note)."""
    loaded.require("text", "AttentionInfluence")
    g = loaded.geometry
    if atlas is not None:
        atlas.check_model(loaded.info, g)
    if heads is None:
        if atlas is None or role is None:
            raise HeadwiseError("pass heads=[(layer, head), ...] or an atlas and a role to choose them from")
        heads, head_score = role_heads(atlas, role, k), role_score(atlas, role)[0]
    else:
        heads, head_score = sorted({(int(layer), int(head)) for layer, head in heads}), None
        _check_k(len(heads), g.n_total_heads)
    if ablation not in ABLATIONS:
        raise HeadwiseError(f"unknown ablation '{ablation}'; choose from {', '.join(ABLATIONS)}")
    if max_tokens < 2 or batch_tokens < 2:
        raise HeadwiseError(f"max_tokens and batch_tokens must be at least 2; got {max_tokens} and {batch_tokens}")
    if not documents:
        raise HeadwiseError("no documents to score; pass at least one")
    docs = [d if isinstance(d, Document) else Document(i, d) for i, d in enumerate(documents)]
    limit = min(max_tokens, g.max_positions or max_tokens)
    # One token past the limit tells a truncated document from one that just fits.
    encoded = [loaded.tokenizer(d.text, truncation=True, max_length=limit + 1).input_ids for d in docs]
    skipped = [{"index": i, "id": d.id, "reason": f"{len(e)} token(s): no next-token loss"}
               for i, (d, e) in enumerate(zip(docs, encoded)) if len(e) < 2]
    keep = [i for i, e in enumerate(encoded) if len(e) >= 2]
    if not keep:
        raise HeadwiseError("no document has 2 or more tokens; AttentionInfluence needs a next-token loss")
    scales = torch.stack([torch.ones(g.n_layers, g.n_heads), ablation_scale(g, heads)])
    losses = document_losses(loaded, [encoded[i][:limit] for i in keep], scales, batch_tokens, ablation)
    scored = []
    for j, i in enumerate(keep):
        clean, masked = float(losses[0, j]), float(losses[1, j])
        if clean <= 0:  # a relative increase over nothing is undefined
            skipped.append({"index": i, "id": docs[i].id, "reason": "clean loss is 0: the relative increase is "
                                                                     "undefined"})
            continue
        scored.append(DocumentScore(i, docs[i].id, (masked - clean) / clean, clean, masked,
                                    min(len(encoded[i]), limit), len(encoded[i]) > limit))
    if not scored:
        raise HeadwiseError("no document could be scored (every clean loss is 0)")
    skipped.sort(key=lambda s: s["index"])
    if skipped:
        note(f"skipped {len(skipped)} document(s) ({skipped[0]['reason']}, ...); the output lists them")
    ranked = sorted(scored, key=lambda d: (-d.score, d.index))
    return InfluenceResult(ranked, list(heads), role, head_score, skipped,
                           {"max_tokens": max_tokens, "context_limit": limit, "batch_tokens": batch_tokens,
                            "ablation": ablation})


# ---- files -----------------------------------------------------------------------------------
def meta_path(out: str | Path) -> Path:
    """The provenance file written beside a ranked JSONL file: OUT.meta.json."""
    out = Path(out)
    return out.with_name(out.name + ".meta.json")


def write_ranked(result: InfluenceResult, out: str | Path, provenance: dict[str, Any]) -> tuple[Path, Path]:
    """OUT: one JSON line per scored document, best first; OUT.meta.json: what produced it (the run's
    heads and settings plus `provenance`) and OUT's sha256, which ties the pair together."""
    out = Path(out)
    ranked = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in result.records())
    meta = {"schema": SCHEMA, **result.describe(), **provenance,
            "ranked": {"file": out.name, "sha256": hashlib.sha256(ranked.encode("utf-8")).hexdigest()}}
    meta_text = json.dumps(meta, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    meta_text = re.sub(r"\[\s+(\d+),\s+(\d+)\s+\]", r"[\1, \2]", meta_text)  # a (layer, head) pair on one line
    # Ctrl-C waits for both; after a crash between the two, the old meta's sha256 no longer matches OUT.
    with deferred_interrupt():
        write_text_atomic(out, ranked)
        write_text_atomic(meta_path(out), meta_text)
    return out, meta_path(out)


__all__ = ["DEFAULT_BATCH_TOKENS", "DEFAULT_MAX_TOKENS", "Document", "DocumentScore", "InfluenceResult",
           "document_losses", "influence_scores", "load_documents", "meta_path", "random_heads", "role_heads",
           "role_score", "write_ranked"]
