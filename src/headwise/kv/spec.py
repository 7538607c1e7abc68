"""Policy specs: the one grammar the CLI, `headwise eval` and bench/ turn strings into policies with.

    NAME[:ARG][@AMOUNT][+OPTION...]   or   FILE.json[+OPTION...]

Registered names (`register_policy` adds more, one call each):
  full                          every head keeps every token
  streaming[@X]                 StreamingLLM, 4 sinks (or --sink); X < 1: window sized so the cache is
                                X of the full cache at the prompt's length; X >= 1: a window of X tokens
  headwise:SCORE[:high|:low]@F  the fraction F of KV heads an atlas score says need it most keep every
                                token (which end of the score: the atlas's record, or :high / :low)
  razor@F                       RazorAttention: echo + induction heads full, compensation token
  random@F[:SEED]               the control: F of the KV heads, chosen at random
  duo:FILE@F                    a DuoAttention gate file, top F full
  snapkv@X                      SnapKV eviction keeping X of the prompt (X < 1) or X tokens per head
  FILE.json                     a saved policy
For the head policies, @kvB instead of @F keeps as many heads whole as fit in B times the full
cache's KV bytes at the prompt's length. Options:
  how streaming heads read the prompt (one of; default: whole-prompt, which keeps the full
  cache's replies): +whole (attend to the whole prompt, then keep sinks + window), +bounded
  (every prompt query sees sinks + window only: DuoAttention's prefill, fastest), +tailN
  (one call, bounded except the prompt's last N queries, which attend to the whole prompt),
  +earlyL (one call: the first L layers read the prompt whole, the others bounded; with +tailN
  their last N queries whole), +strideK (with or without those: the bounded prompt queries also
  see every K-th earlier token, sinks + window + a stride), +blocksK (instead of a stride: the K
  64-token key blocks each query block picks, MInference's block-sparse pattern);
  +comp (RazorAttention's compensation token), +midM (streaming heads also keep M prompt tokens
  between sinks and window, chosen by the token vote; not with +bounded or +comp),
  +q8 / +q4 / +q2 (full heads' keys and values stored in 8, 4 or 2 bits, KIVI's way; `full` takes it too).

Every number is checked here: finite, in range, seeds whole numbers, sizes the model can hold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..errors import HeadwiseError
from ..geometry import Geometry
from .compresskv import build_compresskv
from .heads import DEFAULT_SINK, DEFAULT_WINDOW, STREAMINGLLM_SINK, HeadPolicy
from .policy import CachePolicy
from .quantized import BITS, BITS_TEXT
from .snapkv import SnapKVPolicy

OPTIONS = ("comp", "whole", "bounded", "tail", "early", "stride", "blocks", "mid", "q")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
# Beyond any model's positions, sink/window/middle sizes are typos that would allocate gigabytes.
MAX_TOKENS = 1 << 21


@dataclass(frozen=True)
class PolicyRequest:
    """A parsed spec with everything a builder needs; its helpers check every number."""

    spec: str
    name: str
    arg: str | None
    amount: str | None
    options: dict[str, Any]  # comp/whole/bounded: bool, tail/early/stride/blocks/mid: int, q: bits (0 = none)
    geometry: Geometry
    atlas: Any
    context: int | None
    sink: int | None  # None: the policy's own default
    window: int | None
    dtype_bytes: int = 4  # the model's: a byte budget is a share of its full cache

    def fail(self, why: str) -> HeadwiseError:
        return HeadwiseError(f"policy '{self.spec}': {why}")

    def number(self, text: str | None, what: str = "amount") -> float:
        # Plain decimals only: float() would also take "5_0", "inf" and "nan".
        if text and text.lower().lstrip("+-") in ("nan", "inf", "infinity"):
            raise self.fail(f"{what} must be a finite number, not {text}")
        if not text or not _NUMBER.fullmatch(text):
            raise self.fail(f"{what} '{text or ''}' is not a number")
        x = float(text)
        if not math.isfinite(x):
            raise self.fail(f"{what} must be a finite number, not {text}")
        return x

    def seed(self, text: str) -> int:
        if not re.fullmatch(r"\d+", text):
            raise self.fail(f"the seed '{text}' must be a whole number >= 0")
        return int(text)

    def need_context(self, why: str) -> int:
        if not self.context:
            raise self.fail(f"{why} from the prompt length; give a context")
        return self.context

    def head_amount(self, amount: str | None = None) -> dict[str, Any]:
        """'@F' -> a fraction of the KV heads in [0, 1]; '@kvB' -> a byte budget, B of the full cache."""
        amount = self.amount if amount is None else amount
        if not amount:
            raise self.fail(f"needs an amount, e.g. {self.name}{':' + self.arg if self.arg else ''}@0.25")
        if amount.startswith("kv"):
            share = self.number(amount[2:], "KV budget")
            if not 0.0 < share <= 1.0:
                raise self.fail(f"a KV budget is a share of the full cache in (0, 1], not {share:g}")
            context = self.need_context("a KV budget is sized")
            full = HeadPolicy.full_cache(self.geometry).kv_bytes(context, dtype_bytes=self.dtype_bytes)
            return {"budget_bytes": int(share * full), "context": context, "dtype_bytes": self.dtype_bytes}
        fraction = self.number(amount, "fraction")
        if not 0.0 <= fraction <= 1.0:
            raise self.fail(f"the fraction of KV heads must be in [0, 1], not {fraction:g}")
        return {"full_fraction": fraction}

    def shape(self, sink: int = DEFAULT_SINK) -> dict[str, Any]:
        """The streaming heads' shape and the full heads' storage: sinks, window, compensation, prefill mode
        (whole unless +bounded or +tailN / +earlyL / +strideK / +blocksK), middle tokens, bits."""
        o = self.options
        prefill = "bounded" if o["bounded"] else "tail" if any(o[k] for k in _TAIL) else "whole"
        return {"sink": self.sink if self.sink is not None else sink,
                "window": self.window if self.window is not None else DEFAULT_WINDOW,
                "compensate": o["comp"], "prefill": prefill, "middle": o["mid"], "tail": o["tail"],
                "early": o["early"], "stride": o["stride"], "blocks": o["blocks"], "quant": o["q"]}


@dataclass(frozen=True)
class RegisteredPolicy:
    name: str
    build: Callable[[PolicyRequest], CachePolicy]
    syntax: str
    options: frozenset[str]
    arg: bool  # takes NAME:ARG
    amount: str  # "required", "optional" or "none": NAME@AMOUNT


_REGISTERED: dict[str, RegisteredPolicy] = {}
_AMOUNTS = ("required", "optional", "none")


def register_policy(name: str, build: Callable[[PolicyRequest], CachePolicy], *, syntax: str | None = None,
                    options: tuple[str, ...] = (), arg: bool = False, amount: str = "required",
                    replace_existing: bool = False) -> None:
    """Make `NAME[:ARG][@AMOUNT][+OPTION...]` specs build a policy with `build(request)`.

    `arg`: whether it takes `:ARG`; `amount`: whether `@AMOUNT` is required, optional or refused;
    `options`: which of comp, whole, bounded, tail, early, stride, blocks, mid, q (+comp, +whole, +bounded,
    +tailN, +earlyL, +strideK, +blocksK, +midM, +q8/+q4/+q2) it accepts. Specs outside that are refused here.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise HeadwiseError(f"policy name {name!r} must be lower-case letters, digits, '_' or '-'")
    if name in _REGISTERED and not replace_existing:
        raise HeadwiseError(f"policy '{name}' is already registered; pass replace_existing=True to swap it")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise HeadwiseError(f"unknown policy option(s) {', '.join(sorted(unknown))}; known: {', '.join(OPTIONS)}")
    if amount not in _AMOUNTS:
        raise HeadwiseError(f"amount must be one of {', '.join(_AMOUNTS)}, not {amount!r}")
    _REGISTERED[name] = RegisteredPolicy(name, build, syntax or name, frozenset(options), arg, amount)


