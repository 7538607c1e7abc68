"""A steering on disk: DIR/steering.safetensors (its tensors) + DIR/steering.json (what it is and
what made it), written as one unit. Loading refuses, in one line, a steering made for another model,
an unknown method, and a file that is not what headwise wrote. Nothing is unpickled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._io import staged_outputs, verify_unit
from .._schema import load_json_file
from ..errors import HeadwiseError
from ..geometry import Geometry
from .base import Steering, method_class

SCHEMA = "headwise.steering/1"
TENSORS_FILE = "steering.safetensors"
RECORD_FILE = "steering.json"


def save_steering(steering: Steering, path: str | Path, model: dict[str, Any],
                  task: dict[str, Any] | None = None) -> Path:
    """Write `steering` to directory `path`; model: the ModelInfo dict of the model it was fitted on;
    task: what it was fitted on (name, digest, sizes). Returns the directory."""
    from safetensors.torch import save

    from ..atlas import versions

    tensors = {name: t.detach().float().contiguous().cpu() for name, t in steering.tensors().items()}
    record = {"schema": SCHEMA, "method": steering.method, "strength": steering.strength,
              "heads": [list(h) for h in steering.heads], "settings": steering.settings,
              "trained_parameters": steering.trained_parameters(), "model": dict(model),
              "geometry": steering.geometry.to_dict(), "task": task, "versions": versions()}
    import json

    try:
        text = json.dumps(record, indent=1, sort_keys=True, allow_nan=False) + "\n"
    except ValueError:
        raise HeadwiseError(f"the {steering.method} steering holds a non-finite setting; it cannot be saved") from None
    with staged_outputs(path, what="a steering") as stage:
        stage.write_bytes(TENSORS_FILE, save(tensors))
        stage.write_text(RECORD_FILE, text)
    return Path(path)


def read_record(path: str | Path) -> dict[str, Any]:
    """The steering.json of directory `path`, checked for the fields loading needs."""
    directory = Path(path)
    if directory.is_file() and directory.name in (RECORD_FILE, TENSORS_FILE):
        directory = directory.parent
    fix = "pass a directory written by headwise steer"
    if not directory.is_dir():
        raise HeadwiseError(f"steering {directory} is not a directory; {fix}")
    record = load_json_file(directory / RECORD_FILE, what="a headwise steering", fix=fix, max_bytes=16 * 2**20)
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise HeadwiseError(f"{directory / RECORD_FILE} is not a headwise steering ({SCHEMA}); {fix}")
    need = {"method": str, "strength": (int, float), "heads": list, "settings": dict, "model": dict, "geometry": dict}
    for key, kind in need.items():
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            raise HeadwiseError(f"{directory / RECORD_FILE} has no valid '{key}'; {fix}")
    if not all(isinstance(h, list) and len(h) == 2 and all(type(x) is int for x in h) for h in record["heads"]):
        raise HeadwiseError(f"{directory / RECORD_FILE} lists heads that are not [layer, head] pairs; {fix}")
    record["directory"] = str(directory)
    return record


def load_steering(path: str | Path, loaded: Any, strength: float | None = None) -> Steering:
    """Load a saved steering for `loaded` (refused for another model); strength overrides the saved one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    record = read_record(path)
    directory = Path(record["directory"])
    cls = method_class(record["method"])
    made_for = record["model"].get("weights_sha256")
    if made_for != loaded.info.weights_sha256:
        raise HeadwiseError(f"steering {directory} was fitted on model '{record['model'].get('spec')}' (weights "
                            f"{str(made_for)[:12]}), not '{loaded.info.spec}' (weights "
                            f"{loaded.info.weights_sha256[:12]}); fit a steering for this model with headwise steer")
    try:
        geometry = Geometry.from_dict(record["geometry"])
    except HeadwiseError:
        raise HeadwiseError(f"{directory / RECORD_FILE} holds no valid geometry; re-run headwise steer") from None
    if geometry != loaded.geometry:
        raise HeadwiseError(f"steering {directory} was fitted on a model of another shape ({geometry.n_layers} x "
                            f"{geometry.n_heads} heads, not {loaded.geometry.n_layers} x {loaded.geometry.n_heads}); "
                            f"fit a steering for this model with headwise steer")
    verify_unit(directory, [TENSORS_FILE, RECORD_FILE])
    try:
        tensors = load_file(str(directory / TENSORS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise HeadwiseError(f"cannot read {directory / TENSORS_FILE} ({str(e).splitlines()[0][:120]}); re-run "
                            f"headwise steer") from None
    value = record["strength"] if strength is None else strength
    return cls.from_saved(loaded.geometry, [tuple(h) for h in record["heads"]], tensors, record["settings"],
                          strength=float(value))


__all__ = ["RECORD_FILE", "SCHEMA", "TENSORS_FILE", "load_steering", "read_record", "save_steering"]
