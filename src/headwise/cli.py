"""`headwise` command line: a thin layer over the Python API.

Each subcommand has an `_add_<name>` (arguments) and a `_run_<name>` (work) function.
User errors print one line and exit 2; nothing prints a traceback for bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import HeadwiseError


def _add_profile(p: argparse.ArgumentParser) -> None:
    from .load import DEFAULT_MODEL
    from .profile import ProfileSettings

    d = ProfileSettings()
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="bundled name (smollm2-135m, gemma3-270m), model directory, .gguf file, or cached hub id")
    p.add_argument("--out", default=None, help="output directory for atlas.json (default: atlas-<model>)")
    p.add_argument("--scores", default=None, help="comma-separated score names (default: the pattern battery)")
    p.add_argument("--context", type=int, default=d.context, help="tokens per natural-text probe sequence")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--text", default=None, help="UTF-8 text file for the natural-text probe (default: bundled)")
    p.add_argument("--text-sequences", type=int, default=d.text_sequences)
    p.add_argument("--sink-tokens", type=int, default=d.sink_tokens, help="S of streamable_mass")
    p.add_argument("--window", type=int, default=d.window, help="W of streamable_mass")
    p.add_argument("--exclude-bos", action="store_true", help="TransformerLens detector option")
    p.add_argument("--exclude-current-token", action="store_true", help="TransformerLens detector option")


def _run_profile(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .load import load
    from .profile import ProfileSettings, profile, summary
    from .scores import all_score_names

    scores = [s.strip() for s in args.scores.split(",") if s.strip()] if args.scores else None
    for name in scores or []:
        if name not in all_score_names():
            raise HeadwiseError(f"unknown score '{name}'; choose from {', '.join(all_score_names())}")
    for flag in ("context", "text_sequences", "sink_tokens", "window"):
        if getattr(args, flag) < 1:
            raise HeadwiseError(f"--{flag.replace('_', '-')} must be a positive integer")
    settings = ProfileSettings(seed=args.seed, context=args.context, text=args.text,
                               text_sequences=args.text_sequences, sink_tokens=args.sink_tokens, window=args.window,
                               exclude_bos=args.exclude_bos, exclude_current_token=args.exclude_current_token)
    loaded = load(args.model)
    out = Path(args.out) if args.out else Path(f"atlas-{Path(args.model).stem}")
    atlas = profile(loaded, scores, settings)
    path = atlas.save(out)
    print(summary(atlas))
    print(f"atlas written to {path}")


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "profile": ("score every attention head and write an atlas", _add_profile, _run_profile),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headwise", description="What every attention head does.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command][2](args)
    except HeadwiseError as e:
        print(f"headwise: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headwise: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