def registered_policies() -> list[str]:
    return [k.syntax for k in _REGISTERED.values()] + ["FILE.json"]


_OPTION_HELP = "+whole, +bounded, +tailN, +earlyL, +strideK, +blocksK, +comp, +midM, +q8, +q4, +q2"
_TAIL = ("tail", "early", "stride", "blocks")  # the options of the tail prefill
_NUMBERED = {"mid": ("a number of tokens", "+mid64"), "tail": ("a number of queries", "+tail64"),
             "early": ("a number of layers", "+early4"), "stride": ("a number of tokens", "+stride8"),
             "blocks": ("a number of 64-token key blocks", "+blocks16"),
             "q": ("a number of bits, 8, 4 or 2", "+q8")}


def _split_options(body: str, spec: str) -> tuple[str, dict[str, Any]]:
    """Strip +comp / +whole / +bounded / +tailN / +midM / +qB from the right; refuse an unknown, repeated or
    contradictory option."""
    options: dict[str, Any] = {"comp": False, "whole": False, "bounded": False, "tail": 0, "early": 0, "stride": 0,
                               "blocks": 0, "mid": 0, "q": 0}
    seen: set[str] = set()
    while True:
        head, plus, option = body.rpartition("+")
        if not plus:
            # +tailN, +earlyL and +strideK / +blocksK make one mode (the tail prefill); +whole and +bounded one each.
            prefills = [k for k in ("whole", "bounded", *_TAIL) if k in seen]
            if len(prefills) > 1 and not set(prefills) <= set(_TAIL):
                raise HeadwiseError(f"policy '{spec}': {' and '.join('+' + k for k in prefills)} are two prefill "
                                    f"modes; keep one")
            return body, options
        match = re.fullmatch(r"(comp|whole|bounded)|(mid|tail|early|stride|blocks|q)(\d+)", option)
        if match is None:
            numbered = re.fullmatch(r"(mid|tail|early|stride|blocks|q)(\D.*)?", option)
            if numbered:
                what, example = _NUMBERED[numbered.group(1)]
                raise HeadwiseError(f"policy '{spec}': +{numbered.group(1)} takes {what}, e.g. {example}; "
                                    f"'{numbered.group(2) or ''}' is not a number")
            if re.fullmatch(r"[A-Za-z]+\d*", option):
                raise HeadwiseError(f"policy '{spec}': unknown option '+{option}'; options: {_OPTION_HELP}")
            return body, options
        key = match.group(1) or match.group(2)
        if key in seen:
            raise HeadwiseError(f"policy '{spec}': option +{key} given twice")
        seen.add(key)
        if match.group(1):
            options[key] = True
        else:
            options[key] = value = int(match.group(3))
            if key == "q" and value not in BITS:
                raise HeadwiseError(f"policy '{spec}': full heads are stored in {BITS_TEXT}, not +q{value}")
            if key == "early" and not 1 <= value <= 4096:
                raise HeadwiseError(f"policy '{spec}': +earlyL needs 1 <= L <= the model's layers")
            if key not in ("q", "early") and not 1 <= value <= MAX_TOKENS:
                raise HeadwiseError(f"policy '{spec}': +{key}N needs 1 <= N <= {MAX_TOKENS}")
        body = head


