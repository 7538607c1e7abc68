"""Progress bars and status lines, all on stderr so stdout stays clean for results."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def quiet() -> bool:
    return os.environ.get("HEADWISE_QUIET", "") not in ("", "0")


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """A tqdm bar that shows up only for steps that last long enough to need one."""
    yield from tqdm(items, desc=desc, total=total, unit=unit, disable=quiet(), mininterval=0.5,
                    delay=1.0, file=sys.stderr, dynamic_ncols=True, leave=False)


def note(message: str) -> None:
    if not quiet():
        print(f"headwise: {message}", file=sys.stderr, flush=True)
