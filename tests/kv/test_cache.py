"""HeadwiseCache against the model's default cache and against naive sink + window attention."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import headwise
from headwise.errors import HeadwiseError
from headwise.instrument import headwise_attention
from headwise.kv import HeadPolicy, HeadwiseCache
from headwise.kv.generate import generate
from tests.conftest import tiny_model, tiny_tokenizer
from tests.reference import naive_sink_window_attention


def _ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 96, (batch, n), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _reference_attention(policy: HeadPolicy, whole_calls: list[tuple[int, int]] = ()):
    """Swap headwise's attention for an explicit per-KV-head loop: full heads causal, others sink + window
    (with a whole-prompt prefill, the multi-token calls `whole_calls` see what naive_sink_window_attention says)."""
    from transformers import AttentionInterface

    def ref(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = module._headwise_layer
        if kwargs.get("sliding_window") is not None:  # the model's own window: not the policy's business
            return headwise_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        b, hq, t, d = query.shape
        g = hq // key.shape[1]
        out = torch.zeros(b, hq, t, d, dtype=torch.float64)
        for kv in range(key.shape[1]):
            heads = slice(kv * g, (kv + 1) * g)
            k = key[:, kv:kv + 1].expand(b, g, t, d)
            v = value[:, kv:kv + 1].expand(b, g, t, d)
            if policy.full[layer, kv]:
                out[:, heads] = naive_sink_window_attention(query[:, heads], k, v, scaling, sink=0, window=t + 1)
            else:
                middle = _naive_middle(query[:, heads], key[:, kv:kv + 1], scaling, whole_calls[0][1], policy.sink,
                                       policy.window, policy.middle) if policy.middle else ()
                out[:, heads] = naive_sink_window_attention(query[:, heads], k, v, scaling, policy.sink, policy.window,
                                                            policy.compensate, whole_calls, middle,
                                                            policy.layer_tail(layer), policy.stride)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register("headwise", ref)
    try:
        yield
    finally:
        AttentionInterface.register("headwise", headwise_attention)


def _naive_middle(query: torch.Tensor, key: torch.Tensor, scaling: float, first_end: int, sink: int, window: int,
                  middle: int) -> tuple[int, ...]:
    """SnapKV's vote by hand, for one KV head of batch row 0: each of the group's query heads, at each of the
    prompt's last min(32, window) positions, softmax over the keys it sees; summed over those queries,
    averaged over the heads, averaged over 7 neighbours (those that exist); the `middle` best between the
    sinks and the window."""
    g = query.shape[1]
    w = min(32, window)
    votes = [0.0] * (first_end - w)
    for h in range(g):
        for i in range(first_end - w, first_end):
            logits = torch.tensor([float(query[0, h, i].double() @ key[0, 0, j].double()) * scaling
                                   for j in range(i + 1)], dtype=torch.float64)
            probs = torch.softmax(logits, 0)
            for j in range(len(votes)):
                votes[j] += float(probs[j]) / g
    pooled = [sum(votes[max(0, j - 3):j + 4]) / len(votes[max(0, j - 3):j + 4]) for j in range(len(votes))]
    candidates = range(sink, first_end - window)
    return tuple(sorted(sorted(candidates, key=lambda j: -pooled[j])[:middle]))


def _cached_logits(model, ids: torch.Tensor, cache: HeadwiseCache, chunks: list[int]) -> torch.Tensor:
    """Logits of every position, feeding `ids` through the cache in the given chunk sizes."""
    out, start = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(input_ids=ids[:, start:start + n], cache=cache, use_cache=True).logits)
            start += n
    assert start == ids.shape[1]
    return torch.cat(out, 1)


def _assert_matches_reference(model, policies: list[HeadPolicy], ids: torch.Tensor, chunks: list[int],
                              whole_calls: list[tuple[int, int]] = ()) -> None:
    """Each policy's logits, fed through its cache in `chunks`, equal the naive reference's; its bytes the
    prediction."""
    for policy in policies:
        cache = HeadwiseCache(policy, max_length=ids.shape[1])
        cached = _cached_logits(model, ids, cache, chunks)
        with _reference_attention(policy, whole_calls), torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(cached, ref, atol=2e-4, rtol=2e-4)
        assert cache.nbytes() == policy.kv_bytes(ids.shape[1])


def test_all_full_matches_default_cache(tiny, arch):
    ids = _ids(24)
    model = tiny.model
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        cache = HeadwiseCache(HeadPolicy.full_cache(tiny.geometry))
        out = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12, cache=cache)
        assert torch.equal(ref, out)
        full_logits = model(input_ids=ref).logits
    cached = _cached_logits(model, ref, HeadwiseCache(HeadPolicy.full_cache(tiny.geometry)), [20, 1, 1, 14])
    torch.testing.assert_close(cached, full_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("compensate", [False, True])
def test_streaming_and_mixed_match_naive_reference(tiny, arch, compensate):
    g = tiny.geometry
    rng = np.random.default_rng(1)
    policies = [HeadPolicy.streaming(g, sink=3, window=5, compensate=compensate, prefill="bounded"),
                HeadPolicy(g, rng.random((g.n_layers, g.n_kv_heads)) < 0.5, sink=2, window=6, compensate=compensate,
                           prefill="bounded")]
    _assert_matches_reference(tiny.model, policies, _ids(30, seed=2), [9, 1, 1, 7, 1, 11])


@pytest.mark.parametrize("compensate", [False, True])
def test_whole_prompt_prefill_matches_naive_reference(tiny, arch, compensate):
    """Streaming heads see the whole first call, then sinks + window (+ compensation); a later prompt chunk
    sees sinks, the window before it and itself."""
    g = tiny.geometry
    rng = np.random.default_rng(5)
    policies = [HeadPolicy.streaming(g, sink=3, window=5, compensate=compensate, prefill="whole"),
                HeadPolicy(g, rng.random((g.n_layers, g.n_kv_heads)) < 0.5, sink=2, window=6, compensate=compensate,
                       prefill="whole")]
    ids = _ids(34, seed=6)
    # stored like the windowed prefill: sinks + window only (the bytes check)
    _assert_matches_reference(tiny.model, policies, ids, [16, 1, 1, 9, 1, 6], [(0, 16), (18, 27), (28, 34)])
    # The first call is the model's own forward: identical logits to the full cache.
    streaming = policies[0]
    first = _cached_logits(tiny.model, ids[:, :16], HeadwiseCache(streaming), [16])
    full = _cached_logits(tiny.model, ids[:, :16], HeadwiseCache(HeadPolicy.full_cache(g)), [16])
    torch.testing.assert_close(first, full, atol=1e-5, rtol=1e-5)


def test_middle_tokens_match_naive_reference(tiny, arch):
    """Streaming heads keep sinks, window and the prompt's `middle` most-voted tokens between them."""
    g = tiny.geometry
    rng = np.random.default_rng(8)
    policies = [HeadPolicy.streaming(g, sink=2, window=6, prefill="whole", middle=4),
                HeadPolicy(g, rng.random((g.n_layers, g.n_kv_heads)) < 0.5, sink=2, window=6, prefill="whole",
                           middle=3)]
    ids = _ids(34, seed=9)
    chunks = [16, 1, 1, 9, 1, 6]
    _assert_matches_reference(tiny.model, policies, ids, chunks, [(0, 16), (18, 27), (28, 34)])
    # The kept tokens matter: without them the streaming heads' logits differ.
    plain = _cached_logits(tiny.model, ids, HeadwiseCache(HeadPolicy.streaming(g, sink=2, window=6, prefill="whole")),
                           chunks)
    middle = _cached_logits(tiny.model, ids, HeadwiseCache(policies[0]), chunks)
    assert (plain[:, 16:] - middle[:, 16:]).abs().max() > 1e-3