def token_limit(geometry: Geometry | None) -> int:
    """The most tokens a sink, window, budget or context may be: the model's positions (MAX_TOKENS without a model)."""
    return min(MAX_TOKENS, (geometry.max_positions if geometry is not None else None) or MAX_TOKENS)


def check_sink_window(sink: int | None, window: int | None, geometry: Geometry | None = None, prefix: str = "") -> None:
    """--sink and --window: whole numbers the model can hold (checked before a model loads, then with it)."""
    limit = token_limit(geometry)
    bound = "the model's positions" if geometry is not None and geometry.max_positions else "the largest allowed"
    for what, value, low in (("--sink", sink, 0), ("--window", window, 1)):
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= limit):
            raise HeadwiseError(f"{prefix}{what} must be a whole number in [{low}, {limit}] ({bound}), got {value}")


def _check_sizes(spec: str, geometry: Geometry, sink: int | None, window: int | None, context: int | None) -> None:
    check_sink_window(sink, window, geometry, prefix=f"policy '{spec}': ")
    if context is not None and not (isinstance(context, int) and context >= 1):
        raise HeadwiseError(f"policy '{spec}': the context must be a positive number of tokens, got {context}")
    if context is not None and context > token_limit(geometry):
        raise HeadwiseError(f"policy '{spec}': a prompt of {context} tokens is longer than this model allows "
                            f"({token_limit(geometry)}); use a shorter prompt or context")


