"""AttentionInfluence on smollm2-135m: which kinds of document does masking a role's heads hurt most,
and does the ranking differ from masking random heads?

    python bench/influence_demo.py [--atlas bench/results/atlas-smollm2-retrieval.json] [--per-kind 8]

Corpus (seeded, from the bundled prose): `prose` passages of 256 tokens (2 x per-kind, spread over
the four books), `shuffled` (other passages, words in random order), `repeated` (a 128-token passage
twice in a row) and `list` (numbered lists of words from the prose). Conditions, all rows of the same
forward passes (headwise.influence.document_losses, the engine influence_scores runs): clean, the
retrieval role's labelled heads, the induction role's top heads by its score (the same k), and k random
heads with seeds 0, 1, 2 drawn from the heads outside both role sets. Score: (masked - clean) / clean.
influence_scores itself is run on a few documents and must give the same numbers.

Writes bench/results/influence_demo.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

import headwise
from headwise.atlas import Atlas, versions
from headwise.influence import document_losses, influence_scores, random_heads, role_heads
from headwise.instrument import ablation_scale
from headwise.probes import load_text

RESULTS = Path(__file__).parent / "results" / "influence_demo.json"
SEEDS = (0, 1, 2)
TOKENS = 256


def _passages(tok, books: list[str], n: int, tokens: int, rng: np.random.Generator) -> list[str]:
    """n passages of about `tokens` tokens from the middle 80% of the books, each starting at a sentence."""
    out = []
    for i in range(n):
        book = books[i % len(books)]
        start = int(rng.integers(len(book) // 10, len(book) * 9 // 10))
        start = book.find(". ", start) + 2
        ids = tok(" ".join(book[start:start + tokens * 8].split()), add_special_tokens=False).input_ids
        out.append(tok.decode(ids[:tokens]))
    return out


def _corpus(tok, per_kind: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    books = load_text()
    docs = [("prose", p) for p in _passages(tok, books, 2 * per_kind, TOKENS, rng)]
    for p in _passages(tok, books, per_kind, TOKENS, rng):
        words = p.split()
        docs.append(("shuffled", " ".join(words[i] for i in rng.permutation(len(words)))))
    docs += [("repeated", p + " " + p) for p in _passages(tok, books, per_kind, TOKENS // 2, rng)]
    vocab = sorted({w.lower() for w in re.findall(r"[A-Za-z]{3,}", " ".join(books))})
    for _ in range(per_kind):
        lines, n = [], 0
        while n < TOKENS:
            lines.append(f"{len(lines) + 1}. {vocab[int(rng.integers(len(vocab)))]}")
            n = len(tok("\n".join(lines), add_special_tokens=False).input_ids)
        docs.append(("list", "\n".join(lines[:-1])))
    return docs


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))  # scores are continuous: no ties
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1 = the highest score (ties: input order, as influence_scores ranks)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    ranks = np.empty(len(scores), dtype=int)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atlas", default=str(Path(__file__).parent / "results" / "atlas-smollm2-retrieval.json"))
    p.add_argument("--per-kind", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    loaded = headwise.load("smollm2-135m")
    atlas = Atlas.load(args.atlas)
    atlas.check_model(loaded.info, loaded.geometry)
    g = loaded.geometry
    retrieval = role_heads(atlas, "retrieval")
    k = len(retrieval)
    induction = role_heads(atlas, "induction", k=k)  # the atlas labels fewer: the same k keeps them comparable
    rest_of = sorted(set(retrieval) | set(induction))
    randoms = {f"random_seed{s}": random_heads(g.n_layers, g.n_heads, k, s, exclude=rest_of) for s in SEEDS}
    conditions = {"retrieval": retrieval, "induction": induction, **randoms}
    docs = _corpus(loaded.tokenizer, args.per_kind, args.seed)
    kinds = [kind for kind, _ in docs]
    ids = [loaded.tokenizer(text).input_ids[:1024] for _, text in docs]
    scales = torch.stack([torch.ones(g.n_layers, g.n_heads), *(ablation_scale(g, h) for h in conditions.values())])
    t0 = time.time()
    losses = document_losses(loaded, ids, scales).numpy()
    seconds = time.time() - t0
    clean = losses[0]
    scores = {name: (losses[1 + i] - clean) / clean for i, name in enumerate(conditions)}

    # The public path on a few documents: the same numbers.
    check = [0, len(docs) - 1]
    got = influence_scores(loaded, atlas, [docs[i][1] for i in check], role="retrieval")
    diff = max(abs(d.score - scores["retrieval"][check[d.index]]) for d in got.ranked)
    assert diff < 1e-5, diff

    kind_names = sorted(set(kinds), key=kinds.index)
    per_kind = {}
    for kind in kind_names:
        rows = [i for i, k_ in enumerate(kinds) if k_ == kind]
        per_kind[kind] = {"documents": len(rows), "mean_tokens": float(np.mean([len(ids[i]) for i in rows])),
                          "mean_clean_loss": float(clean[rows].mean()),
                          **{name: {"mean_score": float(s[rows].mean()), "mean_rank": float(_ranks(s)[rows].mean())}
                             for name, s in scores.items()}}
    prose = [i for i, k_ in enumerate(kinds) if k_ == "prose"]
    spearman = {role: {name: {"all": _spearman(scores[role], scores[name]),
                              "prose_only": _spearman(scores[role][prose], scores[name][prose])}
                       for name in conditions if name != role} for role in ("retrieval", "induction")}
    result = {
        "benchmark": "AttentionInfluence document ranking on smollm2-135m: role heads vs random heads",
        "command": "python bench/influence_demo.py " + " ".join(sys.argv[1:]),
        "model": loaded.info.to_dict(),
        "atlas": {"path": os.path.relpath(args.atlas, Path(__file__).parent.parent),
                  "sha256": hashlib.sha256(Path(args.atlas).read_bytes()).hexdigest()},
        "settings": {"per_kind": args.per_kind, "seed": args.seed, "tokens": TOKENS, "k": k,
                     "score": "(masked_loss - clean_loss) / clean_loss, mean next-token loss per document",
                     "ablation": "head output multiplied by 0 before the output projection",
                     "random_heads": f"numpy default_rng(seed).choice of k heads outside the {len(rest_of)} heads "
                                     f"of the two role sets",
                     "threads": torch.get_num_threads()},
        "heads": {name: [list(h) for h in heads] for name, heads in conditions.items()},
        "induction_labelled_in_atlas": [list(h) for h in atlas.heads_with_role("induction")],
        "overlap_retrieval_induction": len(set(retrieval) & set(induction)),
        "per_kind": per_kind,
        "spearman_vs_role": spearman,
        "influence_scores_check": {"documents": check, "max_abs_diff": diff},
        "documents": [{"kind": kind, "tokens": len(ids[i]), "clean_loss": float(clean[i]),
                       **{name: float(s[i]) for name, s in scores.items()}, "text": text[:80]}
                      for i, (kind, text) in enumerate(docs)],
        "versions": versions(), "machine": platform.machine(), "loadavg": list(os.getloadavg()),
        "forward_seconds": round(seconds, 1), "wall_seconds": round(time.time() - started, 1),
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    for kind, row in per_kind.items():
        print(f"{kind:9s} clean {row['mean_clean_loss']:.3f}  " + "  ".join(
            f"{name} {row[name]['mean_score']:+.4f} (rank {row[name]['mean_rank']:.1f})" for name in conditions))
    for role, row in spearman.items():
        print(f"spearman {role}: " + ", ".join(f"{n} {v['all']:+.2f} (prose {v['prose_only']:+.2f})"
                                               for n, v in row.items()))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