@pytest.mark.parametrize("compensate", [False, True])
def test_tail_prefill_matches_naive_reference(tiny, arch, compensate):
    """The prompt's one call: streaming heads' queries see sinks + window except the last `tail`, which see the
    whole prompt; later calls as the whole-prompt prefill's."""
    g = tiny.geometry
    rng = np.random.default_rng(11)
    policies = [HeadPolicy.streaming(g, sink=3, window=5, compensate=compensate, prefill="tail", tail=4),
                HeadPolicy(g, rng.random((g.n_layers, g.n_kv_heads)) < 0.5, sink=2, window=6, compensate=compensate,
                           prefill="tail", tail=3),
                # the first layer reads the prompt whole, the others bounded, with or without a tail
                HeadPolicy.streaming(g, sink=3, window=5, compensate=compensate, prefill="tail", early=1),
                HeadPolicy.streaming(g, sink=2, window=4, compensate=compensate, prefill="tail", tail=2, early=1)]
    if not compensate:  # sinks + window + a stride, alone and with a tail and whole early layers
        policies += [HeadPolicy.streaming(g, sink=3, window=4, prefill="tail", stride=3),
                     HeadPolicy(g, rng.random((g.n_layers, g.n_kv_heads)) < 0.5, sink=2, window=3, prefill="tail",
                                tail=2, early=1, stride=4, middle=2)]
    ids = _ids(34, seed=12)
    _assert_matches_reference(tiny.model, policies, ids, [16, 1, 1, 9, 1, 6], [(0, 16), (18, 27), (28, 34)])