def _parse(raw: str) -> tuple[RegisteredPolicy | None, str, str | None, str | None, dict[str, Any]]:
    """(the registered policy or None for a FILE.json, the body, ARG, AMOUNT, options), or a one-line error."""
    if not raw:
        raise HeadwiseError("empty policy spec; use one of " + ", ".join(registered_policies()))
    body, options = _split_options(raw, raw)
    if body.endswith(".json"):
        return None, body, None, None, options
    name, sep, rest = re.match(r"([^:@]*)([:@]?)(.*)", body).groups()
    if name not in _REGISTERED:
        raise HeadwiseError(f"unknown policy '{raw}'; use one of {', '.join(registered_policies())}")
    kind = _REGISTERED[name]
    arg, amount = None, None
    if sep == ":":
        arg, _, amount = rest.rpartition("@") if "@" in rest else (rest, "", None)
    elif sep == "@":
        amount = rest
    if (arg is not None and not arg) or amount == "":
        raise HeadwiseError(f"policy '{raw}': nothing after '{':' if arg == '' else '@'}'; the syntax is {kind.syntax}")
    if arg is not None and not kind.arg:
        raise HeadwiseError(f"policy '{raw}': {name} takes no ':' argument; the syntax is {kind.syntax}")
    if kind.amount == "none" and kind.arg is False and (arg is not None or amount is not None):
        raise HeadwiseError(f"policy '{raw}': {name} takes no argument; the syntax is {kind.syntax}")
    if kind.arg and arg is None:
        raise HeadwiseError(f"policy '{raw}': {name} needs its ':' argument; the syntax is {kind.syntax}")
    if amount is not None and kind.amount == "none":
        raise HeadwiseError(f"policy '{raw}': {name} takes no argument or '@' amount; the syntax is {kind.syntax}")
    if amount is None and kind.amount == "required":
        raise HeadwiseError(f"policy '{raw}': {name} needs an amount; the syntax is {kind.syntax}")
    given = {k for k, v in options.items() if v}
    if given and not kind.options:
        raise HeadwiseError(f"policy '{raw}': {name} takes no options: it has no streaming heads to shape and no full "
                            f"heads to store in fewer bits")
    if given - kind.options:
        spell = {"mid": "midM", "tail": "tailN", "early": "earlyL", "stride": "strideK", "blocks": "blocksK",
                 "q": "q8/+q4/+q2"}
        allowed = ", ".join("+" + spell.get(o, o) for o in OPTIONS if o in kind.options) or "none"
        raise HeadwiseError(f"policy '{raw}': {name} takes no option "
                            f"{', '.join('+' + spell.get(o, o) for o in OPTIONS if o in given - kind.options)} "
                            f"(its options: {allowed})")
    return kind, body, arg, amount, options


def check_spec(spec: str) -> None:
    """The spec's grammar alone (names, arguments, options), before a model is loaded to build it."""
    _parse(spec.strip())


def parse_policy(spec: str, geometry: Geometry, *, atlas: Any = None, context: int | None = None,
                 sink: int | None = None, window: int | None = None, dtype_bytes: int = 4) -> CachePolicy:
    """Turn a policy spec (see the module docstring) into a policy for a prompt of `context` tokens.

    sink / window: the streaming heads' shape when not the policy's own default (64 + 256 for the
    head policies, 4 sinks for StreamingLLM). dtype_bytes: the model's (LoadedModel.dtype_bytes; 4 for
    float32), in which a budget `@kvB` is a share of the full cache.
    """
    raw = spec.strip()
    kind, body, arg, amount, options = _parse(raw)
    _check_sizes(raw, geometry, sink, window, context)
    if options["mid"] > token_limit(geometry):
        raise HeadwiseError(f"policy '{raw}': +mid{options['mid']} keeps more tokens than this model has positions "
                            f"({token_limit(geometry)})")
    if kind is None:
        policy = _from_file(raw, body, options, geometry, sink, window)
    else:
        policy = kind.build(PolicyRequest(raw, kind.name, arg, amount, options, geometry, atlas, context, sink, window,
                                          dtype_bytes))
    policy.check(geometry)
    policy.name = raw
    return policy


def _from_file(raw: str, path: str, options: dict[str, Any], geometry: Geometry, sink: int | None,
               window: int | None) -> CachePolicy:
    if sink is not None or window is not None:
        raise HeadwiseError(f"policy '{raw}': a saved policy has its own sinks and window; drop --sink/--window")
    policy = CachePolicy.load(path)
    # A hand-edited file must not ask for more tokens than the model has (it would allocate them up front).
    if isinstance(policy, HeadPolicy):
        check_sink_window(policy.sink, policy.window, geometry, prefix=f"policy '{raw}' file: ")
    if not any(options.values()):
        return policy
    if not isinstance(policy, HeadPolicy):
        raise HeadwiseError(f"policy '{raw}': options apply to head policies only, not to a {policy.policy_type} file")
    # The spec's options add to the file's (replace() checks the combination again); a prefill option replaces its.
    tail = {k: options[k] for k in _TAIL}
    none = dict.fromkeys(_TAIL, 0)
    prefill = {"prefill": "bounded", **none} if options["bounded"] else {"prefill": "tail", **tail} \
        if any(tail.values()) else {"prefill": "whole", **none} if options["whole"] else {}
    return replace(policy, compensate=policy.compensate or options["comp"], middle=options["mid"] or policy.middle,
                   quant=options["q"] or policy.quant, **prefill)


