"""Pruning that buys speed: physically remove attention heads, then save a plain transformers model.

What is removed, per pruned query head h of a layer: its rows of the query projection (q_proj
weight and bias) and its input columns of the output projection (o_proj; the output bias stays,
since it is added whatever the heads say). A KV head goes too (its k_proj and v_proj rows) once
every query head reading it is gone. The config is rewritten (num_attention_heads,
num_key_value_heads, head_dim made explicit) so that plain transformers builds exactly the new
shapes: the saved directory loads with AutoModelForCausalLM.from_pretrained, without headwise.

Why the same number of heads in every layer: transformers architectures hold one
num_attention_heads (and one num_key_value_heads) for all layers, so a pruned model has the same
head count everywhere, as AMP (arXiv 2504.21174) prunes it. Why whole KV groups: query head h
reads KV head h // group_size with group_size = num_heads // num_kv_heads, one number for the
model, so with several KV heads each kept group must keep all its query heads. The pruning unit
is therefore a KV group (all its query heads and the KV head) for GQA, a single head for MHA
(a group of one), and a single query head for MQA (one KV head: it stays, its group shrinks).
Pruning the unpruned model's heads this way equals zeroing them before the output projection
(headwise.ablation_scale), to float rounding.

Refused, in one line: a head count that differs between layers, a part of a KV group, every
unit of a layer, no head at all, a head count the architecture's config refuses (Llama's and
Gemma3's configs require the hidden size to be a multiple of the head count, although their
attention runs with any head_dim: a 4-head Gemma3 of hidden size 640 prunes to 2 or 1 heads, not 3),
an image model, attention without separate q_proj / k_proj / v_proj (GPT-2's fused c_attn:
transformers' GPT2Attention fixes head_dim = n_embd / n_head, so a GPT-2 with fewer heads cannot
be rebuilt), and, in select_heads, a fraction outside (0, 1) or one that removes no unit or every
unit of a layer, an unknown score, NaN scores, and an atlas of another model.

Which fractions a model can prune: whole units, the same number in every layer, so with u units per
layer only 1/u, 2/u, ..., (u-1)/u, and of those only the head counts the config accepts
(representable_fractions). smollm2-135m (9 query heads on 3 KV heads: 3 units) can prune 1/3 or 2/3
of its heads, never 10% or 20%; gemma3-270m (4 heads on 1 KV head, hidden size 640) 1/2 or 3/4 (3
heads left is refused by its config). select_heads rounds a fraction to the nearest whole number of
units (0.2 and 0.3 of smollm2 both prune 1/3) and refuses, naming the nearest representable fractions,
one that rounds to none or to all, or (given the model's config) to a head count the config refuses.

Evaluated side by side with the unpruned model by headwise.compare (`headwise compare`).
Not here: recovery fine-tuning.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import check_output_dir, deferred_interrupt
from .atlas import Atlas, versions
from .errors import HeadwiseError
from .geometry import Geometry
from .load import LoadedModel, ModelInfo, _quiet_transformers
from .parts import attention_modules, output_projection

PROVENANCE_FILE = "headwise-pruned.json"
SCHEMA = "headwise.pruned/1"
RANDOM = "random"
_QKV = ("q_proj", "k_proj", "v_proj")


# ---- the unit of pruning ----------------------------------------------------------------------------
def pruning_units(geometry: Geometry) -> list[list[int]]:
    """The query heads of each pruning unit of a layer (the same in every layer): a KV group when the
    model has several KV heads (for MHA a group of one head), a single query head for MQA."""
    if geometry.n_kv_heads == 1:
        return [[h] for h in range(geometry.n_heads)]
    g = geometry.group_size
    return [list(range(k * g, (k + 1) * g)) for k in range(geometry.n_kv_heads)]


def _per_layer(geometry: Geometry, heads: Mapping[int, Sequence[int]] | Sequence[tuple[int, int]]) -> list[list[int]]:
    """{layer: [head, ...]} or [(layer, head), ...] as each layer's sorted heads, checked for range."""
    pairs = [(layer, h) for layer, hs in heads.items() for h in hs] if isinstance(heads, Mapping) else list(heads)
    removed: list[set[int]] = [set() for _ in range(geometry.n_layers)]
    for pair in pairs:
        try:
            layer, head = (int(x) for x in pair)
        except (TypeError, ValueError):
            raise HeadwiseError(f"a head to prune is a (layer, head) pair of integers, not {pair!r}") from None
        if not (0 <= layer < geometry.n_layers and 0 <= head < geometry.n_heads):
            raise HeadwiseError(f"head ({layer}, {head}) is outside this model's {geometry.n_layers} layers x "
                                f"{geometry.n_heads} heads")
        removed[layer].add(head)
    return [sorted(r) for r in removed]


