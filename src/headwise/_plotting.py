"""matplotlib, imported on demand with the non-interactive backend: headwise only writes PNG files."""

from __future__ import annotations

import sys
from typing import Any

from .errors import HeadwiseError


def pyplot(required_by: str | None = None) -> Any:
    """matplotlib.pyplot on the Agg backend. matplotlib is optional (headwise[plot]): without it, a
    command that exists to plot (`required_by`, its name) is refused; any other says the plot is
    skipped and gets None."""
    try:
        import matplotlib
    except ImportError:
        if required_by is not None:
            raise HeadwiseError(f"{required_by} needs matplotlib: pip install 'headwise[plot]'") from None
        print("headwise: matplotlib is not installed (pip install 'headwise[plot]'); skipping the plot",
              file=sys.stderr)
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


__all__ = ["pyplot"]
