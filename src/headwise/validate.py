"""Causal validation of role labels: does zeroing a role's heads break what the role is for?

For a role, zero the top-k heads by the role's score (targeted) and, as a control, k heads
drawn at random from all other heads (at least 5 seeded draws), then measure the role's task
metric for the unablated model, the targeted ablation and each random ablation. Every
condition is a row of one batch: `head_scale` [conditions, layers, heads] (instrument.Session)
ablates different heads in different rows of the same forward pass.

A label passes when the targeted ablation hurts the metric more than every random draw does;
otherwise the result says FAILS, with the numbers. Tasks are pluggable: `register_task(role,
task)` maps a role to any object with `evaluate(loaded, scales) -> TaskOutcome`.

Built-in tasks:
- retrieval: passkey and needle accuracy (Wu et al. 2024 mask retrieval heads and watch
  needle-in-a-haystack fail);
- induction, previous-token: in-context loss, i.e. the loss on the second copy of a repeated
  random block (Olsson et al. 2022), which both roles are needed for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._progress import progress
from .atlas import Atlas
from .errors import HeadwiseError
from .instrument import Session, ablation_scale
from .probes.needle import answer_found, bundled_needles, needle_case, passkey_case
from .probes.repeated import repeated_tokens
from .roles import ROLE_RULES
from .scores.retrieval import cache_kwargs, returned_cache, stop_ids

MIN_DRAWS = 5


@dataclass
class TaskOutcome:
    """The metric under each condition (one per row of `scales`), plus optional per-condition details."""

    values: list[float]
    details: list[Any] = field(default_factory=list)


class ValidationTask(ABC):
    """A task metric measured under several head ablations at once."""

    name: str
    metric: str
    higher_is_better: bool

    @abstractmethod
    def evaluate(self, loaded: Any, scales: Tensor) -> TaskOutcome:
        """scales: [conditions, layers, heads] head multipliers (0 = ablated). One value per condition."""

    def settings(self) -> dict[str, Any]:
        """Everything needed to rebuild the task's inputs."""
        return {}


@dataclass
class _Registered:
    task: ValidationTask
    score: str | None  # the score that ranks the role's heads; None: the role's rule in ROLE_RULES


_TASKS: dict[str, _Registered] = {}


def register_task(role: str, task: ValidationTask, score: str | None = None, replace: bool = False) -> None:
    """Make `headwise validate --role ROLE` use `task`; heads are ranked by `score` (default: the role's rule)."""
    if role in _TASKS and not replace:
        raise HeadwiseError(f"role '{role}' already has a validation task ({_TASKS[role].task.name}); "
                            f"pass replace=True to swap it")
    _TASKS[role] = _Registered(task, score)


# Modules that register their own roles' tasks when imported (successor, attributions).
_PLUGINS = ("headwise.attribute",)


def _import_plugins() -> None:
    import importlib

    for module in _PLUGINS:
        importlib.import_module(module)


def registered_roles() -> list[str]:
    _import_plugins()
    return sorted(_TASKS)


def _score_for(role: str) -> tuple[str, bool]:
    """The score ranking a role's heads, and whether larger means more of the role."""
    _import_plugins()
    if role not in _TASKS:
        raise HeadwiseError(f"no validation task for role '{role}'; roles with one: {', '.join(registered_roles())}")
    if _TASKS[role].score is not None:
        return _TASKS[role].score, True
    for rule in ROLE_RULES:
        if rule.role == role:
            return rule.score, rule.op in (">", ">=")
    raise HeadwiseError(f"role '{role}' has no rule in roles.ROLE_RULES; register its task with score=...")


# ---- batched greedy decoding under per-row head scales ----------------------------------------
def greedy_replies(loaded: Any, input_ids: Tensor, scales: Tensor, max_new_tokens: int) -> list[str]:
    """Greedy replies to one prompt [1, T], one per row of scales [C, L, H] (row c ablated by scales[c])."""
    n = scales.shape[0]
    device = loaded.device
    ids = input_ids.to(device).expand(n, -1).contiguous()
    stops = stop_ids(loaded)
    out_tokens: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    with torch.inference_mode(), Session(loaded.geometry, head_scale=scales.to(device)):
        out = loaded.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            for row, token in enumerate(nxt.tolist()):
                if done[row]:
                    continue
                if token in stops:
                    done[row] = True
                else:
                    out_tokens[row].append(token)
                    done[row] = "\n" in loaded.tokenizer.decode([token]) and len(out_tokens[row]) > 1
            if all(done):
                break
            out = loaded.model(input_ids=nxt[:, None], use_cache=True, logits_to_keep=1,
                               **cache_kwargs(loaded.model, returned_cache(out)))
    return [loaded.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out_tokens]