def test_tail_prefill_lies_between_bounded_and_whole():
    """The tail's queries are the whole prefill's, the others the bounded prefill's (so the test above can fail)."""
    lm = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer())
    ids = _ids(40, seed=13)
    logits = {mode: _cached_logits(lm.model, ids, HeadwiseCache(HeadPolicy.streaming(
        lm.geometry, sink=2, window=4, prefill=mode, tail=6 if mode == "tail" else 0)), [40])
        for mode in ("bounded", "whole", "tail")}
    torch.testing.assert_close(logits["tail"][:, :34], logits["bounded"][:, :34], atol=1e-5, rtol=1e-5)
    assert (logits["tail"][:, 34:] - logits["bounded"][:, 34:]).abs().max() > 1e-3
    assert (logits["tail"][:, 34:] - logits["whole"][:, 34:]).abs().max() > 1e-3  # earlier layers' inputs differ
    # A tail as long as the prompt is the whole prefill.
    longer = _cached_logits(lm.model, ids, HeadwiseCache(HeadPolicy.streaming(lm.geometry, sink=2, window=4,
                                                                              prefill="tail", tail=40)), [40])
    torch.testing.assert_close(longer, logits["whole"], atol=1e-5, rtol=1e-5)


def test_stride_prefill_lies_between_bounded_and_whole():
    """Stride 1 sees every token (the whole prefill); a stride past the prompt sees none more than bounded; one
    in between differs from both (so the reference test above can fail)."""
    lm = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer())
    ids = _ids(40, seed=15)

    def logits(**prefill):
        return _cached_logits(lm.model, ids, HeadwiseCache(HeadPolicy.streaming(lm.geometry, sink=2, window=4,
                                                                                **prefill)), [40])
    whole, bounded, stride3 = logits(prefill="whole"), logits(prefill="bounded"), logits(prefill="tail", stride=3)
    torch.testing.assert_close(logits(prefill="tail", stride=1), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(prefill="tail", stride=64), bounded, atol=1e-5, rtol=1e-5)
    assert (stride3 - whole).abs().max() > 1e-3 and (stride3 - bounded).abs().max() > 1e-3


def test_block_sparse_prefill_lies_between_bounded_and_whole():
    """+blocksK in a model: as many blocks as the prompt has reads it whole; one block differs from the whole
    and the bounded prefill; the cache it leaves is the same size (block_sparse.py's own test checks the pattern)."""
    lm = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer())
    ids = _ids(330, seed=16)

    def run(**prefill):
        cache = HeadwiseCache(HeadPolicy.streaming(lm.geometry, sink=2, window=4, **prefill))
        return _cached_logits(lm.model, ids, cache, [330]), cache.nbytes()
    (whole, whole_bytes), (bounded, _) = run(prefill="whole"), run(prefill="bounded")
    (one, one_bytes), (every, _) = run(prefill="tail", blocks=1), run(prefill="tail", blocks=6)
    torch.testing.assert_close(every, whole, atol=1e-5, rtol=1e-5)
    assert (one - whole).abs().max() > 1e-3 and (one - bounded).abs().max() > 1e-3
    torch.testing.assert_close(one[:, :256], whole[:, :256], atol=1e-5, rtol=1e-5)  # blocks 0-3: their prefix
    assert one_bytes == whole_bytes


def test_tail_and_early_prefill_read_the_prompt_in_one_call():
    """generate ignores prefill_chunk for them: the first answer token is scored from the one-call prefill."""
    lm = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer())
    ids = _ids(40, seed=14)
    for policy in (HeadPolicy.streaming(lm.geometry, sink=2, window=4, prefill="tail", tail=4),
                   HeadPolicy.streaming(lm.geometry, sink=2, window=4, prefill="tail", early=1)):
        assert policy.one_call_prefill
        res = generate(lm, ids, policy, max_new_tokens=2, prefill_chunk=16, until="budget", answer_ids=[5, 6])
        last = _cached_logits(lm.model, ids, HeadwiseCache(policy), [40])[0, -1]
        assert res.answer_logprobs[0] == pytest.approx(float(torch.log_softmax(last.float(), -1)[5]), abs=1e-5)


