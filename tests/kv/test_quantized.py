"""Full heads stored in 8, 4 or 2 bits (KIVI): against a naive per-group quantizer written out here."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import pytest
import torch

import headwise
from headwise.errors import HeadwiseError
from headwise.instrument import headwise_attention
from headwise.kv import CachePolicy, HeadPolicy, HeadwiseCache, parse_policy
from headwise.kv.quantized import (
    KIVI_GROUP,
    KIVI_RESIDUAL,
    QuantizedStore,
    dequantize_keys,
    dequantize_values,
    pack,
    quantize_keys,
    quantize_values,
    quantized_head_bytes,
    unpack,
)
from tests.conftest import tiny_model, tiny_tokenizer
from tests.kv.test_cache import _cached_logits, _ids
from tests.reference import naive_sink_window_attention


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.linspace(0.1, 3.0, shape[-1])  # channels of unequal range


def _naive_group(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One group (any shape, min and max over all of it), KIVI's formula: dequantized, codes, scale."""
    lo, hi = x.min(), x.max()
    scale = (hi - lo) / (2 ** bits - 1)
    q = torch.zeros_like(x) if scale == 0 else torch.clamp(torch.round((x - lo) / scale), 0, 2 ** bits - 1)
    return q * scale + lo, q, float(scale)


def _naive_keys(k: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k [b, h, n, d]: each channel of each run of `group` tokens on its own. Dequantized, codes, scale per element."""
    deq, codes, scales = torch.empty_like(k), torch.empty_like(k), torch.empty_like(k)
    b, h, n, d = k.shape
    for i in range(b):
        for j in range(h):
            for start in range(0, n, group):
                for c in range(d):
                    rows = slice(start, start + group)
                    deq[i, j, rows, c], codes[i, j, rows, c], scales[i, j, rows, c] = _naive_group(k[i, j, rows, c],
                                                                                                   bits)
    return deq, codes, scales


def _naive_values(v: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v [b, h, n, d]: each token on its own, its channels in runs of `group`."""
    deq, codes, scales = torch.empty_like(v), torch.empty_like(v), torch.empty_like(v)
    b, h, n, d = v.shape
    for i in range(b):
        for j in range(h):
            for t in range(n):
                for start in range(0, d, group):
                    cols = slice(start, start + group)
                    deq[i, j, t, cols], codes[i, j, t, cols], scales[i, j, t, cols] = _naive_group(v[i, j, t, cols],
                                                                                                   bits)
    return deq, codes, scales


def _naive_stored(k: torch.Tensor, v: torch.Tensor, bits: int, group: int, residual: int):
    """What KIVI holds after the tokens of k, v [b, h, T, d], dequantized: keys' first (T // R) * R tokens and
    values' first T - R quantized, the rest as they came."""
    t = k.shape[2]
    nk, nv = t // residual * residual, max(0, t - residual)
    vgroup = group if k.shape[3] % group == 0 else k.shape[3]
    keys, values = k.clone(), v.clone()
    if nk:
        keys[:, :, :nk] = _naive_keys(k[:, :, :nk], bits, group)[0]
    if nv:
        values[:, :, :nv] = _naive_values(v[:, :, :nv], bits, vgroup)[0]
    return keys, values


# ---- the quantizer --------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_keys_and_values_quantize_like_the_naive_reference(bits):
    k, v = _rand(2, 3, 64, 16, seed=1), _rand(2, 3, 5, 64, seed=2)
    codes, scale, zero = quantize_keys(k, bits, 32)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3, 64, 16 * bits // 8)  # 4 bits: half the bytes
    assert scale.shape == zero.shape == (2, 3, 2, 16)
    deq = torch.empty_like(k)
    dequantize_keys(codes, scale, zero, bits, 32, deq)
    ref, ref_codes, ref_scale = _naive_keys(k, bits, 32)
    assert torch.equal(unpack(codes, bits).float(), ref_codes)
    torch.testing.assert_close(deq, ref, atol=1e-6, rtol=1e-6)
    assert ((deq - k).abs() <= ref_scale / 2 + 1e-5).all()
    assert (deq - k).abs().max() > 1e-4  # not the identity

    codes, scale, zero = quantize_values(v, bits, 32)
    assert codes.shape == (2, 3, 5, 64 * bits // 8) and scale.shape == (2, 3, 5, 2)
    deq = torch.empty_like(v)
    dequantize_values(codes, scale, zero, bits, 32, deq)
    ref, ref_codes, ref_scale = _naive_values(v, bits, 32)
    assert torch.equal(unpack(codes, bits).float(), ref_codes)
    torch.testing.assert_close(deq, ref, atol=1e-6, rtol=1e-6)
    assert ((deq - v).abs() <= ref_scale / 2 + 1e-5).all()


def test_constant_group_is_exact():
    k = torch.full((1, 1, 32, 4), 0.75)
    codes, scale, zero = quantize_keys(k, 4, 32)
    out = torch.empty_like(k)
    dequantize_keys(codes, scale, zero, 4, 32, out)
    assert torch.equal(out, k)


def test_int4_packing_round_trip():
    codes = torch.randint(0, 16, (3, 2, 7, 10), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    packed = pack(codes, 4)
    assert packed.shape == (3, 2, 7, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, 4), codes)
    # Two per byte, the even channel in the low nibble.
    assert pack(torch.tensor([[3, 12, 15, 0]], dtype=torch.uint8), 4).tolist() == [[3 + 12 * 16, 15]]


def test_int2_packing_round_trip():
    codes = torch.randint(0, 4, (3, 2, 7, 12), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    packed = pack(codes, 2)
    assert packed.shape == (3, 2, 7, 3) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, 2), codes)
    # Four per byte, channel 4j + i in bits 2i and 2i + 1.
    assert pack(torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]], dtype=torch.uint8), 2).tolist() == [[1 + 2 * 4 + 3 * 16, 255]]


