"""`headwise` command line: a thin layer over the Python API.

Each subcommand has an `_add_<name>` (arguments) and a `_run_<name>` (work) function.
User errors print one line and exit 2; nothing prints a traceback for bad input. Ctrl-C prints
one line and exits 130. Every command that writes files checks where before any work
(headwise._io) and writes them whole: an atlas directory as one unit (headwise.report.write_unit).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import HeadwiseError
from .kv.cli import KV_COMMANDS
from .steer.cli import STEER_COMMANDS


def _add_profile(p: argparse.ArgumentParser) -> None:
    from .load import DEFAULT_MODEL
    from .scores import all_settings

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="bundled name (smollm2-135m, gemma3-270m, vit-digits), model directory, .gguf file, or "
                        "cached hub id")
    p.add_argument("--out", default=None, help="output directory for atlas.json (default: atlas-<model>)")
    p.add_argument("--scores", default=None, help="comma-separated score names (default: the battery for the model's "
                                                  "kind: patterns for language models, importance, spatial and "
                                                  "pattern summary for image models)")
    p.add_argument("--validate", action="store_true",
                   help="then causally test every role label that has a task (headwise validate) and store the results")
    p.add_argument("--no-report", action="store_true",
                   help="skip the attention samples and report.html written beside the atlas")
    # One flag per setting the score families declare (headwise.scores.Setting).
    group = p.add_argument_group("settings of the scores")
    for setting in all_settings().values():
        default = "" if setting.default is None else f" (default: {setting.default})"
        kwargs = {"dest": "setting_" + setting.name, "default": None, "help": setting.help + default}
        if setting.type is bool:
            group.add_argument(setting.cli_flag, action="store_true", **kwargs)
        else:
            group.add_argument(setting.cli_flag, type=setting.type, choices=setting.choices,
                               metavar=None if setting.choices else setting.name.upper(), **kwargs)


def _run_profile(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ._io import check_output_dir, output_location
    from .load import load
    from .profile import ProfileSettings, profile, summary
    from .report import REPORT_FILE, sample_attention, unit_bytes, write_unit
    from .scores import all_score_names, default_scores

    scores = [s.strip() for s in args.scores.split(",") if s.strip()] if args.scores else None
    for name in scores or []:
        if name not in all_score_names():
            raise HeadwiseError(f"unknown score '{name}'; choose from {', '.join(all_score_names())}")
    if args.scores is not None and not scores:
        raise HeadwiseError(f"--scores is empty; name at least one score, e.g. --scores {all_score_names()[0]}")
    # Flags left out are None (store_true ones False): the setting keeps its default.
    given = {k[len("setting_"):]: v for k, v in vars(args).items()
             if k.startswith("setting_") and v is not None and v is not False}
    settings = ProfileSettings(**given)
    out = Path(args.out) if args.out else Path(f"atlas-{Path(args.model).stem}")
    report = not args.no_report
    # Checked before the model loads; a refused run removes the directory it made.
    with output_location(out, what="the atlas"):
        loaded = load(args.model, dtype=args.dtype)
        need = unit_bytes(loaded.geometry, len(scores or default_scores(loaded.geometry.modality)), settings.context,
                          report)
        check_output_dir(out, what="the atlas", need_bytes=need)
        atlas = profile(loaded, scores, settings)  # every probe and setting is checked before any pass
        samples = sample_attention(loaded, settings) if report else None
        # One unit: the atlas with its samples and report, or (--no-report) alone, an older run's removed.
        write_unit(out, atlas, samples=samples, report=report, what="the atlas")
    print(summary(atlas))
    print(f"atlas written to {out / 'atlas.json'}")
    if report:
        print(f"report written to {out / REPORT_FILE}")
    if args.validate:
        from .validate import format_validation, validate_labelled_roles

        for result in validate_labelled_roles(loaded, atlas):
            print(format_validation(result))
        # A second unit: the profile above stays whole if validation is interrupted.
        write_unit(out, atlas, what="the atlas")
        print(f"validation results written to {out / 'atlas.json'}")


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("atlas", help="atlas directory (written by headwise profile)")
    p.add_argument("--model", default=None,
                   help="collect the attention samples the page shows with this model (the atlas's own); "
                        "without it the samples already in the directory are used")


def _run_report(args: argparse.Namespace) -> None:
    from ._io import check_output_dir
    from .atlas import Atlas
    from .report import REPORT_FILE, atlas_directory, unit_bytes, write_report

    atlas = Atlas.load(atlas_directory(args.atlas))  # a lone atlas file is refused: the report lives beside atlas.json
    context = atlas.data["settings"].get("context")
    need = unit_bytes(atlas.geometry, len(atlas.score_names), context if isinstance(context, int) else 2048, True)
    # Before the model loads and the samples run; the old unit stays until the new one is whole, so both fit.
    check_output_dir(atlas.directory, what="report.html", need_bytes=need)
    if args.model:
        from .load import load
        from .report import collect_for_atlas

        collect_for_atlas(load(args.model, dtype=args.dtype), atlas, report=True)
    else:
        write_report(atlas.directory)
    path = atlas.directory / REPORT_FILE
    print(f"report written to {path} ({path.stat().st_size / 2**20:.1f} MB)")


def _add_plot(p: argparse.ArgumentParser) -> None:
    p.add_argument("atlas", help="atlas directory (written by headwise profile)")
    p.add_argument("--out", default=None, help="directory for the PNG files (default: ATLAS/figures)")
    p.add_argument("--score", default=None, help="score whose grid carries the role badges (default: the first)")


def _run_plot(args: argparse.Namespace) -> None:
    from .report import plot

    for path in plot(args.atlas, args.out, args.score):
        print(f"figure written to {path}")


def _add_attribute(p: argparse.ArgumentParser) -> None:
    from .load import DEFAULT_MODEL

    p.add_argument("--data", required=True,
                   help='JSON Lines file, one example a line: {"prompt": "...", "target": "..."} (target optional)')
    p.add_argument("--name", required=True, help="name of the score in the atlas (e.g. safety)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="bundled name, model directory, .gguf file or cached hub id")
    p.add_argument("--atlas", default=None,
                   help="atlas directory to add the score to (created if missing; default: atlas-<model>)")
    p.add_argument("--metric", default="auto", choices=["auto", "kl", "loss"],
                   help="kl: next-token KL divergence; loss: target loss increase (auto: loss if every line has a "
                        "target, else kl)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--top", type=int, default=10, help="heads to list")


def _run_attribute(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ._io import output_location
    from .atlas import atlas_file
    from .attribute import attribute_to_atlas, load_examples
    from .load import load

    if args.top < 0:
        raise HeadwiseError("--top must be >= 0")
    load_examples(args.data)  # a bad data file is refused before the model loads
    out = Path(args.atlas) if args.atlas else Path(f"atlas-{Path(args.model).stem}")
    with output_location(atlas_file(out).parent, what="the atlas"):
        loaded = load(args.model, dtype=args.dtype)
        atlas, path = attribute_to_atlas(loaded, args.data, args.name, out, metric=args.metric, chat=args.chat)
    metric = atlas.data["scores"][args.name]["settings"]["metric"]
    print(f"{args.name} ({metric}): top heads by the behaviour change when zeroed alone")
    for layer, head, value in atlas.top(args.name, args.top):
        print(f"  L{layer}.H{head}  {value:.4g}")
    print(f"atlas written to {path}")


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "profile": ("score every attention head and write an atlas", _add_profile, _run_profile),
    "attribute": ("rank heads by how much zeroing each changes the model's behaviour on your JSONL data",
                  _add_attribute, _run_attribute),
    "report": ("write DIR/report.html, the atlas as a self-contained interactive page", _add_report, _run_report),
    "plot": ("write static PNG figures of an atlas (matplotlib)", _add_plot, _run_plot),
}


def _add_validate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", required=True, help="role label to test (retrieval, induction, previous-token, ...)")
    p.add_argument("--atlas", required=True, help="atlas directory (written by headwise profile); results go into it")
    p.add_argument("--model", default=None, help="the atlas's model (default: the spec recorded in the atlas)")
    p.add_argument("--k", type=int, default=None, help="heads to ablate (default: every head with the label)")
    p.add_argument("--draws", type=int, default=5, help="random k-head control sets (at least 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    p.add_argument("--context", type=int, default=None,
                   help="retrieval only: tokens per passkey/needle prompt (default 1024)")


def _run_validate(args: argparse.Namespace) -> None:
    from ._io import check_output_dir
    from .atlas import Atlas, is_lone_file
    from .attribute import register_atlas_attribution
    from .load import load
    from .validate import MIN_DRAWS, RetrievalTask, format_validation, validate_and_store

    task = None
    if args.context is not None:
        if args.role != "retrieval":
            raise HeadwiseError(f"--context applies to --role retrieval only, not '{args.role}'")
        if args.context < 64:
            raise HeadwiseError("--context must be at least 64 tokens")
        task = RetrievalTask(context=args.context)
    if args.draws < MIN_DRAWS:
        raise HeadwiseError(f"--draws must be at least {MIN_DRAWS} (the random control needs them); got {args.draws}")
    if args.k is not None and args.k < 1:
        raise HeadwiseError(f"--k must be a positive number of heads; got {args.k}")
    if args.seed < 0:
        raise HeadwiseError(f"--seed must be a whole number >= 0; got {args.seed}")
    atlas = Atlas.load(args.atlas)
    check_output_dir(atlas.directory, what="the validation results")  # before the model loads
    # So that `--role NAME` works for a `headwise attribute --name NAME` result; only that one: the atlas's
    # other attributions have nothing to do with this run.
    register_atlas_attribution(atlas, args.role)
    loaded = load(args.model or atlas.model["spec"], dtype=args.dtype)
    result = validate_and_store(loaded, atlas, args.role, k=args.k, draws=args.draws, seed=args.seed, task=task)
    print(format_validation(result))
    if is_lone_file(args.atlas):
        path = atlas.save(args.atlas)
    else:  # one unit: its samples kept, its report (if any) re-rendered with the results
        from .report import write_unit

        write_unit(atlas.directory, atlas, what="the atlas")
        path = atlas.directory / "atlas.json"
    print(f"validation results written to {path}")


COMMANDS["validate"] = ("zero a role's top-k heads and k random heads; report the role's task metric for each",
                        _add_validate, _run_validate)

def _add_prune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the atlas's model: bundled name, model directory, .gguf file or "
                                                  "cached hub id")
    p.add_argument("--atlas", required=True, help="atlas directory of that model (written by headwise profile)")
    p.add_argument("--score", required=True,
                   help="score ranking the heads (larger = more important, e.g. importance_norm), or 'random'")
    p.add_argument("--fraction", type=float, required=True,
                   help="share of each layer's pruning units to remove (KV groups for GQA models, heads otherwise), "
                        "rounded to whole units: with u units per layer only 1/u ... (u-1)/u, and only head counts "
                        "the model's config accepts (smollm2-135m: 1/3 or 2/3; gemma3-270m: 1/2 or 3/4)")
    p.add_argument("--out", required=True, help="directory for the pruned model (a standard Hugging Face directory)")
    p.add_argument("--seed", type=int, default=0, help="seed of --score random (default 0)")
    p.add_argument("--protect", default="", metavar="ROLES",
                   help="comma-separated role labels (e.g. induction,previous-token) whose heads' units are pruned "
                        "last; prose-based importance alone removes the in-context heads")


def _run_prune(args: argparse.Namespace) -> None:
    from ._io import output_location
    from .atlas import Atlas
    from .load import load
    from .prune import check_pruned_output, provenance, prune_heads, save_pruned, select_heads

    if not 0 < args.fraction < 1:
        raise HeadwiseError(f"--fraction must be between 0 and 1 (exclusive); got {args.fraction}")
    if args.seed < 0:
        raise HeadwiseError(f"--seed must be a whole number >= 0; got {args.seed}")
    atlas = Atlas.load(args.atlas)
    with output_location(args.out, what="the pruned model"):
        check_pruned_output(args.out)  # before the model loads
        loaded = load(args.model, dtype=args.dtype)
        protect = [r.strip() for r in args.protect.split(",") if r.strip()]
        heads = select_heads(atlas, loaded.geometry, args.score, args.fraction, seed=args.seed, info=loaded.info,
                             config=loaded.model.config, protect=protect)
        model = prune_heads(loaded, heads)
        record = provenance(loaded, heads, score=args.score, fraction=args.fraction,
                            seed=args.seed if args.score == "random" else None, atlas=atlas, protect=protect)
        out = save_pruned(model, loaded.tokenizer, args.out, record)
    g = loaded.geometry
    before = sum(p.numel() for p in loaded.model.parameters())
    after = sum(p.numel() for p in model.parameters())
    per_layer = len(heads) // g.n_layers
    print(f"pruned {per_layer} of {g.n_heads} query heads ({per_layer / g.n_heads:.3g}) in each of {g.n_layers} "
          f"layers by {args.score}; parameters {before:,} -> {after:,}")
    print(f"pruned model written to {out}")


COMMANDS["prune"] = ("physically remove the least important heads (same number per layer, whole KV groups) and "
                     "save a plain transformers model", _add_prune, _run_prune)


def _add_compare(p: argparse.ArgumentParser) -> None:
    from .compare import DEFAULT_TASKS, CompareSettings
    from .load import DEFAULT_MODEL

    d = CompareSettings()
    p.add_argument("--model", default=DEFAULT_MODEL, help="the unpruned model: bundled name, model directory, .gguf "
                                                          "file or cached hub id")
    p.add_argument("--pruned", nargs="+", required=True, metavar="DIR",
                   help="directories written by headwise prune from --model (or HF directories with its tokenizer)")
    p.add_argument("--out", default="compare.json", help="JSON results, rewritten after every finished model")
    p.add_argument("--plot", default=None, help="PNG plot (default: --out with .png)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help="comma-separated bundled tasks or .jsonl files of the in-context suite, or 'none'")
    for flag, field, text in (("--shots", "shots", "examples in each task prompt"),
                              ("--limit", "limit", "test pairs per task"),
                              ("--passkey-trials", "passkey_trials", "passkey prompts (0: skip)"),
                              ("--passkey-context", "passkey_context", "tokens per passkey prompt"),
                              ("--heldout-windows", "heldout_windows", "held-out prose windows"),
                              ("--heldout-context", "heldout_context", "tokens per held-out window"),
                              ("--speed-repeats", "speed_repeats", "timed interleaved rounds of prefill + decode per "
                                                                   "model, after an untimed one (0: skip)"),
                              ("--speed-prompt", "speed_prompt", "prefill tokens of the speed runs"),
                              ("--speed-new-tokens", "speed_new_tokens", "tokens decoded per speed run")):
        p.add_argument(flag, type=int, default=getattr(d, field), help=f"{text} (default %(default)s)")


def _run_compare(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ._io import check_output_file, output_location
    from .compare import CompareSettings, check_pruned_dirs, compare, load_tasks, plot, write_result
    from .load import load

    tasks = () if args.tasks.strip() == "none" else tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if not tasks and args.tasks.strip() != "none":
        raise HeadwiseError("--tasks is empty; name bundled tasks (e.g. --tasks antonyms) or pass --tasks none")
    settings = CompareSettings(tasks=tasks, shots=args.shots, limit=args.limit, passkey_trials=args.passkey_trials,
                               passkey_context=args.passkey_context, heldout_windows=args.heldout_windows,
                               heldout_context=args.heldout_context, speed_repeats=args.speed_repeats,
                               speed_prompt=args.speed_prompt, speed_new_tokens=args.speed_new_tokens)
    settings.check()  # every flag, the pruned directories and the tasks before the model loads
    check_pruned_dirs(args.pruned)
    load_tasks(settings)
    out = Path(args.out)
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    if png == out:
        raise HeadwiseError(f"--out {out} names the plot's file; give the results a .json name")
    with output_location(out, what="the comparison", file=True):
        check_output_file(png, what="the comparison plot")
        base = load(args.model, dtype=args.dtype)
        first = [True]

        def checkpoint(partial: dict) -> None:
            # The models done so far replace an older result; the older result's plot goes with it.
            write_result(out, partial)
            if first[0]:
                png.unlink(missing_ok=True)
                first[0] = False

        result = compare(base, args.pruned, settings, model_spec=args.model, checkpoint=checkpoint,
                         command=vars(args))
        write_result(out, result)
    speed = (result.get("speed") or {}).get("models", {})
    print(f"{'model':28s} {'heads':>6s} {'params':>8s} {'ppl':>9s} {'icl':>6s} {'tasks':>6s} {'passkey':>8s} "
          f"{'prefill':>8s} {'decode':>7s}")
    for m in result["models"]:
        s = speed.get(m["name"], {})
        cells = [f"{m['heads_removed_share']:6.0%}", f"{m['parameters'] / 1e6:7.2f}M",
                 f"{m['perplexity']['perplexity']:9.3f}", f"{m['in_context_loss']:6.3f}",
                 f"{m['task_accuracy']:6.0%}" if "task_accuracy" in m else f"{'-':>6s}",
                 f"{m['passkey']['accuracy']:8.0%}" if "passkey" in m else f"{'-':>8s}",
                 f"{s['prefill_ratio']:7.3f}x" if s else f"{'-':>8s}",
                 f"{s['decode_ratio']:6.3f}x" if s else f"{'-':>7s}"]
        print(f"{m['name'][:28]:28s} " + " ".join(cells))
    try:
        drawn = plot(result, png)
    except OSError as e:
        raise HeadwiseError(f"results written to {out}, but not the plot {png} ({e.strerror or e})") from None
    print(f"results written to {out}" + (f" and {drawn}" if drawn else ""))


COMMANDS["compare"] = ("measure a model and pruned versions of it side by side (held-out perplexity, in-context "
                       "loss, task suite, passkey, parameters, interleaved speed); write JSON and a plot",
                       _add_compare, _run_compare)


def _add_influence(p: argparse.ArgumentParser) -> None:
    from .influence import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_TOKENS

    p.add_argument("--atlas", required=True, help="atlas directory (or lone atlas file) of the model")
    p.add_argument("--data", required=True, help='JSON Lines corpus, one {"text": "...", "id": "..."} a line '
                                                 '(id optional: the line number)')
    p.add_argument("--role", required=True, help="role whose top-k heads are masked (retrieval, induction, ...)")
    p.add_argument("--out", required=True, help="ranked JSON Lines file; OUT.meta.json records what produced it")
    p.add_argument("--model", default=None, help="the atlas's model (default: the spec recorded in the atlas)")
    p.add_argument("--k", type=int, default=None, help="heads to mask (default: every head with the label)")
    p.add_argument("--random-seed", type=int, default=None,
                   help="the control: mask k random heads (drawn from those outside the role's top k) instead")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"tokens scored per document; longer ones are truncated (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                   help=f"rows x tokens per forward pass, bounds memory (default {DEFAULT_BATCH_TOKENS})")
    p.add_argument("--ablation", choices=("zero", "uniform"), default="zero",
                   help="how a head is masked: zero its output (default, as validate does) or make its attention "
                        "uniform (as AIR, arXiv 2512.13279, defines AttentionInfluence's masking)")


def _run_influence(args: argparse.Namespace) -> None:
    import hashlib
    from pathlib import Path

    from ._io import output_location
    from .atlas import Atlas, versions
    from .influence import influence_scores, load_documents, meta_path, random_heads, role_heads, write_ranked
    from .load import load

    if args.k is not None and args.k < 1:
        raise HeadwiseError(f"--k must be a positive number of heads; got {args.k}")
    if args.random_seed is not None and args.random_seed < 0:
        raise HeadwiseError(f"--random-seed must be a whole number >= 0; got {args.random_seed}")
    if args.max_tokens < 2 or args.batch_tokens < 2:
        raise HeadwiseError("--max-tokens and --batch-tokens must be at least 2")
    out = Path(args.out)
    if out.exists() and Path(args.data).exists() and out.resolve() == Path(args.data).resolve():
        raise HeadwiseError(f"--out {out} is the --data file; write the ranking to another file")
    docs = load_documents(args.data)  # bad input is refused before the model loads
    atlas = Atlas.load(args.atlas)
    heads = role_heads(atlas, args.role, args.k)
    g = atlas.geometry
    if args.random_seed is not None:
        heads = random_heads(g.n_layers, g.n_heads, len(heads), args.random_seed, exclude=heads)
    if meta_path(out).is_dir():
        raise HeadwiseError(f"cannot write {meta_path(out)}: it is a directory; choose another --out")
    with output_location(out, what="the ranking", file=True):
        loaded = load(args.model or atlas.model["spec"], dtype=args.dtype)
        result = influence_scores(loaded, atlas, docs, role=args.role, k=args.k,
                                  heads=heads if args.random_seed is not None else None,
                                  max_tokens=args.max_tokens, batch_tokens=args.batch_tokens, ablation=args.ablation)
        provenance = {
            "selection": (f"random: numpy default_rng({args.random_seed}) draws k heads from those outside the "
                          f"role's top k" if args.random_seed is not None else "the role's top k heads by its score"),
            "random_seed": args.random_seed, "model": loaded.info.to_dict(), "geometry": loaded.geometry.to_dict(),
            "atlas": {"path": str(atlas.path), "sha256": hashlib.sha256(atlas.path.read_bytes()).hexdigest()},
            "data": {"path": str(args.data), "sha256": hashlib.sha256(Path(args.data).read_bytes()).hexdigest()},
            "versions": versions()}
        path, meta = write_ranked(result, out, provenance)
    for record in result.records()[:5]:
        print(f"  #{record['rank']}  id {record['id']}  score {record['score']:+.4f}  (loss {record['clean_loss']:.3f}"
              f" -> {record['masked_loss']:.3f}, {record['tokens']} tokens)")
    print(f"ranked {len(result.ranked)} documents ({len(result.skipped)} skipped) masking {len(heads)} heads")
    print(f"ranking written to {path}; provenance in {meta}")


COMMANDS["influence"] = ("rank documents by how much masking a role's heads raises the model's loss on them "
                         "(AttentionInfluence)", _add_influence, _run_influence)

COMMANDS.update(KV_COMMANDS)
COMMANDS.update(STEER_COMMANDS)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("headwise")
    except PackageNotFoundError:
        return "unknown"


DTYPE_NAMES = ("float32", "bfloat16", "float16")  # load.DTYPES, named here so `headwise --help` needs no torch


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line like every other error (not the usage block, not SystemExit)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise HeadwiseError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="headwise", description="What every attention head does.")
    parser.add_argument("--version", action="version", version=f"headwise {_version()}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for every command (on 2 shared cores, 1 is often fastest for "
                             "decoding); default: torch's own choice")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                        help="the model's weights and activations for every command (bfloat16: half the memory, "
                             "and faster on CPUs with AMX and on GPUs); default: float32")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise HeadwiseError("--threads must be a positive integer")
    import os

    # Beyond a few threads a core nothing gets faster, and torch's thread pool crashes for huge counts.
    cores = os.cpu_count() or 1
    most = max(64, 4 * cores)
    if threads > most:
        raise HeadwiseError(f"--threads must be at most {most} (4 x this machine's {cores} cores, at least 64); "
                            f"got {threads}")
    import torch

    torch.set_num_threads(threads)  # headwise eval's speed runs pass it on to their subprocesses


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _set_threads(args.threads)
        COMMANDS[args.command][2](args)
    except HeadwiseError as e:
        print(f"headwise: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headwise: interrupted; every output is whole: the one from before this run, or what this run "
              "had finished", file=sys.stderr)
        return 130
    return 0


__all__ = ["COMMANDS", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
