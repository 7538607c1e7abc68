"""Long natural text: windows of public-domain prose shipped with the package, or the user's file."""

from __future__ import annotations

import hashlib
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from .._jsonl import json_lines
from ..errors import HeadwiseError
from .base import Probe, adds_bos


def bundled_text_files() -> list[Path]:
    root = Path(str(files("headwise").joinpath("data", "text")))
    return sorted(root.glob("*.txt"))


def load_text(path: str | Path | None = None) -> list[str]:
    """The documents to sample from: the bundled works, or one user file."""
    if path is None:
        paths = bundled_text_files()
        if not paths:
            raise HeadwiseError("the bundled probe text is missing from the installation; reinstall headwise")
    else:
        paths = [Path(path)]
        if not paths[0].is_file():
            raise HeadwiseError(f"text file not found: {path}")
    docs = []
    for p in paths:
        try:
            raw = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise HeadwiseError(f"{p} is not UTF-8 text; pass a plain UTF-8 text file") from None
        docs.extend(_jsonl_documents(p, raw) if p.suffix == ".jsonl" else [raw])
    if not any(d.strip() for d in docs):
        raise HeadwiseError(f"{paths[0]} holds no text")
    return docs


def _jsonl_documents(path: Path, raw: str) -> list[str]:
    """One document per line: a JSON string, or an object with "text" (or "prompt" + optional "target")."""
    expected = 'a JSON string or an object with "text" on each line'
    docs = []
    for number, item in json_lines(path, raw, expected):
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            item = item["text"]
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            item = item["prompt"] + str(item.get("target") or "")
        if not isinstance(item, str):
            raise HeadwiseError(f"{path} line {number}: expected {expected}")
        docs.append(item)
    return docs


def natural_text(tokenizer: Any, *, context: int, n_sequences: int = 2, seed: int = 0, text: str | Path | None = None,
                 prepend_bos: bool | None = None, name: str = "text") -> Probe:
    """`n_sequences` windows of `context` tokens each, at seeded offsets inside one document.

    Windows stay inside a document when one is long enough; otherwise the documents are
    joined by blank lines.
    """
    docs = load_text(text)
    if prepend_bos is None:
        prepend_bos = adds_bos(tokenizer)
    body = context - int(bool(prepend_bos))
    if body < 2:
        raise HeadwiseError(f"context of {context} tokens is too short for a text probe")
    encoded = [tokenizer(d, add_special_tokens=False).input_ids for d in docs]
    long_enough = [e for e in encoded if len(e) >= body]
    if not long_enough:
        joined = tokenizer("\n\n".join(docs), add_special_tokens=False).input_ids
        if len(joined) < body:
            raise HeadwiseError(f"the probe text has only {len(joined)} tokens but the context is {context}; "
                                f"pass a longer --text file or a shorter --context")
        long_enough = [joined]
    gen = torch.Generator().manual_seed(seed)
    weights = torch.tensor([len(e) - body + 1 for e in long_enough], dtype=torch.float64)
    rows = []
    for _ in range(n_sequences):
        doc = long_enough[int(torch.multinomial(weights, 1, generator=gen))]
        start = int(torch.randint(0, len(doc) - body + 1, (1,), generator=gen))
        row = list(doc[start:start + body])
        if prepend_bos:
            row = [tokenizer.bos_token_id] + row
        rows.append(row)
    digest = hashlib.sha256("\x00".join(docs).encode()).hexdigest()[:16]
    settings = {"context": context, "n_sequences": n_sequences, "seed": seed, "prepend_bos": bool(prepend_bos),
                "text": "bundled" if text is None else str(text), "text_sha256": digest}
    return Probe(name=name, input_ids=torch.tensor(rows, dtype=torch.long), settings=settings)


__all__ = ["bundled_text_files", "load_text", "natural_text"]
