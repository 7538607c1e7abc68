"""Per-block peak RSS (headwise._memory): a block that touches memory shows it, an idle one does not."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from headwise._memory import PeakRSS, peak_rss

MIB = 2**20


def _supported() -> bool:
    with peak_rss() as m:
        pass
    return m.peak_bytes is not None


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux") or not _supported(),
                                reason="needs /proc/self/clear_refs (Linux)")


@linux_only
def test_a_block_that_touches_memory_reports_it_after_a_bigger_earlier_one():
    big = np.ones(400 * MIB // 8)  # an earlier, bigger block: ru_maxrss would report it for ever after
    del big
    with peak_rss() as m:
        block = np.ones(160 * MIB // 8)
        del block
    assert 140 * MIB <= m.above_start_bytes < 300 * MIB
    with peak_rss() as idle:
        sum(range(1000))
    assert idle.above_start_bytes < 40 * MIB


def test_unsupported_platforms_report_none_not_a_guess(monkeypatch, tmp_path):
    import headwise._memory as memory

    monkeypatch.setattr(memory, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    with peak_rss() as m:
        pass
    assert m.peak_bytes is None and m.start_bytes is None and m.above_start_bytes is None
    assert PeakRSS(100, 50).above_start_bytes == 0
