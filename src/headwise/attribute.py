"""`headwise attribute`: which heads a behaviour on the user's own data depends on.

The Ships/Sahara recipe (arXiv 2410.13708) generalised: a head's score is how much ablating it
alone changes the model's behaviour on a dataset. Ships scores safety heads on harmful prompts
by the KL divergence between the clean and the ablated model's next-token distribution; with
other data the same number finds task heads, select-and-copy heads, and so on.

Data: JSON Lines, one example a line: {"prompt": "...", "target": "..."} (target optional) or a
bare JSON string (a prompt). Metric:
- "kl" (prompts only): mean over examples of KL(clean || head zeroed) of the distribution of
  the token after the prompt;
- "loss" (every example has a target): mean increase of the target tokens' cross-entropy
  (teacher-forced after the prompt) when the head is zeroed.
Ablation zeroes the head's output (headwise's Session), exactly, many heads per forward pass
(headwise/ablation.py). Ships instead scales a head's attention scores; zeroing is the common
definition the other head scores here use. The result is an [L][H] score in the atlas under a
name the user gives.

Validation (`headwise validate`): `register_attribution` makes an attribution testable like a role
(its top-k heads zeroed against random heads, on the same data); `attribute_to_atlas` registers
the one it computes, and `register_atlas_attribution` one an atlas holds (`headwise validate --role
NAME` registers NAME's alone). An attribution never takes the name of a role with a validation task
of its own (previous-token, induction, ...), and its task refuses an atlas whose attribution of
that name was measured on other data.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import check_output_dir
from ._jsonl import json_lines
from ._schema import MAX_TEXT, one_line, validate_json
from .ablation import Readout, head_ablation_effects
from .atlas import Atlas, atlas_file, is_lone_file
from .errors import HeadwiseError
from .instrument import Session
from .load import LoadedModel
from .validate import TaskOutcome, ValidationTask, register_task, registered_task

METRICS = ("auto", "kl", "loss")
_NAME = re.compile(r"[A-Za-z0-9_.:-]+")


@dataclass(frozen=True)
class Example:
    prompt: str
    target: str | None = None


def load_examples(path: str | Path) -> list[Example]:
    """Read a JSONL file of prompts (and optional targets); one-line errors name the bad line."""
    path = Path(path)
    if not path.is_file():
        raise HeadwiseError(f"data file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise HeadwiseError(f"{path} is not UTF-8 text; pass a JSON Lines file") from None
    examples = []
    expected = 'one JSON object per line, e.g. {"prompt": "...", "target": "..."}'
    for number, item in json_lines(path, "\n".join(lines), expected):
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise HeadwiseError(f'{path} line {number} has no "prompt" string; write {{"prompt": "...", '
                                f'"target": "..."}} (target optional)')
        target = item.get("target")
        if target is not None and (not isinstance(target, str) or not target):
            raise HeadwiseError(f'{path} line {number}: "target" must be a non-empty string when given')
        examples.append(Example(item["prompt"], target))
    if not examples:
        raise HeadwiseError(f"{path} holds no examples")
    return examples


def _choose_metric(examples: list[Example], metric: str) -> str:
    if metric not in METRICS:
        raise HeadwiseError(f"unknown metric '{metric}'; choose from {', '.join(METRICS)}")
    with_target = sum(e.target is not None for e in examples)
    if metric == "auto":
        if 0 < with_target < len(examples):
            raise HeadwiseError(f"{with_target} of {len(examples)} examples have a target; give every example a "
                                f"target (metric loss) or none (metric kl), or pass --metric kl")
        return "loss" if with_target else "kl"
    if metric == "loss" and with_target < len(examples):
        raise HeadwiseError(f"metric loss needs a target on every example ({len(examples) - with_target} lack one)")
    return metric


def _encode(tokenizer: Any, example: Example, metric: str, chat: bool) -> tuple[list[int], int]:
    """(token ids, prompt length): the prompt as the tokenizer starts text, then the target."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise HeadwiseError("--chat was given but this tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": example.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False).input_ids
    else:
        prompt = tokenizer(example.prompt).input_ids
    if not prompt:
        raise HeadwiseError(f"prompt {example.prompt[:40]!r} tokenizes to nothing")
    target = tokenizer(example.target, add_special_tokens=False).input_ids if metric == "loss" else []
    if metric == "loss" and not target:
        raise HeadwiseError(f"target {example.target[:40]!r} tokenizes to nothing")
    return prompt + target, len(prompt)


