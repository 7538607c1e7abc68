"""Peak resident memory of one block of work inside a long-lived process (Linux).

ru_maxrss only ever grows, so in a process that runs many policies one after another it says
nothing about the later ones. Linux lets a process reset its own high-water mark (writing 5 to
/proc/self/clear_refs resets VmHWM to the current RSS), so a block's peak can be read on its own.
Memory the allocator kept from earlier work would hide a block's growth (it reuses it without
touching RSS), so glibc is first asked to give free memory back (malloc_trim). Where either is
missing (macOS, musl, a locked-down /proc) the figures are None, never a guess.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class PeakRSS:
    start_bytes: int | None = None  # RSS when the block began (after giving free memory back)
    peak_bytes: int | None = None  # highest RSS during the block

    @property
    def above_start_bytes(self) -> int | None:
        if self.start_bytes is None or self.peak_bytes is None:
            return None
        return max(0, self.peak_bytes - self.start_bytes)


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def _reset_high_water_mark() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def peak_rss() -> Iterator[PeakRSS]:
    """with peak_rss() as m: ... ; then m.peak_bytes, m.start_bytes and m.above_start_bytes (None if unsupported)."""
    record = PeakRSS()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    supported = _reset_high_water_mark()
    start = _status_kib("VmRSS") if supported else None
    try:
        yield record
    finally:
        peak = _status_kib("VmHWM") if supported else None
        if start is not None and peak is not None:
            record.start_bytes, record.peak_bytes = start * 1024, peak * 1024


__all__ = ["PeakRSS", "peak_rss"]