def test_tail_and_prefill_modes_are_checked():
    g = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer()).geometry
    with pytest.raises(HeadwiseError, match="tail"):
        HeadPolicy.streaming(g, prefill="tail")
    with pytest.raises(HeadwiseError, match="tail"):
        HeadPolicy.streaming(g, prefill="whole", tail=4)
    with pytest.raises(HeadwiseError, match="early layers"):
        HeadPolicy.streaming(g, prefill="tail", early=g.n_layers + 1)
    with pytest.raises(HeadwiseError, match="tail"):
        HeadPolicy.streaming(g, prefill="bounded", early=1)
    assert HeadPolicy.streaming(g, prefill="tail", tail=8, middle=4).middle == 4  # the vote reads the one call


def test_middle_tokens_need_whole_prefill_and_no_compensation():
    g = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer()).geometry
    with pytest.raises(HeadwiseError, match="drop \\+bounded"):
        HeadPolicy.streaming(g, middle=8, prefill="bounded")
    with pytest.raises(HeadwiseError, match="compensation"):
        HeadPolicy.streaming(g, middle=8, prefill="whole", compensate=True)
    with pytest.raises(HeadwiseError, match=">= 0"):
        HeadPolicy.streaming(g, middle=-1, prefill="whole")


def test_whole_prefill_greedy_prefills_in_one_call_and_differs_after():
    lm = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer())
    ids = _ids(48, seed=7)
    whole = HeadPolicy.streaming(lm.geometry, sink=2, window=4, prefill="whole")
    windowed = HeadPolicy.streaming(lm.geometry, sink=2, window=4, prefill="bounded")
    full = generate(lm, ids, HeadPolicy.full_cache(lm.geometry), max_new_tokens=6, prefill_chunk=16, until="budget",
                  answer_ids=[5, 6, 7])
    res = generate(lm, ids, whole, max_new_tokens=6, prefill_chunk=16, until="budget", answer_ids=[5, 6, 7])
    win = generate(lm, ids, windowed, max_new_tokens=6, prefill_chunk=16, until="budget", answer_ids=[5, 6, 7])
    # prefill_chunk is overridden: the first answer token is scored from the full-attention prompt.
    assert res.answer_logprobs[0] == pytest.approx(full.answer_logprobs[0], abs=1e-5)
    assert win.answer_logprobs[0] != pytest.approx(full.answer_logprobs[0], abs=1e-3)
    assert res.kv_bytes == win.kv_bytes < full.kv_bytes
    # Later tokens see only sinks + window.
    assert res.answer_logprobs[1:] != pytest.approx(full.answer_logprobs[1:], abs=1e-4)


def test_streaming_differs_from_full_cache():
    """The reference comparison above must be able to fail: dropping tokens changes the logits."""
    lm = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer())
    ids = _ids(40, seed=3)
    full = _cached_logits(lm.model, ids, HeadwiseCache(HeadPolicy.full_cache(lm.geometry)), [40])
    streamed = _cached_logits(lm.model, ids, HeadwiseCache(HeadPolicy.streaming(lm.geometry, sink=2, window=4,
                                                                                       prefill="bounded")), [40])
    assert (full[:, -1] - streamed[:, -1]).abs().max() > 1e-3
    torch.testing.assert_close(full[:, :6], streamed[:, :6])  # within sink + window nothing is dropped


def test_bytes_really_shrink_and_match_prediction():
    lm = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer())
    g = lm.geometry
    ids = _ids(60, seed=4)
    policy = HeadPolicy(g, np.array([[True, False]] * g.n_layers), sink=4, window=8, compensate=True)
    full_cache = HeadwiseCache(HeadPolicy.full_cache(g), max_length=60)
    cache = HeadwiseCache(policy, max_length=60)
    _cached_logits(lm.model, ids, full_cache, [30, 30])
    _cached_logits(lm.model, ids, cache, [30, 30])
    assert full_cache.nbytes() == HeadPolicy.full_cache(g).kv_bytes(60)
    assert cache.nbytes() == policy.kv_bytes(60)
    by_head = cache.nbytes_by_head()
    per_token = 2 * g.head_dim * 4
    assert by_head[0, 0] == 60 * per_token and by_head[0, 1] == 12 * per_token + 2 * g.head_dim * 4
    # What the streaming heads hold is their last 8 tokens' keys, not a masked copy of all 60.
    layer = cache.layers[0]
    assert layer.streaming.ring_k.shape[2] == 8 and sorted(layer.streaming.ring_pos.tolist()) == list(range(52, 60))