class RetrievalTask(ValidationTask):
    """Passkey and needle-in-a-haystack accuracy (greedy reply contains the answer).

    The default context is 1024 tokens: the issue asks for 1K-2K, and smollm2-135m still
    answers at 1K (it fails most needles at 2K already, leaving nothing to break).
    """

    name = "retrieval"
    metric = "passkey + needle accuracy"
    higher_is_better = True

    def __init__(self, context: int = 1024, passkeys: int = 6, needles: int | None = None, depth: float = 0.5,
                 seed: int = 0, text: str | None = None):
        self.context, self.passkeys, self.depth, self.seed, self.text = context, passkeys, depth, seed, text
        self.needles = len(bundled_needles()) if needles is None else needles

    def settings(self) -> dict[str, Any]:
        return {"context": self.context, "passkeys": self.passkeys, "passkey_filler": "repeat",
                "passkey_depths": "evenly spaced in [0.1, 0.9]",
                "frame": "chat turn when the tokenizer has a chat template", "needles": self.needles,
                "needle_depth": self.depth,
                "needle_filler": "essay", "text": "bundled" if self.text is None else str(self.text),
                "seed": self.seed, "correct": "greedy reply contains the answer (case and punctuation ignored)"}

    def cases(self, loaded: Any) -> list[Any]:
        tok, limit = loaded.tokenizer, loaded.geometry.max_positions
        depths = np.linspace(0.1, 0.9, self.passkeys) if self.passkeys > 1 else [0.5] * self.passkeys
        cases = [passkey_case(tok, context=self.context, depth=float(d), seed=self.seed + i, max_positions=limit,
                              chat=None) for i, d in enumerate(depths)]
        for case in cases:
            case.settings["label"] = f"passkey {case.answer} at depth {case.settings['depths'][0]:.2f}"
        for i, n in enumerate(bundled_needles()[:self.needles]):
            case = needle_case(tok, context=self.context, depth=self.depth, needle=n, seed=self.seed + i,
                               text=self.text, max_positions=limit)
            case.settings["label"] = f"needle {i} ({n.answer})"
            cases.append(case)
        return cases

    def evaluate(self, loaded: Any, scales: Tensor) -> TaskOutcome:
        correct = np.zeros((scales.shape[0], 0), dtype=bool)
        names = []
        for case in progress(self.cases(loaded), desc="retrieval task", unit="prompt"):
            budget = len(loaded.tokenizer(" " + case.needles[case.target].text, add_special_tokens=False).input_ids)
            replies = greedy_replies(loaded, case.input_ids, scales, budget + 4)
            hits = np.array([answer_found(r, case.answer) for r in replies])
            correct = np.concatenate([correct, hits[:, None]], axis=1)
            names.append(case.settings["label"])
        details = [{"correct": [names[i] for i in np.nonzero(row)[0]]} for row in correct]
        return TaskOutcome(values=[float(v) for v in correct.mean(1)], details=details)


class InContextLossTask(ValidationTask):
    """Loss on the second copy of a repeated random block (its first token excluded: not inducible)."""

    name = "in_context_loss"
    metric = "in-context loss (nats, 2nd copy of repeated random tokens)"
    higher_is_better = False

    def __init__(self, block_len: int = 64, n_sequences: int = 8, seed: int = 0, rows_per_pass: int = 16):
        self.block_len, self.n_sequences, self.seed, self.rows_per_pass = block_len, n_sequences, seed, rows_per_pass

    def settings(self) -> dict[str, Any]:
        return {"block_len": self.block_len, "repeats": 2, "n_sequences": self.n_sequences, "seed": self.seed,
                "loss_on": "tokens 2..n of the second copy"}

    def evaluate(self, loaded: Any, scales: Tensor) -> TaskOutcome:
        probe = repeated_tokens(loaded.tokenizer, loaded.geometry.vocab_size, block_len=self.block_len, repeats=2,
                                n_sequences=self.n_sequences, seed=self.seed)
        ids, n = probe.input_ids, self.block_len
        # The last n positions hold the second copy; all but the last predict its tokens 2..n.
        targets = ids[:, -(n - 1):]
        c, s = scales.shape[0], ids.shape[0]
        rows = [(cond, seq) for cond in range(c) for seq in range(s)]
        losses = torch.zeros(c, s, dtype=torch.float64)
        device = loaded.device
        with torch.inference_mode():
            for start in range(0, len(rows), self.rows_per_pass):
                chunk = rows[start:start + self.rows_per_pass]
                cond = torch.tensor([r[0] for r in chunk])
                seq = torch.tensor([r[1] for r in chunk])
                with Session(loaded.geometry, head_scale=scales[cond].to(device)):
                    logits = loaded.model(input_ids=ids[seq].to(device), use_cache=False, logits_to_keep=n).logits
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets[seq].to(device),
                                                        reduction="none").mean(-1)
                losses[cond, seq] = nll.double().cpu()
        return TaskOutcome(values=[float(v) for v in losses.mean(1)],
                           details=[{"per_sequence": [round(float(x), 4) for x in row]} for row in losses])


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
    score_name, larger = _score_for(role)
    task = task or _TASKS[role].task
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
    """Validate (and store) every role that has a task and at least one labelled head, k = its head count."""
    results = []
    for role in registered_roles():
        try:
            _score_for(role)
        except HeadwiseError:
            continue
        if atlas.heads_with_role(role):
            results.append(validate_and_store(loaded, atlas, role, draws=draws, seed=seed))
    return results


_IN_CONTEXT = InContextLossTask()
register_task("retrieval", RetrievalTask())
register_task("induction", _IN_CONTEXT)
register_task("previous-token", _IN_CONTEXT)
from . import attribute as _attribute  # noqa: E402,F401  (registers the successor and attribution tasks)

__all__ = ["InContextLossTask", "RetrievalTask", "TaskOutcome", "ValidationTask", "format_validation",
           "greedy_replies", "register_task", "registered_roles", "validate", "validate_and_store",
           "validate_labelled_roles"]
