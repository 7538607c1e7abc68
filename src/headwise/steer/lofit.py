"""LoFiT: localized fine-tuning on head representations (Yin, Ye & Durrett, NeurIPS 2024, arXiv 2406.01563).

Two steps, both trained by gradient descent on task.train while the model's weights stay frozen:

1. Head selection. Every head h of every layer gets a scaling vector A_h (head_dim numbers), applied
   to its attention output before the output projection, out_h <- (1 + A_h) * out_h (the authors'
   models/modeling_llama.py), with an L1 penalty lambda * sum|A| added to the loss. The heads with the
   largest ||A_h||_2 are kept: K = round(3% of all heads), at least 1 (270 heads of smollm2 -> 8).
2. Bias tuning. The scalings are discarded; each chosen head gets an offset v_h, out_h <- out_h + v_h at
   every position (prompt and answer alike), trained with the same loss and no L1 (their scripts).

The loss is the cross-entropy of the answer tokens only, teacher-forced, after the zero-shot prompt
"Q: x\\nA:" followed by " target" and the end-of-sequence token (the paper's SFT data ends with </s>,
and greedy decoding stops there). As in their scripts: A and v start at N(0, 1e-3), AdamW without
weight decay, learning rate decaying linearly to 0, batches of 8, 5 epochs; A at lr 5e-4 with
lambda 5e-3 (their Llama-2-7B CLUTRR script).

The edit: out_h + strength * v_h on the chosen heads (strength 0 adds nothing). `heads=` skips step 1
and tunes offsets on exactly those heads (the random-heads control).

Departures, for a CPU budget of about a minute per stage on smollm2-135m with one thread: at most
`max_pairs` = 100 training pairs (the paper uses 300-1000), so 5 epochs are 65 optimizer steps per stage.
With that few steps the paper's v learning rate (1e-2) barely moves the answer: it was chosen on a
validation slice of train (30% held out of task.train, seed 1234; never the test split) among 1e-2,
3e-2 and 1e-1: country_capital 0.00 / 0.36 / 0.33, antonyms 0.54 / 0.66 / 0.66 (zero-shot 0.00,
0.02), so v trains at lr 3e-2.
Padding is on the right without an attention mask: under causal attention no real token sees a pad,
so the logits of the real tokens are exactly those of the unpadded pair.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._progress import progress
from ..errors import HeadwiseError
from ..geometry import Geometry
from ..instrument import HeadEdits, Session
from ..parts import final_hidden, lm_logits
from ..tasks import Pair, encode, query
from .base import Steering, register_method

DEFAULTS: dict[str, Any] = {"heads_fraction": 0.03, "k": None, "epochs": 5, "batch": 8, "max_pairs": 100,
                            "select_lr": 5e-4, "select_l1": 5e-3, "offset_lr": 3e-2, "offset_l1": 0.0,
                            "init_std": 1e-3}


def _add_offsets(out: Tensor, index: Tensor, offsets: Tensor) -> Tensor:
    """out [b, q, heads, d] with offsets [k, d] added to heads `index` (out of place, so it differentiates)."""
    b, q, _, d = out.shape
    return out.index_add(2, index, offsets.to(out.dtype)[None, None].expand(b, q, len(index), d))


def _by_layer(heads: Sequence[tuple[int, int]], offsets: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
    """layer -> (its chosen heads, their rows of `offsets`); heads are in the order of offsets' rows."""
    rows: dict[int, list[int]] = {}
    for row, (layer, _) in enumerate(heads):
        rows.setdefault(layer, []).append(row)
    return {layer: (torch.tensor([heads[r][1] for r in r_list], device=offsets.device),
                    offsets[torch.tensor(r_list, device=offsets.device)]) for layer, r_list in rows.items()}


