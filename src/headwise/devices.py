"""Models split over several devices: the device_map check before loading, and where each part computes.

headwise.load hands a device_map ("auto", or {module name: device}) to transformers' from_pretrained,
which hands it to accelerate: each listed module's weights sit on its device ("cpu", "cuda:N") or stay
in the safetensors files ("disk"), and accelerate's hooks bring a module's weights and inputs to its
execution device when it runs (offloaded modules run on the main device: the map's first GPU, else the
CPU). Between calls an offloaded weight is a "meta" tensor, so headwise asks `execution_device` where
a module computes instead of reading its parameters' device.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch

from .errors import HeadwiseError

DEVICES = "'cpu', 'cuda:N' or 'disk'"


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes, and where a whole model's inputs go: the device accelerate's hook moves
    its inputs to (a model loaded with a device_map), else the device of its parameters."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook or one hook
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _device(key: str, value: Any) -> str:
    """The map's device for `key` as accelerate reads it, checked to exist on this machine."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"cuda:{value}"
    if not isinstance(value, (str, torch.device)):
        raise HeadwiseError(f"device_map gives {key!r} the device {value!r}; use {DEVICES}")
    name = str(value)
    if name == "disk":
        return name
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HeadwiseError(f"device_map puts {key!r} on {name!r}, which is not a device; use {DEVICES}") from None
    if device.type == "meta":
        raise HeadwiseError(f"device_map puts {key!r} on 'meta', which holds no weights; use {DEVICES}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= count:
            have = "no CUDA device" if count == 0 else f"{count} CUDA device{'s' * (count > 1)} (cuda:0..{count - 1})"
            raise HeadwiseError(f"device_map puts {key!r} on {name}, but this machine has {have}; put it on a device "
                                f"it has ('cpu' or 'disk' without a GPU)")
        return f"cuda:{index}"
    if device.type == "mps" and torch.backends.mps.is_available():
        return "mps"
    if device.type != "cpu":
        raise HeadwiseError(f"device_map puts {key!r} on {name}, which headwise does not place layers on; use "
                            f"{DEVICES}")
    return "cpu"


def _tensor_owners(skeleton: torch.nn.Module) -> list[str]:
    """Every tensor a checkpoint stores for this model (tied ones under each name), as accelerate checks them."""
    return list(skeleton.state_dict())


def _uncovered_modules(names: list[str], covered: set[str]) -> list[str]:
    """The outermost modules none of whose stored tensors the map covers (reported instead of each tensor)."""
    touched = {".".join(n.split(".")[:depth]) for n in covered for depth in range(1, n.count(".") + 2)}
    out: list[str] = []
    for name in names:
        if name in covered:
            continue
        parts = name.split(".")
        prefix = next(p for p in (".".join(parts[:d]) for d in range(1, len(parts) + 1)) if p not in touched)
        if prefix not in out:
            out.append(prefix)
    return out


def check_device_map(device_map: Any, skeleton: torch.nn.Module) -> str | dict[str, str]:
    """The map as accelerate will read it, or a one-line HeadwiseError saying what is wrong.

    `skeleton`: the model built on the meta device (its module names and stored tensors, no weights).
    """
    if isinstance(device_map, str):
        if device_map != "auto":
            raise HeadwiseError(f"device_map {device_map!r} is not understood; pass 'auto' or a dict "
                                f"{{module name: device}} such as {{'model.layers.0': 'cpu', ...}}")
        return device_map
    if not isinstance(device_map, dict) or not device_map:
        raise HeadwiseError(f"device_map must be 'auto' or a non-empty dict {{module name: device}}; got "
                            f"{type(device_map).__name__} {str(device_map)[:80]}")
    modules = dict(skeleton.named_modules())
    checked: dict[str, str] = {}
    for key, value in device_map.items():
        if not isinstance(key, str) or key not in modules:
            near = difflib.get_close_matches(str(key), list(modules), n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"module names look like {list(modules)[1:4]}"
            raise HeadwiseError(f"device_map names {key!r}, which {type(skeleton).__name__} does not have; {hint} "
                                f"(see model.named_modules())")
        checked[key] = _device(key, value)
    keys = sorted(checked)
    for a in keys:
        for b in keys:
            if a != b and (a == "" or b.startswith(a + ".")):
                raise HeadwiseError(f"device_map gives both {a!r} and {b!r}, which is inside it, a device; give "
                                    f"each module one entry")
    names = _tensor_owners(skeleton)
    covered = {n for n in names for k in keys if k == "" or n == k or n.startswith(k + ".")}
    left = _uncovered_modules(names, covered)
    if left:
        shown = ", ".join(left[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
        raise HeadwiseError(f"device_map leaves {shown} on no device; add {'it' if len(left) == 1 else 'each'} to "
                            f"the map (e.g. {left[0]!r}: 'cpu') or pass device_map='auto'")
    _check_tied(skeleton, checked)
    return checked


def _check_tied(skeleton: torch.nn.Module, checked: dict[str, str]) -> None:
    """Tied weights (a shared embedding and unembedding) are stored once: their modules need one device."""
    def owner(name: str) -> str:
        return max((k for k in checked if k == "" or name == k or name.startswith(k + ".")), key=len)

    names: dict[int, list[str]] = {}
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for tied in names.values():
        keys = list(dict.fromkeys(owner(n) for n in tied))
        if len({checked[k] for k in keys}) > 1:
            where = " and ".join(f"{k!r} ({checked[k]})" for k in keys)
            raise HeadwiseError(f"device_map puts {where}, which share tied weights ({', '.join(tied)}), on different "
                                f"devices; give them one device")


def placed_map(model: torch.nn.Module) -> dict[str, str]:
    """Where transformers put each part: its hf_device_map, or one entry for a model on one device."""
    found = getattr(model, "hf_device_map", None)
    if found:
        return {k: f"cuda:{v}" if isinstance(v, int) and not isinstance(v, bool) else str(v) for k, v in found.items()}
    return {"": str(execution_device(model))}


__all__ = ["check_device_map", "execution_device", "placed_map"]
