"""Train the `toy_induction` test fixture: a 2-layer, attention-only Llama with induction heads.

Usage (from the repo root)::

    HF_HUB_OFFLINE=1 .venv/bin/python tests/data/make_toy_induction.py

Running it rewrites ``tests/data/toy_induction/`` (config.json, model.safetensors, heads.json).

Model
    ``transformers.LlamaForCausalLM`` from a ``LlamaConfig``: 2 layers, hidden 64, 4 query heads and
    4 KV heads (plain multi-head attention, no GQA), head_dim 16, RoPE, untied embeddings,
    vocab 96 laid out like ``tests/conftest.py::tiny_tokenizer`` (0 = <pad>, 1 = <bos>, 2 = <eos>,
    3..95 = content tokens t0..t92).  The MLPs are disabled: ``down_proj`` is zeroed and every MLP
    parameter (and the unused ``post_attention_layernorm``) is frozen, so each MLP outputs exactly 0
    and only attention, the input norms, the final norm and the embeddings are trained.

Data
    ``[BOS] + block + block`` where ``block`` is n distinct content tokens, n uniform in 8..40;
    right-padded with <pad> to 81 tokens (padding is at the end, so causal attention means it never
    influences the real positions, and it is excluded from the loss).  Next-token cross-entropy on
    every real position.

Evaluation (on the model re-loaded from disk, default attention implementation)
    A fixed held-out set of 200 sequences (own seed).  Losses are computed per region:
      * first copy  -- predicting block tokens 1..n of the first copy (inherently unpredictable;
        the optimum is the mean of log(93 - k), k = 0..n-1, because tokens within a block are
        distinct);
      * second copy -- predicting block tokens 2..n of the second copy, i.e. from query positions
        n+1 .. 2n-1.  The first token of the second copy is excluded: nothing earlier in context
        says the block has ended, so it is not predictable by induction.
    Ablation: for each (layer, head), a forward pre-hook on ``self_attn.o_proj`` zeroes input columns
    [h*head_dim, (h+1)*head_dim) (that head's output) and the second-copy loss is re-measured.
    Attention facts (informational) use ``attn_implementation="eager"`` + ``output_attentions=True``
    over the same second-copy query positions q: mean weight on key q-1 (previous token) and on key
    q-(n-1) (the token after the earlier occurrence of the current token = induction target).

Determinism: fixed seeds, ``torch.use_deterministic_algorithms(True)``, ``torch.set_num_threads(2)``.
Two runs on the reference machine (2 CPU cores, torch 2.13.0+cpu, transformers 5.23.0) produced
byte-identical model.safetensors files.  Run time there: see ``RUNTIME_NOTE`` (also in heads.json).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

OUT = Path(__file__).resolve().parent / "toy_induction"

RUNTIME_NOTE = "about 70 s of training, about 80 s end to end, on 2 CPU cores (torch 2.13.0+cpu)"

SEED = 0
EVAL_SEED = 12345
PAD, BOS, EOS = 0, 1, 2
FIRST_CONTENT = 3
VOCAB = 96
N_MIN, N_MAX = 8, 40
SEQ_LEN = 1 + 2 * N_MAX
N_EVAL = 200

TRAIN = dict(
    steps=1200,
    batch_size=64,
    lr=3e-3,
    warmup_steps=100,
    schedule="linear warmup then cosine decay to 10% of lr",
    weight_decay=0.01,  # matrices and embeddings only; norms have none
    betas=(0.9, 0.98),
    grad_clip=1.0,
    head_group_lasso=0.0,
    loss="next-token cross-entropy over all real (non-pad) positions",
)


def make_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


def make_batch(gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (input_ids [B, SEQ_LEN], block lengths [B])."""
    ids = torch.full((batch_size, SEQ_LEN), PAD, dtype=torch.long)
    ns = torch.randint(N_MIN, N_MAX + 1, (batch_size,), generator=gen)
    n_content = VOCAB - FIRST_CONTENT
    for b in range(batch_size):
        n = int(ns[b])
        block = torch.randperm(n_content, generator=gen)[:n] + FIRST_CONTENT
        ids[b, 0] = BOS
        ids[b, 1 : 1 + n] = block
        ids[b, 1 + n : 1 + 2 * n] = block
    return ids, ns


