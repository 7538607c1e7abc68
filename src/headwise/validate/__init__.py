"""Causal validation of role labels: does zeroing a role's heads break what the role is for?

For a role, zero the top-k heads by the role's score (targeted) and, as a control, k heads
drawn at random from all other heads (at least 5 seeded draws), then measure the role's task
metric for the unablated model, the targeted ablation and each random ablation. Every
condition is a row of one batch: `head_scale` [conditions, layers, heads] (instrument.Session)
ablates different heads in different rows of the same forward pass.

A label passes when the targeted ablation hurts the metric more than every random draw does;
otherwise the result says FAILS, with the numbers. Tasks are plug-ins, one file each:
`register_task(role, task)` maps a role to any ValidationTask. Built in:
- retrieval: passkey and needle accuracy (retrieval.py);
- induction, previous-token: in-context loss on a repeated random block (in_context.py);
- successor: next-ordinal accuracy (successor.py);
- important (image classifiers): accuracy on held-out images (image_accuracy.py).
headwise.attribute registers a task for each attribution it computes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..atlas import Atlas
from ..decode import greedy
from ..errors import HeadwiseError
from ..instrument import ablation_scale
from ..scores import role_rules
from .base import TaskOutcome, ValidationTask
from .image_accuracy import ImageAccuracyTask
from .in_context import InContextLossTask
from .retrieval import RetrievalTask
from .successor import SuccessorTask

MIN_DRAWS = 5


class _Registered:
    def __init__(self, task: ValidationTask, score: str | None):
        self.task = task
        self.score = score  # the score that ranks the role's heads; None: the role's rule


_TASKS: dict[str, _Registered] = {}


def register_task(role: str, task: ValidationTask, score: str | None = None, replace: bool = False) -> None:
    """Make `headwise validate --role ROLE` use `task`; heads are ranked by `score` (default: the role's rule)."""
    if role in _TASKS and not replace:
        raise HeadwiseError(f"role '{role}' already has a validation task ({_TASKS[role].task.name}); "
                            f"pass replace=True to swap it")
    _TASKS[role] = _Registered(task, score)


def registered_roles() -> list[str]:
    return sorted(_TASKS)


def registered_task(role: str) -> ValidationTask | None:
    """The task `headwise validate --role ROLE` runs (None: the role has none)."""
    return _TASKS[role].task if role in _TASKS else None


def _score_for(role: str, atlas: Atlas | None = None) -> tuple[str, bool]:
    """The score ranking a role's heads, and whether larger means more of the role: the registered
    score, else the role's rule as the atlas recorded it, else as the score families declare it."""
    if role not in _TASKS:
        raise HeadwiseError(f"no validation task for role '{role}'; roles with one: {', '.join(registered_roles())}")
    if _TASKS[role].score is not None:
        return _TASKS[role].score, True
    recorded = atlas.data["roles"].get("rules", []) if atlas is not None else []
    for rule in [*recorded, *(r.to_dict() for r in role_rules())]:
        if rule["role"] == role:
            return rule["score"], rule["op"] in (">", ">=")
    raise HeadwiseError(f"role '{role}' has no role rule; register its task with score=...")


def greedy_replies(loaded: Any, input_ids: Tensor, scales: Tensor, max_new_tokens: int) -> list[str]:
    """Greedy replies to one prompt [1, T], one per row of scales [C, L, H] (row c ablated by scales[c])."""
    return greedy(loaded, input_ids.expand(scales.shape[0], -1), max_new_tokens, until="line",
                  head_scale=scales).texts


# ---- the experiment ---------------------------------------------------------------------------
def _heads(pairs: Any) -> list[list[int]]:
    return [[int(layer), int(head)] for layer, head in pairs]


def validate(loaded: Any, atlas: Atlas, role: str, k: int | None = None, draws: int = MIN_DRAWS, seed: int = 0,
             task: ValidationTask | None = None) -> dict[str, Any]:
    """Ablate the top-k heads of `role` and `draws` random k-head sets; return (and explain) the effect.

    k defaults to the number of heads labelled `role` in the atlas.
    """
    atlas.check_model(loaded.info, loaded.geometry)
    if draws < MIN_DRAWS:
        raise HeadwiseError(f"the random control needs at least {MIN_DRAWS} draws; got {draws}")
    score_name, larger = _score_for(role, atlas)
    task = task or _TASKS[role].task
    loaded.require(task.modality, f"validating role '{role}' ({task.name})")
    check = getattr(task, "check_atlas", None)  # a task made for one atlas's data (an attribution) refuses another's
    if check is not None:
        check(atlas, role)
    scores = atlas.score(score_name)
    g = loaded.geometry
    labelled = atlas.heads_with_role(role)
    if k is None:
        k = len(labelled)
        if k == 0:
            raise HeadwiseError(f"no head of this atlas is labelled '{role}'; pass --k to ablate the top-k heads by "
                                f"'{score_name}' anyway")
    if not 1 <= k < g.n_total_heads:
        raise HeadwiseError(f"--k must be between 1 and {g.n_total_heads - 1} (this model has {g.n_total_heads} "
                            f"heads); got {k}")
    targeted = [(layer, head) for layer, head, _ in atlas.top(score_name, k, largest=larger)]
    rest = [(layer, head) for layer in range(g.n_layers) for head in range(g.n_heads) if (layer, head) not in targeted]
    if len(rest) < k:
        raise HeadwiseError(f"only {len(rest)} heads are left to draw {k} random heads from; lower --k")
    rng = np.random.default_rng(seed)
    random_sets = [sorted(rest[i] for i in rng.choice(len(rest), size=k, replace=False)) for _ in range(draws)]
    scales = torch.stack([torch.ones(g.n_layers, g.n_heads), ablation_scale(g, targeted),
                          *[ablation_scale(g, heads) for heads in random_sets]])
    outcome = task.evaluate(loaded, scales)
    if len(outcome.values) != scales.shape[0]:
        raise HeadwiseError(f"validation task '{task.name}' returned {len(outcome.values)} values for "
                            f"{scales.shape[0]} conditions")
    baseline, target, randoms = outcome.values[0], outcome.values[1], outcome.values[2:]
    sign = 1.0 if task.higher_is_better else -1.0
    harm = sign * (baseline - target)  # > 0: the ablation made the metric worse
    random_harms = [sign * (baseline - v) for v in randoms]
    verdict = _verdict(harm, random_harms, baseline, task)
    details = outcome.details or [None] * scales.shape[0]
    return {
        "role": role, "k": k, "draws": draws, "seed": seed, "score": score_name,
        "task": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better,
        "task_settings": task.settings(),
        "baseline": baseline, "targeted": target, "random": randoms,
        "random_mean": float(np.mean(randoms)), "random_std": float(np.std(randoms, ddof=1)),
        "targeted_harm": harm, "random_harm": random_harms,
        "passes": verdict.startswith("passes"), "verdict": verdict,
        "targeted_heads": [[layer, head, float(scores[layer, head])] for layer, head in targeted],
        "targeted_labelled": sum((layer, head) in set(labelled) for layer, head in targeted),
        "random_heads": [_heads(s) for s in random_sets],
        "random_draw": f"numpy default_rng({seed}).choice over the {len(rest)} non-targeted heads, without "
                       f"replacement, {draws} times",
        "ablation": "head output multiplied by 0 before the output projection",
        "details": {"baseline": details[0], "targeted": details[1], "random": details[2:]},
    }


def _verdict(harm: float, random_harms: list[float], baseline: float, task: ValidationTask) -> str:
    worst = max(random_harms)
    if harm <= 0:
        why = " (untestable: the unablated model already scores 0)" if task.higher_is_better and baseline <= 0 else ""
        return f"FAILS: ablating these heads does not worsen the metric (change {-harm:+.4g}){why}"
    if harm > worst:
        return (f"passes: targeted ablation worsens the metric by {harm:.4g}, more than every random draw "
                f"(largest {worst:.4g})")
    beaten = sum(h >= harm for h in random_harms)
    return (f"FAILS: {beaten} of {len(random_harms)} random draws worsen the metric as much or more "
            f"(targeted {harm:.4g}, largest random {worst:.4g})")


def format_validation(result: dict[str, Any]) -> str:
    """The plain statement for the terminal."""
    r = result
    lines = [f"{r['role']} (top {r['k']} heads by {r['score']}, {r['targeted_labelled']} of them labelled "
             f"'{r['role']}'; metric: {r['metric']}, {'higher' if r['higher_is_better'] else 'lower'} is better)",
             f"  unablated           {r['baseline']:.4g}",
             f"  targeted ablation   {r['targeted']:.4g}",
             f"  random ablations    {r['random_mean']:.4g} +- {r['random_std']:.3g} (std over {r['draws']} draws: "
             + ", ".join(f"{v:.4g}" for v in r["random"]) + ")",
             f"  verdict: {r['verdict']}"]
    return "\n".join(lines)


def validate_and_store(loaded: Any, atlas: Atlas, role: str, **kwargs: Any) -> dict[str, Any]:
    result = validate(loaded, atlas, role, **kwargs)
    atlas.set_validation(f"{role}@k{result['k']}", result)
    return result


def validate_labelled_roles(loaded: Any, atlas: Atlas, draws: int = MIN_DRAWS, seed: int = 0) -> list[dict[str, Any]]:
    """Validate (and store) every role that has a task and at least one labelled head, k = its head count (at
    most a quarter of the model's heads, so that the random draws from the others vary)."""
    results = []
    for role in registered_roles():
        try:
            _score_for(role, atlas)
        except HeadwiseError:
            continue
        labelled = len(atlas.heads_with_role(role))
        if labelled:
            # A role many heads carry leaves too few others for a varied random control (at half the heads,
            # every draw is the same complement): test its top quarter of the model's heads.
            k = max(1, min(labelled, loaded.geometry.n_total_heads // 4))
            results.append(validate_and_store(loaded, atlas, role, k=k, draws=draws, seed=seed))
    return results


_IN_CONTEXT = InContextLossTask()
register_task("retrieval", RetrievalTask())
register_task("induction", _IN_CONTEXT)
register_task("previous-token", _IN_CONTEXT)
register_task("successor", SuccessorTask())
register_task("important", ImageAccuracyTask(), score="importance_accuracy")

__all__ = ["ImageAccuracyTask", "InContextLossTask", "RetrievalTask", "SuccessorTask", "TaskOutcome", "ValidationTask",
           "ablation_scale", "format_validation", "greedy_replies", "register_task", "registered_roles",
           "registered_task", "validate", "validate_and_store", "validate_labelled_roles"]