# ---- the store ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("chunks", [[21], [5, 1, 1, 3, 12, 1, 1], [8, 8, 1, 4], [1] * 19])
def test_store_holds_what_kivi_holds_whatever_the_calls(bits, chunks):
    """Group 4, residual 8: after each call, the store dequantizes to the naive KIVI state of all tokens so far;
    each call attends to that state before it plus its own tokens unquantized; bytes as predicted."""
    g, r, d = 4, 8, 8
    total = sum(chunks)
    k, v = _rand(1, 2, total, d, seed=4), _rand(1, 2, total, d, seed=5)
    store = QuantizedStore(d, bits, reserve=total, group=g, residual=r)
    start = 0
    for n in chunks:
        before_k, before_v = _naive_stored(k[:, :, :start], v[:, :, :start], bits, g, r)
        seen_k, seen_v = store.update(k[:, :, start:start + n], v[:, :, start:start + n])
        torch.testing.assert_close(seen_k, torch.cat([before_k, k[:, :, start:start + n]], 2), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(seen_v, torch.cat([before_v, v[:, :, start:start + n]], 2), atol=1e-6, rtol=1e-6)
        start += n
        want_k, want_v = _naive_stored(k[:, :, :start], v[:, :, :start], bits, g, r)
        torch.testing.assert_close(store.keys, want_k, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(store.values, want_v, atol=1e-6, rtol=1e-6)
    assert store.per_head_bytes() == quantized_head_bytes(total, d, bits, 4, group=g, residual=r)


def test_byte_formula_by_hand():
    """head dim 64, 300 tokens, float32, KIVI's 32 / 128: 256 keys and 172 values quantized, 128 + 128 residual."""
    d, t = 64, 300
    for bits in (8, 4, 2):
        code = d * bits // 8
        keys = 256 * code + 2 * (256 // 32) * d * 4
        values = 172 * code + 2 * 172 * (d // 32) * 4
        assert quantized_head_bytes(t, d, bits, 4) == keys + values + 2 * 128 * d * 4
    assert quantized_head_bytes(100, d, 4, 4) == 2 * 100 * d * 4  # all residual: no saving below R tokens


# ---- in the model -----------------------------------------------------------------------------------
def _calls(chunks: list[int]) -> list[tuple[int, int]]:
    ends = np.cumsum(chunks)
    return list(zip([0, *ends[:-1]], ends))


@contextlib.contextmanager
def _kivi_reference(policy: HeadPolicy, calls: list[tuple[int, int]]):
    """Headwise's attention swapped for a loop: a full head's query in call [s, e) attends to the naive KIVI
    state of tokens [0, s) and to the call's own keys up to itself; streaming heads as the naive sink + window
    reference (bounded prefill)."""
    from transformers import AttentionInterface

    def ref(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if kwargs.get("sliding_window") is not None:  # the model's own window: not the policy's business
            return headwise_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        layer = module._headwise_layer
        b, hq, t, d = query.shape
        g = hq // key.shape[1]
        out = torch.zeros(b, hq, t, d, dtype=torch.float64)
        for kv in range(key.shape[1]):
            heads = slice(kv * g, (kv + 1) * g)
            k, v = key[:, kv:kv + 1], value[:, kv:kv + 1]
            if not policy.full[layer, kv]:
                out[:, heads] = naive_sink_window_attention(query[:, heads], k.expand(b, g, t, d),
                                                            v.expand(b, g, t, d), scaling, policy.sink, policy.window)
                continue
            for s, e in calls:
                held_k, held_v = _naive_stored(k[:, :, :s], v[:, :, :s], policy.quant, KIVI_GROUP, KIVI_RESIDUAL)
                seen_k, seen_v = torch.cat([held_k, k[:, :, s:e]], 2), torch.cat([held_v, v[:, :, s:e]], 2)
                for i in range(s, e):
                    logits = query[:, heads, i:i + 1].double() @ seen_k[:, :, :i + 1].double().transpose(-1, -2)
                    out[:, heads, i] = (torch.softmax(logits * scaling, -1) @ seen_v[:, :, :i + 1].double())[:, :, 0]
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register("headwise", ref)
    try:
        yield
    finally:
        AttentionInterface.register("headwise", headwise_attention)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantized_policies_match_naive_reference(tiny, arch, bits):
    g = tiny.geometry
    mixed = np.random.default_rng(2).random((g.n_layers, g.n_kv_heads)) < 0.5
    policies = [HeadPolicy.full_cache(g, quant=bits),
                HeadPolicy(g, mixed, sink=4, window=40, prefill="bounded", quant=bits)]
    chunks = [100, 1, 1, 40, 1, 30, 1, 1, 100, 1]  # crosses R = 128 and 256 in calls and in decoding
    ids = _ids(sum(chunks), seed=3)
    for policy in policies:
        cache = HeadwiseCache(policy, max_length=ids.shape[1])
        cached = _cached_logits(tiny.model, ids, cache, chunks)
        with _kivi_reference(policy, _calls(chunks)), torch.no_grad():
            ref = tiny.model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(cached, ref, atol=2e-4, rtol=2e-4)
        assert cache.nbytes() == policy.kv_bytes(ids.shape[1])


@pytest.mark.parametrize("length", [100, 128, 129, 160, 256, 300])
def test_bytes_allocated_are_predicted(tiny, arch, length):
    """Below, at and above the group and residual boundaries, whole or chunked prefill, then decoding."""
    g = tiny.geometry
    mixed = np.random.default_rng(4).random((g.n_layers, g.n_kv_heads)) < 0.5
    policies = [HeadPolicy.full_cache(g, quant=8), HeadPolicy.full_cache(g, quant=4)]
    for bits in (8, 4, 2):
        policies += [HeadPolicy(g, mixed, sink=4, window=16, quant=bits),
                     HeadPolicy(g, mixed, sink=4, window=16, prefill="bounded", quant=bits),
                     HeadPolicy(g, mixed, sink=4, window=16, middle=8, quant=bits)]
    ids = _ids(length, seed=length)
    for policy in policies:
        prompt = length - 3
        chunks = [prompt, 1, 1, 1] if policy.one_call_prefill else [prompt // 2, prompt - prompt // 2, 1, 1, 1]
        cache = HeadwiseCache(policy, max_length=length)
        _cached_logits(tiny.model, ids, cache, chunks)
        assert cache.nbytes() == policy.kv_bytes(length), policy.describe()
    # Below R tokens all is residual; from a little after R (the two residual buffers are allocated whole),
    # fewer bytes than the unquantized cache, 2 bits fewest.
    plain = HeadPolicy.full_cache(g).kv_bytes(length)
    q8, q4, q2 = (HeadPolicy.full_cache(g, quant=b).kv_bytes(length) for b in (8, 4, 2))
    if length < KIVI_RESIDUAL:
        assert q2 == q4 == q8 == plain
    elif length >= KIVI_RESIDUAL + KIVI_GROUP:
        assert q2 < q4 < q8 < plain


def test_logits_near_full_and_fewer_bits_further(tiny, arch):
    """The prompt's one call attends unquantized (as KIVI's prefill); decoding reads the quantized prompt."""
    g = tiny.geometry
    ids = _ids(330, seed=7)
    chunks = [300] + [1] * 30
    logits = {bits: _cached_logits(tiny.model, ids, HeadwiseCache(HeadPolicy.full_cache(g, quant=bits)),
                                   chunks)[:, 300:] for bits in (0, 8, 4, 2)}
    scale = logits[0].abs().max()
    err8, err4, err2 = (float((logits[b] - logits[0]).abs().max() / scale) for b in (8, 4, 2))
    assert 1e-5 < err8 < 0.01
    assert err4 > 4 * err8 and err4 < 0.2
    assert err2 > 2 * err4 and err2 < 0.6


def test_four_bits_fit_more_full_heads_in_a_budget():
    g = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer()).geometry
    plain = parse_policy("random@kv0.5", g, context=1000)
    q4 = parse_policy("random@kv0.5+q4", g, context=1000)
    q8 = parse_policy("random@kv0.5+q8", g, context=1000)
    q2 = parse_policy("random@kv0.5+q2", g, context=1000)
    assert plain.n_full < q8.n_full <= q4.n_full <= q2.n_full
    budget = int(0.5 * HeadPolicy.full_cache(g).kv_bytes(1000))
    assert max(plain.kv_bytes(1000), q8.kv_bytes(1000), q4.kv_bytes(1000), q2.kv_bytes(1000)) <= budget


def test_a_budget_is_fitted_in_the_model_dtype_and_checked_against_it():
    """bfloat16 halves the plain heads' bytes but not the 8-bit codes: at the same share, fewer heads fit."""
    lm = headwise.from_model(tiny_model("llama-gqa").to(torch.bfloat16), tiny_tokenizer())
    g = lm.geometry
    as_float32 = parse_policy("random@kv0.5+q8", g, context=1000)
    as_bf16 = parse_policy("random@kv0.5+q8", g, context=1000, dtype_bytes=lm.dtype_bytes)
    assert lm.dtype_bytes == 2 and as_bf16.n_full < as_float32.n_full
    budget = int(0.5 * HeadPolicy.full_cache(g).kv_bytes(1000, dtype_bytes=2))
    assert as_bf16.kv_bytes(1000, dtype_bytes=2) <= budget < as_float32.kv_bytes(1000, dtype_bytes=2)
    ids = _ids(40)
    _cached_logits(lm.model, ids, HeadwiseCache(as_bf16), [40])
    with pytest.raises(HeadwiseError, match="fitted its KV budget for a 4-byte dtype, but this model's keys are "
                                            "bfloat16; build it for this model: parse_policy"):
        _cached_logits(lm.model, ids, HeadwiseCache(as_float32), [40])
    # Without quantization every head's bytes scale with the dtype: the same heads fit, and nothing is checked.
    plain = parse_policy("random@kv0.5", g, context=1000)
    assert np.array_equal(plain.full, parse_policy("random@kv0.5", g, context=1000, dtype_bytes=2).full)
    _cached_logits(lm.model, ids, HeadwiseCache(plain), [40])


def test_saved_policy_round_trip(tmp_path):
    g = headwise.from_model(tiny_model("qwen2"), tiny_tokenizer()).geometry
    policy = parse_policy("random@0.5+q4+mid8", g)
    back = CachePolicy.load(policy.save(tmp_path / "p.json"))
    assert back.quant == 4 and np.array_equal(back.full, policy.full)
    assert back.kv_bytes(500) == policy.kv_bytes(500) and back.describe() == policy.describe()
    assert "32 tokens" in policy.describe() and "128 tokens" in policy.describe()


def test_refusals():
    g = headwise.from_model(tiny_model("llama-gqa"), tiny_tokenizer()).geometry
    with pytest.raises(HeadwiseError, match=r"8, 4 or 2 bits"):
        parse_policy("full+q3", g)
    with pytest.raises(HeadwiseError, match="packs 2 codes per byte .* not a multiple of 2 here"):
        HeadPolicy.full_cache(replace(g, head_dim=15), quant=4)
    with pytest.raises(HeadwiseError, match="packs 4 codes per byte .* not a multiple of 4 here"):
        HeadPolicy.full_cache(replace(g, head_dim=18), quant=2)
    HeadPolicy.full_cache(replace(g, head_dim=18), quant=4)  # 18 is even
    store = QuantizedStore(16, 8)
    for dtype in (torch.float8_e4m3fn, torch.int32):
        with pytest.raises(HeadwiseError, match="8 bits"):
            store.append(torch.zeros(1, 2, 3, 16).to(dtype), torch.zeros(1, 2, 3, 16).to(dtype))
    QuantizedStore(16, 4).append(*(torch.zeros(1, 2, 3, 16).to(torch.float8_e4m3fn),) * 2)  # 4 bits < 8
    cache = HeadwiseCache(HeadPolicy.full_cache(g, quant=8))
    with pytest.raises(HeadwiseError, match="dim 8"):
        cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)