# ---- the built-in policies --------------------------------------------------------------------
def _full(r: PolicyRequest) -> CachePolicy:
    return HeadPolicy.full_cache(r.geometry, quant=r.options["q"])


def _streaming(r: PolicyRequest) -> CachePolicy:
    shape = r.shape(sink=STREAMINGLLM_SINK)
    if r.amount is not None:  # its own window, whatever --window says for the other policies of a run
        x = r.number(r.amount)
        if x <= 0:
            raise r.fail("X must be above 0: a share of the full cache (< 1) or a window in tokens (>= 1)")
        if x < 1:
            context = r.need_context("a share sizes the window")
            # X of the full cache: sinks, middle tokens and window together.
            window = round(x * context) - shape["sink"] - shape["middle"]
            if window < 1:
                raise r.fail(f"{x:g} of {context} tokens leaves no room for a window after {shape['sink']} sinks"
                             + (f" and {shape['middle']} middle tokens" if shape["middle"] else ""))
            shape["window"] = window
        elif x != int(x) or x > token_limit(r.geometry):
            raise r.fail(f"a window is a whole number of tokens up to {token_limit(r.geometry)} (the model's "
                         f"positions), not {r.amount}")
        else:
            shape["window"] = int(x)
    return HeadPolicy.streaming(r.geometry, **shape)


def _headwise(r: PolicyRequest) -> CachePolicy:
    if r.atlas is None:
        raise r.fail("needs an atlas (--atlas DIR from headwise profile)")
    score, _, direction = r.arg.partition(":")
    if direction not in ("", "high", "low"):
        raise r.fail(f"direction must be 'high' or 'low', not '{direction}'")
    higher = None if not direction else direction == "high"
    return HeadPolicy.from_atlas(r.atlas, score, **r.head_amount(), higher_is_full=higher, **r.shape())


def _razor(r: PolicyRequest) -> CachePolicy:
    if r.atlas is None:
        raise r.fail("needs an atlas (--atlas DIR from headwise profile)")
    shape = {**r.shape(), "compensate": True}  # RazorAttention's compensation token is part of the method
    return HeadPolicy.from_atlas(r.atlas, "razor", **r.head_amount(), **shape)


def _random(r: PolicyRequest) -> CachePolicy:
    amount, _, seed = (r.amount or "").partition(":")
    return HeadPolicy.random(r.geometry, **r.head_amount(amount), seed=r.seed(seed) if seed else 0, **r.shape())


def _duo(r: PolicyRequest) -> CachePolicy:
    return HeadPolicy.from_duo_file(r.arg, r.geometry, **r.head_amount(), **r.shape())


def _snapkv(r: PolicyRequest) -> CachePolicy:
    x = r.number(r.amount)
    if x <= 0 or (x >= 1 and (x != int(x) or x > token_limit(r.geometry))):
        raise r.fail(f"X must be a share of the prompt in (0, 1) or a whole number of tokens per head up to "
                     f"{token_limit(r.geometry)} (the model's positions)")
    return SnapKVPolicy(r.geometry, budget=x)


_HEAD_OPTIONS = ("comp", "whole", "bounded", "tail", "early", "stride", "blocks", "mid", "q")
register_policy("full", _full, syntax="full[+q8|+q4|+q2]", options=("q",), amount="none")
register_policy("streaming", _streaming, syntax="streaming[@X]", options=_HEAD_OPTIONS, amount="optional")
register_policy("headwise", _headwise, syntax="headwise:SCORE[:high|:low]@F", options=_HEAD_OPTIONS, arg=True)
register_policy("razor", _razor, syntax="razor@F", options=_HEAD_OPTIONS)
register_policy("random", _random, syntax="random@F[:SEED]", options=_HEAD_OPTIONS)
register_policy("duo", _duo, syntax="duo:FILE@F", options=_HEAD_OPTIONS, arg=True)
register_policy("snapkv", _snapkv, syntax="snapkv@X")
register_policy("compresskv", build_compresskv, syntax="compresskv@X")  # needs an atlas (kv/compresskv.py)

__all__ = ["OPTIONS", "PolicyRequest", "check_sink_window", "check_spec", "parse_policy", "register_policy",
           "registered_policies", "token_limit"]
