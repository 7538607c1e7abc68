"""A new score family and a new cache policy, each defined here, outside src, registered with one
call, and run through the same paths as the built-in ones: `headwise profile --scores NAME` (atlas,
flags, roles, report) and the policy spec grammar, `headwise eval` and generation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

import headwise
from headwise import scores
from headwise.atlas import Atlas
from headwise.cli import main
from headwise.geometry import Geometry
from headwise.instrument import AttentionChunk
from headwise.kv import CachePolicy, HeadwiseCache, parse_policy, register_policy
from headwise.kv.layers import HeadwiseLayer, Store
from headwise.probes import natural_text
from headwise.roles import RoleRule
from headwise.scores import PerSequence, ProbeScoreFamily, Score, ScoreObserver, ScoreResult, Setting, mean_ratio
from tests.conftest import tiny_model, tiny_tokenizer
from tests.reference import eager_attentions


# ---- a score family: attention a head puts on the query's own token -----------------------
class _SelfObserver(ScoreObserver):
    def __init__(self, geometry: Geometry, skip: int):
        self.skip = skip
        self.mass = PerSequence(geometry)
        self.queries = PerSequence(geometry)

    def observe(self, chunk: AttentionChunk) -> None:
        rows = torch.nonzero(chunk.query_index >= self.skip).flatten()
        a = chunk.weights[:, :, rows]  # [b, h, q, keys]
        own = a.gather(-1, chunk.query_index[rows][None, None, :, None].expand(*a.shape[:3], 1))[..., 0]
        self.mass.add(chunk.layer, own.sum(-1))
        self.queries.add(chunk.layer, torch.full(a.shape[:2], len(rows), dtype=torch.float64))

    def result(self) -> ScoreResult:
        return ScoreResult(scores={"self_attention": mean_ratio(self.mass, self.queries)},
                           settings={"self_skip": self.skip})


class SelfAttentionScores(ProbeScoreFamily):
    family = "self"
    scores = (Score("self_attention", "mean attention on the query's own token", needs_full="low",
                    role=RoleRule("self", "self_attention", ">", 0.065, "this test")),)
    settings = (Setting("self_skip", 0, "first positions not scored", minimum=0),
                Setting("self_sequences", 2, "natural-text sequences", minimum=1))

    def probe_key(self, settings: Any) -> tuple:
        return ("self", settings.context, settings.self_sequences, settings.seed, str(settings.text))

    def make_probe(self, tokenizer: Any, geometry: Geometry, settings: Any):
        return natural_text(tokenizer, context=settings.context, n_sequences=settings.self_sequences,
                            seed=settings.seed, text=settings.text, name="self-text")

    def observer(self, geometry: Geometry, probe: Any, settings: Any) -> ScoreObserver:
        return _SelfObserver(geometry, settings.self_skip)


@pytest.fixture
def self_family():
    scores.register(SelfAttentionScores())
    yield
    scores.unregister("self")


def test_a_score_family_defined_outside_src_runs_through_profile_atlas_and_report(self_family, model_dir, word_file,
                                                                                  tmp_path, capsys):
    out = tmp_path / "atlas"
    args = ["profile", "--model", str(model_dir), "--scores", "self_attention", "--out", str(out), "--context", "40",
            "--text", word_file, "--self-skip", "3", "--self-sequences", "2"]
    assert main(args) == 0, capsys.readouterr().err
    atlas = Atlas.load(out)
    entry = atlas.data["scores"]["self_attention"]
    assert entry["family"] == "self" and entry["needs_full"] == "low"
    assert atlas.data["settings"]["self_skip"] == 3 and atlas.data["settings"]["self_sequences"] == 2
    assert [r["role"] for r in atlas.data["roles"]["rules"]] == ["self"]
    # The number is the definition's: eager attention, by hand.
    loaded = headwise.load(str(model_dir))
    ids = natural_text(loaded.tokenizer, context=40, n_sequences=2, seed=0, text=word_file).input_ids
    atts = eager_attentions(loaded.model, ids)
    want = np.array([[np.mean([np.mean([a[b, h, i, i] for i in range(3, 40)]) for b in range(2)])
                      for h in range(a.shape[1])] for a in atts])
    np.testing.assert_allclose(atlas.score("self_attention"), want, atol=1e-6)
    labelled = {(int(x), int(y)) for x, y in zip(*np.nonzero(want > 0.065))}
    assert labelled and set(atlas.heads_with_role("self")) == labelled
    page = (out / "report.html").read_text(encoding="utf-8")
    data = json.loads(page.split('id="headwise-data">')[1].split("</script>")[0])
    shown = {s["name"]: s for s in data["scores"]}
    assert shown["self_attention"]["needs_full"] == "low"
    # Its direction reaches the KV cache: low self-attention needs the full cache.
    policy = parse_policy("headwise:self_attention@0.5", atlas.geometry, atlas=atlas)
    need = (-atlas.score("self_attention")).reshape(atlas.geometry.n_layers, atlas.geometry.n_kv_heads, -1).max(-1)
    assert policy.full.ravel().tolist() == (need.ravel() >= np.sort(need.ravel())[need.size // 2]).tolist()
    # Its settings are checked like the built-in ones.
    assert main([*args[:-2], "--self-sequences", "0"]) == 2
    assert "--self-sequences must be a positive integer" in capsys.readouterr().err


# ---- a cache policy: every KV head keeps only its last W tokens ---------------------------
class RecentLayer(HeadwiseLayer):
    """The last `window` tokens of every head. A call sees what it stored plus its own keys; then the
    oldest are dropped."""

    def __init__(self, layer: int, n_kv_heads: int, head_dim: int, window: int):
        super().__init__(layer, n_kv_heads, head_dim)
        self.window = window
        self.store = Store()

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.store.append(key_states, value_states)
        self.seen += key_states.shape[2]
        keys, values = self.store.keys, self.store.values
        n = self.store.length
        if n > self.window:
            keep = torch.arange(n - self.window, n, device=keys.device).expand(keys.shape[0], keys.shape[1], -1)
            self.store.select(keep)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.store.length + query_length, 0  # the stored keys no longer line up with positions

    def head_bytes(self) -> np.ndarray:
        return np.full(self.n_kv_heads, self.store.per_head_bytes())


@dataclass
class RecentPolicy(CachePolicy):
    policy_type: ClassVar[str] = "test-recent"
    geometry: Geometry
    window: int
    name: str = "recent"
    source: dict[str, Any] = field(default_factory=dict)
    prefill: ClassVar[str] = "whole"  # each multi-token call sees itself whole

    def make_layer(self, layer: int, max_length: int | None):
        return RecentLayer(layer, self.geometry.n_kv_heads, self.geometry.head_dim, self.window)

    def tokens_held(self, context: int) -> np.ndarray:
        return np.full((self.geometry.n_layers, self.geometry.n_kv_heads), min(context, self.window))

    def describe(self) -> str:
        return f"{self.name}: every KV head keeps its last {self.window} tokens"

    def fields(self) -> dict[str, Any]:
        return {"window": self.window}

    @classmethod
    def from_fields(cls, geometry, fields, name, source):
        return cls(geometry, int(fields["window"]), name=name, source=source)


def _build_recent(request) -> RecentPolicy:
    window = request.number(request.amount)
    if window < 1 or window != int(window):
        raise request.fail("the window is a whole number of tokens")
    return RecentPolicy(request.geometry, int(window), source={"method": "recent"})


@pytest.fixture
def recent_policy():
    from headwise.kv import policy as base
    from headwise.kv import spec

    register_policy("recent", _build_recent, syntax="recent@W")
    yield
    spec._REGISTERED.pop("recent", None)
    base._KINDS.pop("test-recent", None)


def test_a_cache_policy_defined_outside_src_runs_through_specs_eval_and_generation(recent_policy, tmp_path,
                                                                                  capsys):
    from headwise.decode import greedy
    from headwise.kv.evaluate import EvalSettings, evaluate
    from headwise.kv.generate import generate

    lm = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer(), name="tiny")
    g = lm.geometry
    policy = parse_policy("recent@8", g)
    assert isinstance(policy, RecentPolicy) and policy.window == 8 and policy.name == "recent@8"
    with pytest.raises(headwise.HeadwiseError, match="whole number"):
        parse_policy("recent@2.5", g)
    with pytest.raises(headwise.HeadwiseError, match="no streaming heads"):
        parse_policy("recent@8+whole", g)  # it declared no options
    # Generation through the policy's cache: every layer ends up holding its last 8 tokens, no more.
    ids = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(2))
    res = generate(lm, ids, policy, max_new_tokens=4, until="budget")
    assert len(res.tokens) == 4 and res.kv_report["tokens_seen"] == 33
    cache = HeadwiseCache(policy)
    greedy(lm, ids, 4, until="budget", cache=cache)
    assert [layer.store.length for layer in cache.layers] == [8] * g.n_layers
    assert policy.kv_bytes(34) == 2 * g.head_dim * 4 * 8 * g.n_layers * g.n_kv_heads
    # Saved and loaded by its kind; run through headwise eval's spec parsing beside the full cache.
    assert RecentPolicy.load(policy.save(tmp_path / "recent.json")).window == 8
    assert parse_policy(str(tmp_path / "recent.json"), g).window == 8
    result = evaluate(lm, ["recent@8"], EvalSettings(contexts=(120,), depths=(0.5,), trials=1, fillers=("words",)))
    cells = result["summary"]["passkey"]["120"]
    assert set(cells) == {"full", "recent@8"} and cells["recent@8"]["kv_ratio"] < 0.2
    assert result["policies"]["recent@8"]["kind"] == "test-recent"