def _examples(loaded: Any, pairs: Sequence[Pair]) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) of "Q: x\\nA:" + " target" (+ EOS), tokenized as greedy decoding sees it."""
    tok = loaded.tokenizer
    eos = [tok.eos_token_id] if isinstance(tok.eos_token_id, int) else []
    out = []
    for pair in pairs:
        prompt = encode(tok, query(pair.prompt))
        # the answer as the whole text tokenizes (sentencepiece would split a lone " target" differently)
        whole = encode(tok, query(pair.prompt) + " " + pair.target)
        answer = whole[len(prompt):] if whole[:len(prompt)] == prompt else \
            list(tok(" " + pair.target, add_special_tokens=False).input_ids)
        out.append((prompt + answer + (eos if answer[-1:] != eos else []), len(prompt)))
    return out


def _train(loaded: Any, examples: list[tuple[list[int], int]], params: Tensor, output: Callable[[int, Tensor], Tensor],
           *, lr: float, l1: float, epochs: int, batch: int, generator: torch.Generator, desc: str) -> float:
    """AdamW on `params` (model frozen) on the answer tokens' cross-entropy + l1 * sum|params|; last epoch's loss."""
    model = loaded.model
    device = loaded.device
    steps_per_epoch = math.ceil(len(examples) / batch)
    optimizer = torch.optim.AdamW([params], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / (epochs * steps_per_epoch))
    flags = [p.requires_grad for p in model.parameters()]
    last = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)  # only the LoFiT vectors take gradients; the backward skips weight grads
        bar = progress(range(epochs * steps_per_epoch), desc=desc, unit="step")
        order: list[int] = []
        for step in bar:
            if step % steps_per_epoch == 0:
                order = torch.randperm(len(examples), generator=generator).tolist()
                last = []
            chunk = [examples[i] for i in order[(step % steps_per_epoch) * batch:][:batch]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([ids + [ids[-1]] * (width - len(ids)) for ids, _ in chunk], device=device)
            # position t predicts token t+1: the answer tokens are predicted from positions n_prompt-1 .. len-2
            rows = torch.tensor([r for r, (seq, n) in enumerate(chunk) for _ in range(n - 1, len(seq) - 1)])
            cols = torch.tensor([t for seq, n in chunk for t in range(n - 1, len(seq) - 1)])
            with Session(loaded.geometry, edits=HeadEdits(output=output)):
                hidden = final_hidden(model, ids)[rows.to(device), cols.to(device)]
            logits = lm_logits(model, hidden).float()
            ce = torch.nn.functional.cross_entropy(logits, ids[rows.to(device), cols.to(device) + 1])
            loss = ce + l1 * params.abs().sum() if l1 else ce
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            last.append(float(ce.detach()))
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return sum(last) / len(last)


class LoFiT(Steering):
    """Offsets added to the outputs of the K heads whose learned scalings grew most (LoFiT)."""

    method = "lofit"
    description = "learned per-head offset vectors on heads chosen by L1-regularised per-head scaling (LoFiT)"

    def __init__(self, geometry: Geometry, heads: Sequence[tuple[int, int]], offsets: Tensor, strength: float = 1.0,
                 settings: dict[str, Any] | None = None):
        order = sorted(range(len(heads)), key=lambda i: tuple(heads[i]))
        super().__init__(geometry, heads, strength, settings)
        self.offsets = offsets.detach().float()[order] if len(heads) else offsets.detach().float()

    @classmethod
    def fit(cls, loaded: Any, task: Any, *, heads: Sequence[tuple[int, int]] | None = None, seed: int = 0,
            **options: Any) -> LoFiT:
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise HeadwiseError(f"lofit has no option {', '.join(unknown)}; choose from {', '.join(DEFAULTS)}")
        opt = {**DEFAULTS, **options}
        if min(opt["epochs"], opt["batch"], opt["max_pairs"]) < 1:
            raise HeadwiseError("lofit epochs, batch and max_pairs must each be at least 1")
        geo, t0 = loaded.geometry, time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(task.train), generator=gen)[:opt["max_pairs"]].sort().values.tolist()
        examples = _examples(loaded, [task.train[i] for i in pick])
        train = dict(epochs=int(opt["epochs"]), batch=int(opt["batch"]), generator=gen)
        total = geo.n_layers * geo.n_heads
        settings: dict[str, Any] = {**opt, "seed": seed, "train_pairs": len(examples),
                                    "steps_per_stage": train["epochs"] * math.ceil(len(examples) / train["batch"])}
        if heads is None:
            k = opt["k"] if opt["k"] is not None else max(1, round(opt["heads_fraction"] * total))
            if not 1 <= k <= total:
                raise HeadwiseError(f"lofit k={k} is outside 1..{total} (this model's heads); pass a k in that range")
            scales = (torch.randn(geo.n_layers, geo.n_heads, geo.head_dim, generator=gen) * opt["init_std"])
            scales = scales.to(loaded.device).requires_grad_(True)
            loss = _train(loaded, examples, scales, lambda layer, out: out * (1 + scales[layer]).to(out.dtype),
                          lr=opt["select_lr"], l1=opt["select_l1"], desc="lofit: head selection", **train)
            norms = scales.detach().norm(dim=-1).cpu()
            top = torch.argsort(norms.flatten(), descending=True, stable=True)[:k].tolist()
            heads = [(i // geo.n_heads, i % geo.n_heads) for i in top]
            settings.update(selection="learned", k=k, selection_loss=loss, selection_parameters=scales.numel(),
                            selection_rank=[list(h) for h in heads],
                            selection_norms=[[round(float(x), 7) for x in row] for row in norms])
        else:
            heads = [(int(layer), int(head)) for layer, head in heads]
            if not heads or len(set(heads)) != len(heads):
                raise HeadwiseError("lofit heads= must list at least one head, each once")
            settings.update(selection="given", k=len(heads))
        cls(geo, heads, torch.zeros(len(heads), geo.head_dim))  # checks the heads before training on them
        offsets = (torch.randn(len(heads), geo.head_dim, generator=gen) * opt["init_std"]).to(loaded.device)
        offsets.requires_grad_(True)
        slots = _by_layer(heads, torch.arange(len(heads), device=loaded.device))

        def add(layer: int, out: Tensor) -> Tensor:
            if layer not in slots:
                return out
            index, rows = slots[layer]
            return _add_offsets(out, index, offsets[rows])

        settings["offset_loss"] = _train(loaded, examples, offsets, add, lr=opt["offset_lr"], l1=opt["offset_l1"],
                                         desc="lofit: offsets", **train)
        settings["fit_seconds"] = round(time.perf_counter() - t0, 2)
        return cls(geo, heads, offsets.detach().cpu(), settings=settings)

    def edits(self) -> HeadEdits:
        if self.strength == 0 or not self.heads:
            return HeadEdits()
        slots = _by_layer(self.heads, self.offsets * self.strength)
        cache: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}

        def output(layer: int, out: Tensor) -> Tensor:
            if layer not in slots:
                return out
            key = (layer, out.device)
            if key not in cache:
                cache[key] = tuple(t.to(out.device) for t in slots[layer])  # type: ignore[assignment]
            return _add_offsets(out, *cache[key])

        return HeadEdits(output=output)

    def tensors(self) -> dict[str, Tensor]:
        return {"offsets": self.offsets}

    def trained_parameters(self) -> int:
        return self.offsets.numel()  # the selection step's scalings are discarded (settings: selection_parameters)

    @classmethod
    def from_saved(cls, geometry: Geometry, heads: Sequence[tuple[int, int]], tensors: dict[str, Tensor],
                   settings: dict[str, Any], strength: float = 1.0) -> LoFiT:
        offsets = tensors.get("offsets")
        if offsets is None or tuple(offsets.shape) != (len(heads), geometry.head_dim) or set(tensors) != {"offsets"}:
            got = "no offsets" if offsets is None else f"offsets {list(offsets.shape)} and {sorted(tensors)}"
            raise HeadwiseError(f"a lofit steering holds offsets [{len(heads)}, {geometry.head_dim}] (one per head) "
                                f"only; this file has {got}; re-run headwise steer")
        return cls(geometry, heads, offsets, strength=strength, settings=settings)


register_method(LoFiT)

__all__ = ["DEFAULTS", "LoFiT"]