def region_masks(ns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks over *query* positions (the position whose logits predict token pos+1).

    real:   positions 0 .. 2n-1 (all predictions of real tokens)
    first:  positions 0 .. n-1   (predict first-copy tokens 1..n)
    second: positions n+1 .. 2n-1 (predict second-copy tokens 2..n)
    """
    pos = torch.arange(SEQ_LEN)[None, :]
    n = ns[:, None]
    real = pos < 2 * n
    first = pos < n
    second = (pos >= n + 1) & (pos < 2 * n)
    return real, first, second


def per_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits[:, t] against ids[:, t+1]; last position gets 0."""
    lp = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    return F.pad(lp, (0, 1))


def lr_at(step: int) -> float:
    base, warm, total = TRAIN["lr"], TRAIN["warmup_steps"], TRAIN["steps"]
    if step < warm:
        return base * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(make_config())
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()
    for name, p in model.named_parameters():
        if ".mlp." in name or "post_attention_layernorm" in name:
            p.requires_grad_(False)
    return model


def head_norms(model: LlamaForCausalLM) -> torch.Tensor:
    """Frobenius norm of each head's block of o_proj columns, [layers, heads]."""
    cfg = model.config
    return torch.stack([
        layer.self_attn.o_proj.weight.view(cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim).norm(dim=(0, 2))
        for layer in model.model.layers
    ])


def train(model: LlamaForCausalLM) -> list[dict]:
    gen = torch.Generator().manual_seed(SEED + 1)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": TRAIN["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=TRAIN["lr"], betas=TRAIN["betas"],
    )
    model.train()
    log = []
    for step in range(TRAIN["steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, ns = make_batch(gen, TRAIN["batch_size"])
        real, first, second = region_masks(ns)
        logits = model(input_ids=ids).logits
        tok = per_token_loss(logits, ids)
        loss = (tok * real).sum() / real.sum()
        objective = loss + TRAIN["head_group_lasso"] * head_norms(model).sum()
        opt.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], TRAIN["grad_clip"])
        opt.step()
        if step % 100 == 0 or step == TRAIN["steps"] - 1:
            with torch.no_grad():
                entry = {
                    "step": step,
                    "loss": round(loss.item(), 4),
                    "first_copy": round(((tok * first).sum() / first.sum()).item(), 4),
                    "second_copy": round(((tok * second).sum() / second.sum()).item(), 4),
                }
            log.append(entry)
            print(entry, flush=True)
    model.eval()
    return log


@torch.no_grad()
def region_losses(model, ids, ns) -> dict[str, float]:
    _, first, second = region_masks(ns)
    tok = per_token_loss(model(input_ids=ids).logits, ids)
    return {
        "first_copy": ((tok * first).sum() / first.sum()).item(),
        "second_copy": ((tok * second).sum() / second.sum()).item(),
    }


@torch.no_grad()
def ablation_matrix(model, ids, ns, clean: dict[str, float]):
    cfg = model.config
    hd = cfg.head_dim
    second_delta, first_delta = [], []
    for layer in model.model.layers:
        row_s, row_f = [], []
        for h in range(cfg.num_attention_heads):
            def hook(module, args, h=h):
                x = args[0].clone()
                x[..., h * hd : (h + 1) * hd] = 0
                return (x,) + tuple(args[1:])

            handle = layer.self_attn.o_proj.register_forward_pre_hook(hook)
            try:
                abl = region_losses(model, ids, ns)
            finally:
                handle.remove()
            row_s.append(abl["second_copy"] - clean["second_copy"])
            row_f.append(abl["first_copy"] - clean["first_copy"])
        second_delta.append(row_s)
        first_delta.append(row_f)
    return second_delta, first_delta


@torch.no_grad()
def attention_facts(path: Path, ids, ns):
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    attns = model(input_ids=ids, output_attentions=True).attentions  # per layer [B, H, Q, K]
    _, _, second = region_masks(ns)
    b_idx, q_idx = second.nonzero(as_tuple=True)
    prev_k = q_idx - 1
    ind_k = q_idx - (ns[b_idx] - 1)
    prev, ind = [], []
    for a in attns:
        a = a.float()
        prev.append(a[b_idx, :, q_idx, prev_k].mean(0).tolist())
        ind.append(a[b_idx, :, q_idx, ind_k].mean(0).tolist())
    return prev, ind


def rnd(x, nd=4):
    if isinstance(x, list):
        return [rnd(v, nd) for v in x]
    return round(float(x), nd)