def _readout(rows: list[tuple[list[int], int]], metric: str) -> tuple[torch.Tensor, Readout]:
    ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
    n, t = ids.shape
    if metric == "kl":
        return ids, Readout(torch.full((n, 1), t - 1), torch.ones(n, 1, dtype=torch.bool))
    span = max(t - p for _, p in rows)
    offsets = torch.arange(span)
    starts = torch.tensor([p - 1 for _, p in rows])
    positions = (starts[:, None] + offsets).clamp_max(t - 2)
    mask = offsets[None, :] < torch.tensor([t - p for _, p in rows])[:, None]
    labels = ids.gather(1, positions + 1)
    return ids, Readout(positions, mask, labels)


@dataclass
class Attribution:
    scores: np.ndarray  # [layers, heads], mean over examples
    per_example: np.ndarray  # [examples, layers, heads]
    settings: dict[str, Any]


def attribute(loaded: LoadedModel, examples: list[Example], metric: str = "auto", chat: bool = False,
              max_tokens: int = 16384) -> Attribution:
    """Rank every head by how much zeroing it alone changes the model's behaviour on `examples`."""
    metric = _choose_metric(examples, metric)
    loaded.require("text", "headwise attribute")
    encoded = [_encode(loaded.tokenizer, e, metric, chat) for e in examples]
    longest = max(len(ids) for ids, _ in encoded)
    loaded.geometry.check_context(longest)
    groups: dict[int, list[int]] = {}
    for i, (ids, _) in enumerate(encoded):  # equal lengths share forward passes, unpadded
        groups.setdefault(len(ids), []).append(i)
    # Split large groups so that a pass still holds a few heads' copies and the clean pass's
    # per-layer residuals (kept for replay) stay small.
    batches = [(length, members[i:i + max(1, max_tokens // (4 * length))])
               for length, members in sorted(groups.items())
               for i in range(0, len(members), max(1, max_tokens // (4 * length)))]
    g = loaded.geometry
    per_example = np.zeros((len(examples), g.n_layers, g.n_heads))
    for k, (length, members) in enumerate(batches):
        ids, readout = _readout([encoded[i] for i in members], metric)
        effects = head_ablation_effects(loaded.model, g, ids, readout, max_tokens=max_tokens,
                                        desc=f"attribute ({k + 1}/{len(batches)}: {len(members)} x {length} tokens)")
        per_example[members] = effects.numpy()
    settings = {"metric": metric, "examples": len(examples), "chat": chat, "max_tokens": max_tokens,
                "tokens": int(sum(len(ids) for ids, _ in encoded)), "ablation": "zero the head's output"}
    return Attribution(per_example.mean(0), per_example, settings)


def _data_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        why = e.strerror or e
        raise HeadwiseError(f"cannot read the data file {path} ({why}); put it back or pass another") from None


def attribute_to_atlas(loaded: LoadedModel, data: str | Path, name: str, atlas: str | Path | None = None,
                       metric: str = "auto", chat: bool = False, max_tokens: int = 16384) -> tuple[Atlas, Path]:
    """Attribute the behaviour on `data` and store it as score `name` in the atlas at `atlas`
    (added to an existing atlas of this model, or a new one). Returns (atlas, path written)."""
    from .scores import all_score_names

    if not _NAME.fullmatch(name or ""):
        raise HeadwiseError(f"attribution name {name!r} must be letters, digits, '_', '-', '.', ':' (e.g. safety)")
    if name in all_score_names():
        raise HeadwiseError(f"'{name}' is a built-in score name; choose another name for this attribution")
    _refuse_role_name(name)
    examples = load_examples(data)
    out = Path(atlas) if atlas is not None else Path(f"atlas-{Path(loaded.info.spec).stem}")
    existing = atlas_file(out)
    check_output_dir(existing.parent, what="the atlas")  # before the ablations, not after
    if existing.is_file():
        result_atlas = Atlas.load(existing)
        result_atlas.check_model(loaded.info, loaded.geometry)
        previous = result_atlas.data["scores"].get(name)
        if previous is not None and previous.get("family") != "attribute":
            raise HeadwiseError(f"the atlas already has a '{name}' score from {previous.get('family')}; choose "
                                f"another name")
    else:
        result_atlas = Atlas.new(loaded.info.to_dict(), loaded.geometry, {"scores": []})
    result = attribute(loaded, examples, metric=metric, chat=chat, max_tokens=max_tokens)
    settings = {**result.settings, "data": str(data), "data_sha256": _data_sha256(Path(data))}
    what = "KL(clean || ablated) of the next token" if result.settings["metric"] == "kl" else \
        "increase of the target tokens' loss"
    probe = f"attribute:{name}"
    result_atlas.set_probe(probe, settings)
    result_atlas.set_score(name, result.scores, family="attribute", probe=probe, settings=settings,
                           description=f"{what} when the head alone is zeroed, on {Path(data).name}")
    names = result_atlas.data["settings"].setdefault("scores", [])
    if isinstance(names, list) and name not in names:
        names.append(name)
    register_attribution(name, data, result.settings["metric"], chat)
    if is_lone_file(out):
        return result_atlas, result_atlas.save(out)
    from .report import write_unit

    # One unit: the directory's samples stay (they belong to its model and settings), its report is re-rendered.
    write_unit(existing.parent, result_atlas, what="the atlas")
    return result_atlas, existing


# ---- validation tasks (`headwise validate`) --------------------------------------------------
class AttributionTask(ValidationTask):
    """The behaviour an attribution measured, under multi-head ablations: mean KL(unablated ||
    ablated) of the next token after each prompt, or mean target loss. Lower is better (less change)."""

    name = "attribution"
    higher_is_better = False

    def __init__(self, data: str | Path, metric: str = "auto", chat: bool = False):
        self.data, self.chat = str(data), chat
        self.examples = load_examples(data)
        self.kind = _choose_metric(self.examples, metric)
        self.metric = ("next-token KL divergence from the unablated model" if self.kind == "kl"
                       else "target-token loss (nats)")

    def settings(self) -> dict[str, Any]:
        return {"data": self.data, "data_sha256": _data_sha256(Path(self.data)), "metric": self.kind,
                "chat": self.chat}

    def check_atlas(self, atlas: Atlas, role: str) -> None:
        """Refuse an atlas whose attribution `role` was measured on other data than this task runs on (a
        task registered for another atlas earlier in the process, or a data file changed since)."""
        entry = atlas.data["scores"].get(role, {})
        recorded = entry.get("settings", {}).get("data_sha256") if entry.get("family") == "attribute" else None
        if recorded is not None and recorded != _data_sha256(Path(self.data)):
            raise HeadwiseError(one_line(
                f"the '{role}' validation task runs on {self.data}, which is not the data the atlas's '{role}' "
                f"attribution was measured on (its sha256 differs); register the atlas's own task "
                f"(register_atlas_attribution(atlas, '{role}')), or re-run headwise attribute --name {role}"))

    def evaluate(self, loaded: Any, scales: torch.Tensor) -> TaskOutcome:
        g, device = loaded.geometry, loaded.device
        totals = torch.zeros(scales.shape[0], dtype=torch.float64)
        for example in self.examples:
            ids, prompt_len = _encode(loaded.tokenizer, example, self.kind, self.chat)
            keep = len(ids) - prompt_len + 1  # the positions that predict the target (or the next token)
            ids_t = torch.tensor([ids], device=device)
            with torch.inference_mode():
                clean = torch.log_softmax(loaded.model(input_ids=ids_t, use_cache=False, logits_to_keep=1)
                                          .logits[0, -1].float(), dim=-1)
                with Session(g, head_scale=scales.to(device)):
                    logits = loaded.model(input_ids=ids_t.expand(scales.shape[0], -1), use_cache=False,
                                          logits_to_keep=keep).logits
                logp = torch.log_softmax(logits.float(), dim=-1)
            if self.kind == "kl":
                totals += (clean.exp() * (clean - logp[:, -1])).sum(-1).double().cpu()
            else:
                targets = torch.tensor(ids[prompt_len:], device=device)
                steps = torch.arange(keep - 1, device=device)
                totals += (-logp[:, steps, targets]).mean(-1).double().cpu()
        return TaskOutcome(values=[float(v) for v in totals / len(self.examples)])


def _refuse_role_name(name: str) -> None:
    """An attribution may not take the name of a role with a validation task of its own (previous-token,
    induction, ...): it would swap that role's task for the rest of the process."""
    task = registered_task(name)
    if task is not None and not isinstance(task, AttributionTask):
        raise HeadwiseError(f"'{name}' is a role with a validation task of its own ({task.name}); choose another "
                            f"name for this attribution")


def register_attribution(name: str, data: str | Path, metric: str = "auto", chat: bool = False) -> None:
    """Let `validate(..., role=name)` test an attribution: zero its top-k heads vs random heads. It replaces
    an earlier attribution's task of that name, never a role's own task."""
    _refuse_role_name(name)
    register_task(name, AttributionTask(data, metric, chat), score=name, replace=True)


# What a validation task needs from an attribution's entry in the atlas: scores.NAME.settings.
_ENTRY_SETTINGS = {"type": "object", "required": ["data"],
                   "properties": {"data": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT},
                                  "metric": {"enum": list(METRICS)}, "chat": {"type": "boolean"}}}


def register_atlas_attribution(atlas: Atlas, name: str) -> bool:
    """Register the validation task of the attribution `name` stored in `atlas` (e.g. before `headwise
    validate --role NAME` in a new process), on the data file it names. False: the atlas holds no
    attribution of that name. A broken entry is refused in one line naming the atlas and the field."""
    entry = atlas.data["scores"].get(name)
    if entry is None or entry.get("family") != "attribute":
        return False
    source, fix = str(atlas.path or "the atlas"), f"re-run headwise attribute --name {name}"
    task = registered_task(name)
    if task is not None and not isinstance(task, AttributionTask):
        raise HeadwiseError(f"{source}: field scores.{name}.family is 'attribute', but '{name}' is a role with a "
                            f"validation task of its own ({task.name}); give the attribution another name "
                            f"(headwise attribute --name NEW)")
    settings = entry.get("settings")
    schema = {"properties": {"scores": {"properties": {name: {"properties": {"settings": _ENTRY_SETTINGS}}}}}}
    validate_json({"scores": {name: {"settings": settings}}}, schema, source=source, fix=fix)
    data = Path(settings["data"])
    if not data.is_file():
        raise HeadwiseError(one_line(f"{source}: field scores.{name}.settings.data names {data}, which is not a "
                                     f"file (the attribution is validated on its own data); put it back, or {fix}"))
    try:
        register_attribution(name, data, settings.get("metric", "auto"), settings.get("chat", False))
    except HeadwiseError as e:  # the data no longer reads as the examples the attribution used
        raise HeadwiseError(one_line(f"{source}: the data of attribution '{name}' (field scores.{name}.settings."
                                     f"data): {e}")) from None
    return True


def register_atlas_attributions(atlas: Atlas) -> list[str]:
    """Register the validation task of every attribution stored in `atlas` (register_atlas_attribution).
    Returns the names."""
    return [name for name in atlas.score_names if register_atlas_attribution(atlas, name)]


__all__ = ["METRICS", "Attribution", "AttributionTask", "Example", "attribute", "attribute_to_atlas", "load_examples",
           "register_atlas_attribution", "register_atlas_attributions", "register_attribution"]
