"""`headwise steer`: fit a steering on a task, save it, and score it against zero-shot on held-out pairs."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..errors import HeadwiseError


def _add_steer(p: argparse.ArgumentParser) -> None:
    from ..load import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="bundled name, model directory, .gguf file or cached hub id")
    p.add_argument("--task", required=True, help="a bundled task (antonyms, country_capital, ...) or a .jsonl file of "
                                                 "{\"prompt\", \"target\"} lines")
    p.add_argument("--method", required=True, help="soft_injection, lofit or act")
    p.add_argument("--out", required=True, help="directory for the steering (steering.safetensors + steering.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fit (default 0)")
    p.add_argument("--random-heads", type=int, default=None, metavar="K",
                   help="the control: fit on K heads drawn at random with --seed instead of the method's own choice")
    p.add_argument("--limit", type=int, default=None, help="score on at most N held-out pairs (default: all)")
    p.add_argument("--no-eval", action="store_true", help="fit and save only")


def _run_steer(args: argparse.Namespace) -> None:
    from .._io import output_location
    from ..load import load
    from ..tasks import load_task
    from . import method_class, random_heads, save_steering
    from .evaluate import fit

    method_class(args.method)  # an unknown method before the model loads
    if args.seed < 0:
        raise HeadwiseError(f"--seed must be a whole number >= 0; got {args.seed}")
    if args.limit is not None and args.limit < 1:
        raise HeadwiseError(f"--limit must be a positive number of pairs; got {args.limit}")
    if args.random_heads is not None and args.random_heads < 1:
        raise HeadwiseError(f"--random-heads must be a positive number of heads; got {args.random_heads}")
    task = load_task(args.task)
    with output_location(args.out, what="the steering"):
        loaded = load(args.model, dtype=args.dtype)
        loaded.require("text", "headwise steer")
        heads = None if args.random_heads is None else random_heads(loaded.geometry, args.random_heads, args.seed)
        steering = fit(loaded, task, args.method, heads=heads, seed=args.seed)
        save_steering(steering, args.out, loaded.info.to_dict(), task=task.record())
    print(f"{args.method} on {task.name}: {len(steering.heads)} heads, {steering.trained_parameters():,} trained "
          f"parameters; written to {args.out}")
    if args.no_eval:
        return
    from ..tasks import task_accuracy

    zero = task_accuracy(loaded, task, shots=0, limit=args.limit, seed=args.seed)
    steered = task_accuracy(loaded, task, shots=0, limit=args.limit, seed=args.seed, edits=steering.edits())
    print(f"held-out accuracy ({zero.n} pairs): zero-shot {zero.accuracy:.1%}, steered {steered.accuracy:.1%}")


STEER_COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "steer": ("fit a steering (soft injection, LoFiT, ACT) on a task through a few heads; save it and score it "
              "against zero-shot", _add_steer, _run_steer),
}

__all__ = ["STEER_COMMANDS"]
