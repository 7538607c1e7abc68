"""`headwise generate` and `headwise eval`: the KV policies from the command line.

Every argument is checked before the model loads (kv/spec.py for policies and sizes,
EvalSettings.check for eval's), and again against the model once it has loaded. `eval --out`
is checked first and rewritten after every case, so an interrupted run keeps its finished cases.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

from ..errors import HeadwiseError
from .duo_pattern import EXPORT_DUO_COMMAND


def _common(p: argparse.ArgumentParser) -> None:
    from ..load import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="bundled name, model directory, .gguf file or cached hub id")
    p.add_argument("--atlas", default=None, help="atlas directory or atlas.json (for headwise:SCORE@F and razor@F)")
    p.add_argument("--sink", type=int, default=None,
                   help="sink tokens of streaming heads (default: 64 for head policies, 4 for streaming)")
    p.add_argument("--window", type=int, default=None, help="recent-window tokens of streaming heads (default 256)")


def _load_atlas(args: argparse.Namespace, loaded):
    if not args.atlas:
        return None
    from ..atlas import Atlas

    atlas = Atlas.load(args.atlas)
    atlas.check_model(loaded.info, loaded.geometry)
    return atlas


def _add_generate(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--policy", default="full", help="policy spec (full, streaming[@X], headwise:SCORE[:high|:low]@F, "
                                                    "razor@F, random@F[:SEED], duo:FILE@F, snapkv@X, compresskv@X) or "
                                                    "a policy .json; @kvB for @F: the most full heads within B x the "
                                                    "full cache's KV bytes; append +bounded, +tailN, +earlyL, "
                                                    "+strideK or +blocksK (faster prefills than the default "
                                                    "whole-prompt one), "
                                                    "+midM (streaming heads also keep M prompt tokens chosen by the "
                                                    "token vote), +comp "
                                                    "(compensation token), +q8/+q4/+q2 (full heads in 8/4/2 bits); "
                                                    "docs/kv-cache.md")
    p.add_argument("--prompt-file", required=True, help="UTF-8 text file with the prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=None, help="feed the prompt in chunks of N tokens")
    p.add_argument("--steer", default=None, metavar="DIR", help="apply a steering written by headwise steer")
    p.add_argument("--strength", type=float, default=None,
                   help="scale the steering's edit (0: none, 1: as fitted; default: the saved strength)")


def _run_generate(args: argparse.Namespace) -> None:
    import resource

    import torch

    from ..load import load
    from .generate import generate
    from .spec import check_sink_window, check_spec, parse_policy

    check_spec(args.policy)  # the grammar before the model loads; the numbers again with it
    path = Path(args.prompt_file)
    try:
        prompt = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HeadwiseError(f"cannot read prompt file {path}: {e}") from None
    if not prompt.strip():
        raise HeadwiseError(f"prompt file {path} is empty; write the prompt into it")
    if args.max_new_tokens < 1:
        raise HeadwiseError("--max-new-tokens must be a positive integer")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise HeadwiseError("--prefill-chunk must be a positive number of tokens")
    check_sink_window(args.sink, args.window)
    if args.strength is not None and (args.steer is None or not math.isfinite(args.strength)):
        raise HeadwiseError("--strength needs --steer DIR and a finite number" if args.steer is None else
                            f"--strength must be a finite number; got {args.strength}")
    if args.steer is not None:
        from ..steer import read_record

        read_record(args.steer)  # a missing or broken steering before the model loads
    loaded = load(args.model, dtype=args.dtype)
    loaded.require("text", "headwise generate")
    edits = None
    if args.steer is not None:
        from ..steer import load_steering

        steering = load_steering(args.steer, loaded, strength=args.strength)
        edits = steering.edits()
        if steering.whole_prompt and args.prefill_chunk is not None:  # it acts at the prompt's last token
            raise HeadwiseError(f"a {steering.method} steering reads the whole prompt in one call; drop "
                                f"--prefill-chunk")
    tok = loaded.tokenizer
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise HeadwiseError(f"{args.model} has no chat template; drop --chat")
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tok(prompt).input_ids])
    limit = loaded.geometry.max_positions
    if limit is not None and ids.shape[1] + args.max_new_tokens > limit:
        raise HeadwiseError(f"the prompt ({ids.shape[1]} tokens) and --max-new-tokens {args.max_new_tokens} exceed "
                            f"this model's {limit} positions; shorten {path} or lower --max-new-tokens")
    policy = parse_policy(args.policy, loaded.geometry, atlas=_load_atlas(args, loaded), context=ids.shape[1],
                          sink=args.sink, window=args.window, dtype_bytes=loaded.dtype_bytes)
    if args.prefill_chunk is not None and policy.one_call_prefill:
        raise HeadwiseError(f"policy '{args.policy}' reads the whole prompt in one call; drop --prefill-chunk")
    if edits is not None and edits.weights is not None and args.policy != "full":
        raise HeadwiseError(f"steering {args.steer} edits attention weights, which only the full KV cache keeps; "
                            f"drop --policy {args.policy}")
    res = generate(loaded, ids, policy, max_new_tokens=args.max_new_tokens, prefill_chunk=args.prefill_chunk,
                   edits=edits)
    from .heads import HeadPolicy

    full = HeadPolicy.full_cache(loaded.geometry).kv_bytes(res.prompt_tokens + len(res.tokens),
                                                           dtype_bytes=loaded.dtype_bytes)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(res.text)
    print(f"--- {policy.describe()}")
    print(f"prefill: {res.prompt_tokens} tokens in {res.prefill_seconds:.2f} s ({res.prefill_tokens_per_second:.1f} "
          f"tok/s); decode: {len(res.tokens)} tokens, {res.decode_tokens_per_second:.1f} tok/s")
    print(f"KV cache: {res.kv_bytes / 2**20:.2f} MiB ({res.kv_bytes / full:.1%} of the full cache's "
          f"{full / 2**20:.2f} MiB); peak RSS {rss / 2**20:.0f} MiB")


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise HeadwiseError(f"{flag} takes comma-separated integers, got '{text}'") from None


def _add_eval(p: argparse.ArgumentParser) -> None:
    from .evaluate import TASKS, EvalSettings

    d = EvalSettings()
    _common(p)
    p.add_argument("--policies", default="full,streaming", help="comma-separated policy specs (see headwise generate "
                                                                "--help)")
    p.add_argument("--tasks", default="passkey", help=f"comma-separated, from {', '.join(TASKS)} (ruler: all "
                                                      f"of RULER's tasks; docs/ruler.md)")
    p.add_argument("--contexts", default=",".join(map(str, d.contexts)), help="prompt lengths in tokens")
    p.add_argument("--depths", default=",".join(map(str, d.depths)), help="needle depths in [0, 1]")
    p.add_argument("--trials", type=int, default=d.trials, help="seeds per context x depth x filler (RULER tasks: "
                                                                       "per context)")
    p.add_argument("--fillers", default=",".join(d.fillers), help="haystack styles: essay, repeat, words")
    p.add_argument("--text", default=None, help="UTF-8 text for the essay filler and perplexity (default bundled)")
    p.add_argument("--speed-context", type=int, default=d.speed_context)
    p.add_argument("--perplexity-context", type=int, default=d.perplexity_context)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default="kv-eval.json", help="JSON results; the plot goes next to it (.png)")


def _write_json(path: Path, result: dict) -> None:
    from .._io import write_text_atomic

    try:
        write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    except OSError as e:
        raise HeadwiseError(f"could not write the eval results to {path} ({e.strerror or e}); free some space or "
                            f"choose another --out") from None


def _run_eval(args: argparse.Namespace) -> None:
    from .._io import output_location
    from ..load import load
    from .evaluate import EvalSettings, evaluate, plot
    from .spec import check_spec

    try:
        depths = tuple(float(x) for x in args.depths.split(",") if x.strip())
    except ValueError:
        raise HeadwiseError(f"--depths takes comma-separated numbers, got '{args.depths}'") from None
    settings = EvalSettings(tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
                            contexts=_ints(args.contexts, "--contexts"), depths=depths, trials=args.trials,
                            fillers=tuple(f.strip() for f in args.fillers.split(",") if f.strip()), sink=args.sink,
                            window=args.window, seed=args.seed, text=args.text, speed_context=args.speed_context,
                            perplexity_context=args.perplexity_context)
    settings.check()  # every setting before the model loads; evaluate() checks the sizes again with it
    specs = [s.strip() for s in args.policies.split(",") if s.strip()]
    if not specs:
        raise HeadwiseError("--policies is empty; give at least one policy spec, e.g. --policies streaming")
    for spec in specs:
        check_spec(spec)
    out = Path(args.out)
    png = out.with_suffix(".png")
    if png == out:
        raise HeadwiseError(f"--out {out} names the plot's file; give the results a .json name")
    with output_location(out, what="the eval results", file=True):
        loaded = load(args.model, dtype=args.dtype)
        loaded.require("text", "headwise eval")
        atlas = _load_atlas(args, loaded)
        first = [True]

        def checkpoint(partial: dict) -> None:
            # The cases done so far replace an older result; the older result's plot goes with it.
            _write_json(out, partial)
            if first[0]:
                png.unlink(missing_ok=True)
                first[0] = False

        result = evaluate(loaded, specs, settings, atlas=atlas, atlas_path=args.atlas, model_spec=args.model,
                          checkpoint=checkpoint)
        _write_json(out, result)
    for task, by_ctx in result["summary"].items():
        for ctx, cells in by_ctx.items():
            line = "  ".join(f"{p}: " + (f"score {c['score']:.1f}" if "score" in c else f"{c['correct']}/{c['n']}")
                             + " (" + ("-" if c["kv_ratio"] is None else f"{c['kv_ratio']:.0%}") + " KV)"
                             for p, c in cells.items())
            print(f"{task} @ {ctx}: {line}")
    if "speed" in result:
        for p, r in result["speed"]["policies"].items():
            print(f"speed @ {result['speed']['context']}: {p}: decode {r['decode_tok_s']:.1f} tok/s, prefill "
                  f"{r['prefill_s']:.1f} s, KV {r['kv_bytes'] / 2**20:.1f} MiB, peak RSS "
                  f"{r['peak_rss_bytes'] / 2**20:.0f} MiB")
    try:
        png = plot(result, png)
    except OSError as e:
        raise HeadwiseError(f"results written to {out}, but not the plot {png} ({e.strerror or e})") from None
    print(f"results written to {out}" + (f" and {png}" if png else ""))


KV_COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "generate": ("generate text through a head-aware KV cache; print speed, KV bytes and peak RSS", _add_generate,
                 _run_generate),
    "eval": ("run the same retrieval prompts under several KV policies; write JSON and a plot", _add_eval, _run_eval),
    "export-duo": EXPORT_DUO_COMMAND,
}


__all__ = ["KV_COMMANDS"]