@pytest.mark.parametrize("spec", ["streaming@100", "streaming@100+whole", "random@0.5", "headwise-free:mid"])
def test_a_sequence_shorter_than_sinks_and_window_holds_only_its_tokens(spec):
    """The bytes a cache holds equal the prediction even when S + W is longer than the whole sequence."""
    from headwise.kv import parse_policy

    lm = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer())
    g = lm.geometry
    policy = HeadPolicy(g, np.array([[True, False]] * g.n_layers), sink=4, window=16, prefill="whole", middle=2) \
        if spec == "headwise-free:mid" else parse_policy(spec, g, sink=64)
    res = generate(lm, _ids(7, seed=2), policy, max_new_tokens=5, until="budget")
    assert res.kv_bytes == policy.kv_bytes(12)
    assert res.kv_bytes <= HeadPolicy.full_cache(g).kv_bytes(12)

def test_gemma_sliding_layers_keep_model_window():
    lm = headwise.from_model(tiny_model("gemma3-sliding"), tiny_tokenizer())
    g = lm.geometry
    policy = HeadPolicy.streaming(g, sink=2, window=4)
    assert policy.model_windowed_layers == (0, 1) and policy.n_selectable == g.n_kv_heads
    cache = HeadwiseCache(policy)
    _cached_logits(lm.model, _ids(30), cache, [30])
    from transformers.cache_utils import DynamicSlidingWindowLayer

    assert isinstance(cache.layers[0], DynamicSlidingWindowLayer)
    assert cache.layers[0].keys.shape[2] == g.sliding_window[0] - 1


def test_batch_without_padding_matches_rows_and_padding_is_refused():
    lm = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer())
    policy = HeadPolicy.streaming(lm.geometry, sink=2, window=5)
    ids = _ids(20, seed=5, batch=2)
    both = _cached_logits(lm.model, ids, HeadwiseCache(policy), [20])
    for row in range(2):
        one = _cached_logits(lm.model, ids[row:row + 1], HeadwiseCache(policy), [20])
        torch.testing.assert_close(both[row:row + 1], one, atol=1e-5, rtol=1e-5)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :3] = 0
    with pytest.raises(HeadwiseError, match="padded"), torch.no_grad():
        lm.model(input_ids=ids, attention_mask=mask, cache=HeadwiseCache(policy), use_cache=True)


def test_policy_for_another_model_is_refused():
    lm = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer())
    other = headwise.from_model(tiny_model("gpt2"), tiny_tokenizer())
    policy = HeadPolicy.streaming(other.geometry, sink=2, window=4)
    with pytest.raises(HeadwiseError, match="policy"):
        generate(lm, _ids(10), policy, max_new_tokens=2)
    with pytest.raises(HeadwiseError, match="KV heads"), torch.no_grad():
        lm.model(input_ids=_ids(10), cache=HeadwiseCache(policy), use_cache=True)


def test_greedy_reports_bytes_and_speed():
    lm = headwise.from_model(tiny_model("qwen2"), tiny_tokenizer())
    res = generate(lm, _ids(30), HeadPolicy.streaming(lm.geometry, sink=2, window=4), max_new_tokens=5, until="budget")
    assert len(res.tokens) == 5 and res.kv_bytes > 0 and res.decode_tokens_per_second > 0
    assert res.kv_report["total_bytes"] == res.kv_bytes


def test_answer_logprob_is_teacher_forced_and_leaves_the_reply_alone():
    lm = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer())
    policy = HeadPolicy.random(lm.geometry, 0.5, seed=1, sink=2, window=4, prefill="bounded")
    ids, answer = _ids(30), [5, 7, 9]
    plain = generate(lm, ids, policy, max_new_tokens=4, until="budget")
    scored = generate(lm, ids, policy, max_new_tokens=4, until="budget", answer_ids=answer)
    assert scored.tokens == plain.tokens and plain.answer_logprob is None
    # reference: the prompt and the answer in one pass through a fresh cache
    whole = torch.cat([ids, torch.tensor([answer[:-1]])], dim=1)
    logits = _cached_logits(lm.model, whole, HeadwiseCache(policy), [whole.shape[1]])[0, -len(answer):]
    logp = torch.log_softmax(logits.float(), -1)
    want = logp[torch.arange(len(answer)), torch.tensor(answer)]
    assert scored.answer_logprobs == pytest.approx(want.tolist(), abs=1e-4)
    assert scored.answer_logprob == pytest.approx(float(want.mean()), abs=1e-4)
    assert scored.answer_argmax == (logp.argmax(-1) == torch.tensor(answer)).tolist()
    best = int(logp[0].argmax())  # the model's own first choice scores as the argmax
    assert generate(lm, ids, policy, max_new_tokens=1, answer_ids=[best]).answer_argmax == [True]
