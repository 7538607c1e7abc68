"""JSON Lines input (prompts, text sets): one JSON value per non-blank line, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import HeadwiseError


def json_lines(path: Path, raw: str, expected: str) -> list[tuple[int, Any]]:
    """(line number, value) for every non-blank line; `expected` says what a line should hold."""
    values = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise HeadwiseError(f"{path} line {number} is not JSON ({e.msg}); write {expected}") from None
    return values