def main() -> None:
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    model = build_model()
    log = train(model)
    train_s = time.time() - t0

    OUT.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "config.json", "generation_config.json", "heads.json"):
        (OUT / stale).unlink(missing_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    # Keep the fixture to config.json + model.safetensors (+ heads.json below).
    (OUT / "generation_config.json").unlink(missing_ok=True)

    # Evaluate the model exactly as stored.
    model = LlamaForCausalLM.from_pretrained(OUT).eval()
    for layer in model.model.layers:
        assert torch.count_nonzero(layer.mlp.down_proj.weight) == 0
    gen = torch.Generator().manual_seed(EVAL_SEED)
    ids, ns = make_batch(gen, N_EVAL)
    clean = region_losses(model, ids, ns)
    second_delta, first_delta = ablation_matrix(model, ids, ns, clean)
    prev, ind = attention_facts(OUT, ids, ns)

    first_copy_optimum = sum(
        sum(math.log(VOCAB - FIRST_CONTENT - k) for k in range(int(n))) for n in ns
    ) / float(ns.sum())

    # Role labels, derived from the numbers above:
    #   induction head      = layer >= 1 head whose ablation raises second-copy loss by >= 25% of the
    #                         largest single-head increase AND attends >= 0.3 to the induction offset;
    #   previous-token head = layer-0 head attending >= 0.5 to the previous token on the second copy.
    biggest = max(max(r) for r in second_delta)
    induction = [[li, h] for li in range(1, len(second_delta)) for h in range(len(second_delta[li]))
                 if second_delta[li][h] >= 0.25 * biggest and ind[li][h] >= 0.3]
    previous = [[0, h] for h in range(len(prev[0])) if prev[0][h] >= 0.5]
    total_s = time.time() - t0

    cfg = model.config
    heads = {
        "description": "Ground truth for the toy induction fixture; produced by tests/data/make_toy_induction.py.",
        "architecture": {
            "class": "LlamaForCausalLM",
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size,
            "attention_only": "MLP down_proj zeroed and all MLP params frozen: MLP output is exactly 0",
            "tokens": {"pad": PAD, "bos": BOS, "eos": EOS, "content": [FIRST_CONTENT, VOCAB - 1]},
        },
        "task": {
            "sequence": "[BOS] + block + block, block = n distinct content tokens, right-padded with pad to "
                        f"{SEQ_LEN}",
            "n_range": [N_MIN, N_MAX],
            "first_copy_positions": "query positions 0..n-1 (predict first-copy tokens 1..n)",
            "second_copy_positions": "query positions n+1..2n-1 (predict second-copy tokens 2..n; the first "
                                     "token of the second copy is not inducible and is excluded)",
            "induction_offset": "n-1 (key = token after the earlier occurrence of the current token)",
        },
        "training": {**TRAIN, "betas": list(TRAIN["betas"]), "seed": SEED, "data_seed": SEED + 1,
                     "frozen": "all mlp.* params and post_attention_layernorm", "log": log},
        "eval": {"n_sequences": N_EVAL, "seed": EVAL_SEED,
                 "ablation": "forward pre-hook on self_attn.o_proj zeroing input columns "
                             "[h*head_dim, (h+1)*head_dim); default attention implementation"},
        "losses": {
            "first_copy": rnd(clean["first_copy"]),
            "second_copy": rnd(clean["second_copy"]),
            "first_copy_optimum": rnd(first_copy_optimum),
            "log_vocab_content": rnd(math.log(VOCAB - FIRST_CONTENT)),
        },
        "ablation_second_copy_loss_increase": rnd(second_delta),
        "ablation_first_copy_loss_increase": rnd(first_delta),
        "attention_previous_token": rnd(prev),
        "attention_induction_offset": rnd(ind),
        "roles": {
            "previous_token_heads": previous,
            "induction_heads": induction,
            "rule": "induction: layer>=1, ablation increase >= 0.25 * max increase and induction-offset "
                    "attention >= 0.3; previous-token: layer 0, previous-token attention >= 0.5",
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "runtime": {"note": RUNTIME_NOTE, "this_run_train_seconds": round(train_s, 1),
                    "this_run_total_seconds": round(total_s, 1), "threads": torch.get_num_threads()},
    }
    (OUT / "heads.json").write_text(json.dumps(heads, indent=1) + "\n")

    print(f"train {train_s:.1f}s, total {total_s:.1f}s")
    print("losses", heads["losses"])
    print("ablation (second copy):")
    for li, row in enumerate(heads["ablation_second_copy_loss_increase"]):
        print(f"  L{li}", row)
    print("prev-token attn", heads["attention_previous_token"])
    print("induction attn", heads["attention_induction_offset"])
    print("roles", heads["roles"])


if __name__ == "__main__":
    main()
