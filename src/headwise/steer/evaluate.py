"""Fit steerings on a task and score them beside zero- and few-shot prompting, on the same test pairs.

For each method: the method's own head choice, and the same method on as many heads drawn at
random (the control). Every row records test accuracy, the mean prompt length (what a query
costs in tokens), seconds per query measured in this process, and the parameters fitted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import HeadwiseError
from ..geometry import Geometry
from ..instrument import HeadEdits
from ..tasks import Task, task_accuracy
from .base import Steering, method_class

SHOTS = (0, 1, 5, 10)


def random_heads(geometry: Geometry, count: int, seed: int) -> list[tuple[int, int]]:
    """`count` distinct (layer, head) pairs drawn uniformly from all heads with `seed`."""
    total = geometry.n_layers * geometry.n_heads
    if not 0 < count <= total:
        raise HeadwiseError(f"cannot draw {count} random heads from this model's {total}; ask for 1 to {total}")
    flat = np.random.default_rng(seed).choice(total, size=count, replace=False)
    return sorted((int(i // geometry.n_heads), int(i % geometry.n_heads)) for i in flat)


def fit(loaded: Any, task: Task, method: str, *, heads: Sequence[tuple[int, int]] | None = None, seed: int = 0,
        **options: Any) -> Steering:
    """Fit `method` on task.train (on `heads` if given, else on the method's own choice of heads)."""
    loaded.require("text", "steering")
    return method_class(method).fit(loaded, task, heads=heads, seed=seed, **options)


def _row(loaded: Any, task: Task, *, limit: int | None, seed: int, shots: int = 0,
         edits: HeadEdits | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    score = task_accuracy(loaded, task, shots=shots, limit=limit, seed=seed, edits=edits)
    seconds = time.perf_counter() - t0
    return {**score.record(), "seconds_per_query": seconds / score.n}


def steering_rows(loaded: Any, task: Task, methods: Sequence[str], *, shots: Sequence[int] = SHOTS,
                  limit: int | None = None, seed: int = 0, control_seeds: Sequence[int] = (0,),
                  options: dict[str, dict[str, Any]] | None = None,
                  on_row: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Rows keyed "0-shot", "5-shot", "<method>", "<method>@random<seed>": test accuracy and cost."""
    options = options or {}
    rows: dict[str, dict[str, Any]] = {}

    def add(name: str, row: dict[str, Any]) -> None:
        rows[name] = row
        if on_row is not None:
            on_row(name, row)

    for k in shots:
        add(f"{k}-shot", {**_row(loaded, task, limit=limit, seed=seed, shots=k), "trained_parameters": 0})
    for method in methods:
        t0 = time.perf_counter()
        steering = fit(loaded, task, method, seed=seed, **options.get(method, {}))
        fit_seconds = time.perf_counter() - t0
        add(method, {**_row(loaded, task, limit=limit, seed=seed, edits=steering.edits()),
                     "trained_parameters": steering.trained_parameters(), "heads": [list(h) for h in steering.heads],
                     "fit_seconds": fit_seconds, "settings": steering.settings})
        for control in control_seeds:
            if not steering.heads:
                break
            chosen = random_heads(loaded.geometry, len(steering.heads), control)
            t0 = time.perf_counter()
            rand = fit(loaded, task, method, heads=chosen, seed=seed, **options.get(method, {}))
            fit_seconds = time.perf_counter() - t0
            add(f"{method}@random{control}", {**_row(loaded, task, limit=limit, seed=seed, edits=rand.edits()),
                                              "trained_parameters": rand.trained_parameters(),
                                              "heads": [list(h) for h in rand.heads], "fit_seconds": fit_seconds})
    for row in rows.values():  # cost relative to the few-shot prompt the steering replaces
        for k in (5, 10):
            ref = rows.get(f"{k}-shot")
            if ref is not None and ref["seconds_per_query"] > 0:
                row[f"time_vs_{k}_shot"] = row["seconds_per_query"] / ref["seconds_per_query"]
                row[f"tokens_vs_{k}_shot"] = row["mean_prompt_tokens"] / ref["mean_prompt_tokens"]
    return rows


__all__ = ["SHOTS", "fit", "random_heads", "steering_rows"]