def check_heads(geometry: Geometry, heads: Mapping[int, Sequence[int]] | Sequence[tuple[int, int]]) -> list[list[int]]:
    """Each layer's query heads to remove, refused in one line unless they are whole pruning units,
    the same number in every layer, at least one unit and not every unit of a layer."""
    if geometry.modality != "text":
        raise HeadwiseError("pruning supports language models only (the pruned model is saved as a causal LM)")
    removed = _per_layer(geometry, heads)
    counts = sorted({len(r) for r in removed})
    if counts == [0]:
        raise HeadwiseError("no heads to prune were given")
    if len(counts) > 1:
        raise HeadwiseError(f"prune the same number of heads in every layer (transformers models have one "
                            f"num_attention_heads); got {', '.join(str(len(r)) for r in removed)} per layer")
    if counts[0] >= geometry.n_heads:
        raise HeadwiseError(f"cannot prune all {geometry.n_heads} heads of a layer; keep at least one unit")
    if geometry.n_kv_heads > 1:
        g = geometry.group_size
        for layer, hs in enumerate(removed):
            for k in {h // g for h in hs}:
                group = set(range(k * g, (k + 1) * g))
                if not group <= set(hs):
                    raise HeadwiseError(f"layer {layer}: heads {sorted(set(hs) & group)} are part of KV group {k} "
                                        f"(heads {min(group)}-{max(group)}); prune whole KV groups (every layer "
                                        f"keeps num_heads // num_kv_heads = {g} query heads per KV head)")
    return removed


# ---- which fractions a model can prune -----------------------------------------------------------------
def _config_accepts(config: Any, n_heads: int, n_kv_heads: int, head_dim: int) -> bool:
    """Whether the model's config validates with this head count (as prune_heads rewrites it)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    trial = copy.deepcopy(text)
    trial.num_attention_heads, trial.num_key_value_heads, trial.head_dim = n_heads, n_kv_heads, head_dim
    validate = getattr(trial, "validate", None)
    try:
        if callable(validate):
            validate()
    except Exception:  # transformers wraps its validators' ValueError in its own error type
        return False
    return True


def representable_fractions(geometry: Geometry, config: Any = None) -> list[tuple[int, int]]:
    """The (k, units) pairs a pruned model can have, k/units of each layer's pruning units removed: 1..units-1
    whole units (the same in every layer), and with `config` (the model's) only head counts it accepts."""
    units = pruning_units(geometry)
    out = []
    for k in range(1, len(units)):
        n_heads = geometry.n_heads - k * len(units[0])
        n_kv = geometry.n_kv_heads - (k if geometry.n_kv_heads > 1 else 0)
        if config is None or _config_accepts(config, n_heads, n_kv, geometry.head_dim):
            out.append((k, len(units)))
    return out


def describe_fractions(pairs: list[tuple[int, int]]) -> str:
    """'1/3 (0.333) or 2/3 (0.667)': the representable fractions, for messages."""
    names = [f"{k}/{u} ({k / u:.3g})" for k, u in pairs]
    return "none" if not names else names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _nearest(fraction: float, pairs: list[tuple[int, int]], limit: int = 4) -> list[tuple[int, int]]:
    """The representable fractions closest to `fraction` (all of them when there are few), in order."""
    return sorted(sorted(pairs, key=lambda p: abs(p[0] / p[1] - fraction))[:limit])


# ---- choosing heads from an atlas ----------------------------------------------------------------------
def select_heads(atlas: Atlas, geometry: Geometry, score: str, fraction: float, largest_is_important: bool = True,
                 seed: int | None = None, info: ModelInfo | None = None, config: Any = None,
                 protect: Sequence[str] = ()) -> list[tuple[int, int]]:
    """The (layer, head) query heads to prune: in every layer, the round(fraction x units) pruning units
    (pruning_units: KV groups for GQA, heads for MHA and MQA) of lowest importance, a unit's importance
    being the sum of its query heads' scores (rounded half up; ties go to the lower unit index).

    score="random": units drawn uniformly per layer with `seed` (0 when None), the control.
    `info`: the model's provenance; with it the atlas must be of these very weights
    (Atlas.check_model), without it of this geometry. `config` (the model's): a fraction whose head
    count it refuses is refused here, naming the fractions it accepts (see representable_fractions).
    `protect`: role labels (e.g. "induction", "retrieval") whose units go last: in each layer, a unit
    holding a head the atlas labels with one of them is pruned only when the unprotected units are not
    enough. Importance measured on prose rates the in-context heads low, and pruning them loses
    in-context learning (bench/RESULTS.md, "Head pruning").
    """
    if info is not None:
        atlas.check_model(info, geometry)
    elif atlas.geometry != geometry:
        raise HeadwiseError("the atlas was made for another model geometry; profile this model first")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction) \
            or not 0 < fraction < 1:
        raise HeadwiseError(f"the fraction to prune must be a number between 0 and 1 (exclusive); got {fraction!r}")
    units = pruning_units(geometry)
    k = math.floor(fraction * len(units) + 0.5)
    what = "KV groups" if len(units[0]) > 1 else "heads"
    possible = representable_fractions(geometry, config)
    can = (f"this model can prune {describe_fractions(_nearest(fraction, possible))} of each layer's {len(units)} "
           f"{what}" + (" (whole units, the same number in every layer" + (", head counts its config accepts)"
                                                                           if config is not None else ")")))
    if k == 0:
        raise HeadwiseError(f"fraction {fraction} prunes none of the {len(units)} {what} per layer (it rounds to 0); "
                            f"{can}")
    if k >= len(units):
        raise HeadwiseError(f"fraction {fraction} prunes every one of the {len(units)} {what} per layer (it rounds "
                            f"to {k}); {can}")
    if (k, len(units)) not in possible:
        raise HeadwiseError(f"fraction {fraction} rounds to {k} of {len(units)} {what} per layer "
                            f"({geometry.n_heads - k * len(units[0])} heads left), which transformers' config of "
                            f"this model refuses; {can}")
    kept = np.zeros((geometry.n_layers, len(units)), dtype=bool)  # [layers, units]: holds a protected head
    known = {r.get("role") for r in atlas.data.get("roles", {}).get("rules", [])}
    for role in protect:
        if role not in known:
            raise HeadwiseError(f"this atlas has no role '{role}' to protect (it has: {', '.join(sorted(known))})")
        for layer, head in atlas.heads_with_role(role):
            kept[layer, [u for u, unit in enumerate(units) if head in unit]] = True
    if score == RANDOM:
        rng = np.random.default_rng(0 if seed is None else seed)
        draws = [rng.permutation(len(units)) for _ in range(geometry.n_layers)]
        chosen = [sorted(sorted(d, key=lambda u, lay=layer: kept[lay, u])[:k]) for layer, d in enumerate(draws)]
    else:
        if score not in atlas.score_names:
            raise HeadwiseError(f"this atlas has no score '{score}' (it has: {', '.join(atlas.score_names) or 'none'}"
                                f"; or '{RANDOM}'); run headwise profile --scores {score}")
        values = atlas.score(score)
        if np.isnan(values).any():
            layer, head = (int(x) for x in np.argwhere(np.isnan(values))[0])
            raise HeadwiseError(f"score '{score}' is NaN for head ({layer}, {head}); heads cannot be ranked by it, "
                                f"choose another score or re-profile")
        importance = np.stack([values[:, unit].sum(axis=1) for unit in units], axis=1)  # [layers, units]
        if not largest_is_important:
            importance = -importance
        chosen = [sorted(np.lexsort((row, kept[layer]))[:k].tolist()) for layer, row in enumerate(importance)]
    return [(layer, h) for layer, row in enumerate(chosen) for u in row for h in units[u]]


# ---- removing them -------------------------------------------------------------------------------------
def _projections(attention: torch.nn.Module) -> tuple[torch.nn.Linear, ...]:
    name = type(attention).__name__
    if not all(isinstance(getattr(attention, n, None), torch.nn.Module) for n in _QKV):
        if isinstance(getattr(attention, "c_attn", None), torch.nn.Module):
            raise HeadwiseError(f"{name} fuses q, k and v in c_attn and transformers' GPT-2-style attention fixes "
                                f"head_dim = hidden size / heads, so a model with fewer heads cannot be rebuilt; "
                                f"pruning supports Llama, Qwen2/3, Gemma3 and other q_proj/k_proj/v_proj models")
        raise HeadwiseError(f"{name} has no {'/'.join(_QKV)} projections, which pruning slices; this architecture "
                            f"is not supported")
    layers = tuple(getattr(attention, n) for n in _QKV) + (output_projection(attention),)
    for n, proj in zip((*_QKV, "output projection"), layers):
        if not isinstance(proj, torch.nn.Linear):
            raise HeadwiseError(f"{name}'s {n} is a {type(proj).__name__}, not a Linear layer; pruning cannot "
                                f"slice it")
    return layers


def _rows(width: int, keep: list[int]) -> torch.Tensor:
    return torch.tensor([h * width + i for h in keep for i in range(width)], dtype=torch.long)


def prune_heads(loaded: LoadedModel, heads: Mapping[int, Sequence[int]] | Sequence[tuple[int, int]]) -> Any:
    """A new model of the same class without the given query heads ({layer: [head, ...]} or
    [(layer, head), ...]), as described in this module's docstring; `loaded` is left unchanged.

    The same number of heads in every layer, in whole KV groups when the model has several KV heads
    (see check_heads). The result is a plain transformers model (SDPA attention); to profile it,
    hand it to headwise.from_model. It is built beside the original, so memory holds both for a moment.
    """
    g = loaded.geometry
    removed = check_heads(g, heads)
    model = loaded.model
    names = {id(m): n for n, m in model.named_modules()}
    state = dict(model.state_dict())  # the sliced projections replaced below; load_state_dict copies
    n_keep = g.n_heads - len(removed[0])
    n_kv_keep = None
    for layer, attention in enumerate(attention_modules(model, g)):
        q, k, v, o = _projections(attention)
        if q.out_features != g.n_heads * g.head_dim or o.in_features != g.n_heads * g.head_dim \
                or k.out_features != g.n_kv_heads * g.head_dim or v.out_features != g.n_kv_heads * g.head_dim:
            raise HeadwiseError(f"layer {layer}'s projections do not have the shapes of {g.n_heads} query and "
                                f"{g.n_kv_heads} KV heads of {g.head_dim} dims; this architecture is not supported")
        keep = [h for h in range(g.n_heads) if h not in removed[layer]]
        keep_kv = sorted({h // g.group_size for h in keep})
        if n_kv_keep is not None and len(keep_kv) != n_kv_keep:  # check_heads makes this impossible
            raise HeadwiseError("the pruned layers would have different numbers of KV heads")
        n_kv_keep = len(keep_kv)
        q_rows, kv_rows = _rows(g.head_dim, keep), _rows(g.head_dim, keep_kv)
        for proj, rows in ((q, q_rows), (k, kv_rows), (v, kv_rows)):
            state[f"{names[id(proj)]}.weight"] = proj.weight.detach()[rows].clone()
            if proj.bias is not None:
                state[f"{names[id(proj)]}.bias"] = proj.bias.detach()[rows].clone()
        state[f"{names[id(o)]}.weight"] = o.weight.detach()[:, q_rows].clone()

    config = copy.deepcopy(model.config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text.num_attention_heads = n_keep
    text.num_key_value_heads = n_kv_keep
    text.head_dim = g.head_dim  # explicit: the default (hidden / heads) would change with the head count
    _check_config(config, n_keep)
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    from transformers.initialization import no_init_weights

    try:
        with no_init_weights():
            pruned = type(model)(config)
        pruned.to(dtype=dtype, device=device)
        pruned.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as e:
        raise HeadwiseError(f"transformers could not rebuild {type(model).__name__} with {n_keep} heads "
                            f"({str(e).splitlines()[0][:200]}); this architecture is not supported") from None
    pruned.tie_weights()
    try:
        pruned.set_attn_implementation("sdpa")
    except Exception:  # an architecture without SDPA: transformers' own eager attention
        pruned.set_attn_implementation("eager")
    return pruned.eval()


def _check_config(config: Any, n_keep: int) -> None:
    """The config's own checks, which saving and loading run (Llama's and Gemma3's, for one, want the hidden
    size to be a multiple of the head count, although their attention runs with any explicit head_dim)."""
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return
    try:
        validate()
    except Exception as e:  # transformers wraps the validator's ValueError in its own error type
        cause = str(e.__cause__ or e).strip().splitlines()[0][:200]
        raise HeadwiseError(f"transformers' {type(config).__name__} refuses a model with {n_keep} heads per layer "
                            f"({cause}); prune a number of heads it accepts (see prune.representable_fractions)") \
            from None


# ---- saving -------------------------------------------------------------------------------------------
def provenance(loaded: LoadedModel, heads: Mapping[int, Sequence[int]] | Sequence[tuple[int, int]], *,
               score: str, fraction: float | None, seed: int | None, atlas: Atlas | None = None,
               protect: Sequence[str] = ()) -> dict[str, Any]:
    """What headwise-pruned.json records: the source model, how the heads were chosen, which went, and the
    atlas's model, scores and settings (its probes: headwise.compare keeps its held-out text apart from them)."""
    removed = check_heads(loaded.geometry, heads)
    g = loaded.geometry
    n_removed = len(removed[0])
    return {"schema": SCHEMA, "source_model": loaded.info.to_dict(), "source_geometry": g.to_dict(),
            "score": score, "fraction": fraction, "seed": seed, "protected_roles": list(protect),
            "removed_heads": {str(layer): hs for layer, hs in enumerate(removed)},
            "heads_per_layer": {"before": g.n_heads, "after": g.n_heads - n_removed},
            "atlas": None if atlas is None else {"model": atlas.model, "scores": atlas.score_names,
                                                 "settings": atlas.data["settings"]},
            "versions": versions()}


def check_pruned_output(out_dir: str | Path) -> Path:
    """Refuse, before any work, an output directory that cannot be written or holds something other than
    a pruned model headwise wrote (which a new one replaces whole)."""
    out = check_output_dir(out_dir, what="the pruned model")
    if any(out.iterdir()) and not (out / PROVENANCE_FILE).is_file():
        raise HeadwiseError(f"{out} already holds files that are not a pruned model headwise wrote; choose an "
                            f"empty or new directory")
    return out


def save_pruned(model: Any, tokenizer: Any, out_dir: str | Path, provenance: Mapping[str, Any]) -> Path:
    """Write a standard Hugging Face directory (safetensors, config, tokenizer) plus headwise-pruned.json,
    whole: built in a temporary directory beside `out_dir`, then renamed into place (an older pruned
    model there is replaced; any other content is refused)."""
    out = check_pruned_output(out_dir)
    record = {"schema": SCHEMA, **dict(provenance)}
    record.setdefault("versions", versions())
    record["parameters"] = sum(p.numel() for p in model.parameters())
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.pruning-", dir=out.parent))
    old = None
    try:
        with _quiet_transformers():  # no "Writing model shards" bar on stderr: the command prints its own lines
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        with deferred_interrupt():
            if any(out.iterdir()):
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                os.replace(out, old)
            else:
                out.rmdir()
            try:
                os.replace(tmp, out)
            except BaseException:  # a failed rename, or a crash simulated there: put the older pruned model back
                if old is not None:
                    os.replace(old, out)
                    old = None
                raise
    except OSError as e:
        raise HeadwiseError(f"could not write the pruned model to {out}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


__all__ = ["PROVENANCE_FILE", "RANDOM", "check_heads", "check_pruned_output", "describe_fractions", "prune_heads",
           "provenance", "pruning_units", "representable_fractions", "save_pruned", "select_heads"]
