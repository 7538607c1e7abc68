"""DuoAttention gates written in DuoAttention's own pattern format, for tools that read it.

mit-han-lab/duo-attention saves a trained pattern as a directory (duo_attn/utils.py):
- `full_attention_heads.tsv`: `np.savetxt(path, gates, delimiter="\\t")`, one row per layer and one
  column per KV head, each gate in [0, 1] (1: the head keeps the full cache);
- `config.json`: its training arguments, of which `load_attn_pattern` reads `sink_size` and
  `recent_size` (the streaming heads' sink and recent window).
`load_attn_pattern` reads them back with `np.loadtxt(..., delimiter="\\t")` clipped to [0, 1];
kvpress's DuoAttentionPress parses the same two files the same way. headwise writes exactly
these two files, plus `headwise-provenance.json` beside them (model hash, atlas, settings,
versions), which neither reader looks at.

The gates come from an atlas's `duo` score (scores/duo.py), which is per KV head and repeated
on each head's query heads: `kv_max` gives it back per KV head. Layers the model windows itself
(Gemma3's sliding layers) have no gate (NaN in the atlas); they are written as 1.0, "keep what
the layer keeps", since a DuoAttention reader would otherwise make them streaming heads.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import HeadwiseError

if TYPE_CHECKING:
    import numpy as np

TSV = "full_attention_heads.tsv"
CONFIG = "config.json"
PROVENANCE = "headwise-provenance.json"
# The names DuoAttention's train.py gives the settings headwise's duo score shares with it.
_DUO_ARG_NAMES = {"lr": "lr", "reg": "reg_weight", "steps": "num_steps", "passkeys": "num_passkeys",
                  "passkey_words": "passkey_length"}


def export_duo_pattern(gates: np.ndarray, out_dir: str | Path, *, sink: int, recent: int,
                       source: dict[str, Any]) -> Path:
    """Write `gates` [layers, kv_heads] as a DuoAttention pattern directory `out_dir`; return it.

    `source` is what produced the gates (model hash, atlas, settings); it goes into the provenance
    file, and its "duoattention_config" entry (DuoAttention's own argument names) into config.json.
    """
    import numpy as np

    from .._io import output_location, staged_outputs
    from ..atlas import versions

    gates = np.asarray(gates, dtype=float)
    if gates.ndim != 2 or gates.size == 0:
        raise HeadwiseError(f"DuoAttention gates are a [layers, kv_heads] matrix, got shape {gates.shape}")
    if not np.isfinite(gates).all() or gates.min() < 0 or gates.max() > 1:
        raise HeadwiseError("DuoAttention gates must be finite numbers in [0, 1]; give windowed layers 1.0")
    for name, value, least in (("sink", sink, 0), ("recent", recent, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise HeadwiseError(f"--{name} must be an integer of at least {least}, got {value!r}")
    out = Path(out_dir)
    text = io.StringIO()
    # DuoAttention's save_full_attention_heads itself; its default format (%.18e) round-trips a float64.
    np.savetxt(text, gates, delimiter="\t")
    config = {**source.get("duoattention_config", {}), "sink_size": sink, "recent_size": recent,
              "deploy_sink_size": None, "deploy_recent_size": None}
    files = {TSV: text.getvalue(), CONFIG: json.dumps(config, indent=1) + "\n"}
    provenance = {
        "kind": "headwise DuoAttention pattern export",
        "format": "mit-han-lab/duo-attention duo_attn/utils.py load_attn_pattern: full_attention_heads.tsv "
                  "(np.loadtxt, tab-separated, layers x KV heads, clipped to [0, 1]) + config.json "
                  "(sink_size, recent_size); kvpress DuoAttentionPress reads the same two files",
        "shape": list(gates.shape), "sink_size": sink, "recent_size": recent,
        "files_sha256": {name: hashlib.sha256(body.encode()).hexdigest() for name, body in files.items()},
        "source": source, "versions": versions(),
    }
    files[PROVENANCE] = json.dumps(provenance, indent=1) + "\n"
    # The three files as one unit: an interrupted export leaves the old pattern or the new, never a mix.
    with output_location(out, what="the DuoAttention pattern"), staged_outputs(out, what="the DuoAttention pattern") \
            as stage:
        for name, body in files.items():
            stage.write_text(name, body)
        stage.keep_others()
    return out


def export_from_atlas(atlas_path: str | Path, out_dir: str | Path, *, sink: int | None = None,
                      recent: int | None = None) -> Path:
    """The `duo` gates of an atlas as a DuoAttention pattern. sink/recent default to what the gates
    were trained with (the score's recorded settings)."""
    import numpy as np

    from ..atlas import Atlas

    atlas = Atlas.load(atlas_path)
    if "duo" not in atlas.score_names:
        raise HeadwiseError(f"{atlas.path} has no DuoAttention score 'duo'; run `headwise profile --scores duo` "
                            f"to train the gates first")
    gates = atlas.score("duo", "kv_max")
    windowed = [i for i, is_windowed in enumerate(atlas.geometry.windowed) if is_windowed]
    gates[windowed] = 1.0
    trained = atlas.data["scores"]["duo"].get("settings", {}).get("duo", {})
    sink = trained.get("sink", atlas.data["settings"].get("duo_sink")) if sink is None else sink
    recent = trained.get("window", atlas.data["settings"].get("duo_window")) if recent is None else recent
    if sink is None or recent is None:
        raise HeadwiseError(f"{atlas.path} does not record the duo gates' sink and window; give --sink and --recent")
    if not np.isfinite(gates).all():
        raise HeadwiseError(f"{atlas.path}'s duo score has a gate that is not a number outside the windowed layers; "
                            f"re-run `headwise profile --scores duo`")
    source = {
        "model": atlas.model, "geometry": atlas.geometry.to_dict(),
        "atlas": {"path": str(atlas.path), "sha256": hashlib.sha256(atlas.path.read_bytes()).hexdigest(),
                  "versions": atlas.data.get("versions", {})},
        "score": "duo", "aggregate": "kv_max (the gate of each KV head; the atlas repeats it on its query heads)",
        "windowed_layers_written_as_1": windowed,
        "training": trained, "trained_sink": trained.get("sink"), "trained_window": trained.get("window"),
        "duoattention_config": {"model_name": atlas.model.get("spec"),
                                **{_DUO_ARG_NAMES[k]: v for k, v in trained.items() if k in _DUO_ARG_NAMES}},
    }
    return export_duo_pattern(gates, out_dir, sink=int(sink), recent=int(recent), source=source)


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atlas", required=True, help="atlas directory or file holding the duo score")
    p.add_argument("--out", required=True, help="directory for full_attention_heads.tsv, config.json and provenance")
    p.add_argument("--sink", type=int, default=None, help="sink_size (default: the sink the gates were trained with)")
    p.add_argument("--recent", type=int, default=None,
                   help="recent_size (default: the window the gates were trained with)")


def _run(args: argparse.Namespace) -> None:
    out = export_from_atlas(args.atlas, args.out, sink=args.sink, recent=args.recent)
    config = json.loads((out / CONFIG).read_text())
    print(f"DuoAttention pattern written to {out} ({TSV}, {CONFIG}, {PROVENANCE}); sink_size "
          f"{config['sink_size']}, recent_size {config['recent_size']}")


EXPORT_DUO_COMMAND = ("write an atlas's DuoAttention gates in DuoAttention's pattern format (for duo-attention, "
                      "kvpress)", _add, _run)

__all__ = ["EXPORT_DUO_COMMAND", "export_duo_pattern", "export_from_atlas"]
