"""The real default model: the all-full HeadwiseCache is the default cache; a mixed policy shrinks bytes."""

from __future__ import annotations

import pytest
import torch

from headwise.kv import HeadPolicy, HeadwiseCache
from headwise.probes.needle import passkey_case

pytestmark = pytest.mark.slow


def test_full_policy_is_token_identical_on_smollm2(smollm2):
    case = passkey_case(smollm2.tokenizer, context=200, depth=0.5, seed=1)
    model, g = smollm2.model, smollm2.geometry
    with torch.no_grad():
        ref = model.generate(case.input_ids, max_new_tokens=6, do_sample=False)
        out = model.generate(case.input_ids, max_new_tokens=6, do_sample=False,
                             cache=HeadwiseCache(HeadPolicy.full_cache(g)))
        assert torch.equal(ref, out)
        logits = model(input_ids=ref).logits[:, -7:]
        cache = HeadwiseCache(HeadPolicy.full_cache(g))
        model(input_ids=ref[:, :-7], cache=cache, use_cache=True)
        stepped = model(input_ids=ref[:, -7:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(stepped, logits, atol=2e-4, rtol=1e-4)


def test_mixed_policy_bytes_on_smollm2(smollm2):
    g = smollm2.geometry
    policy = HeadPolicy.random(g, 0.25, seed=0, sink=16, window=64)
    case = passkey_case(smollm2.tokenizer, context=400, depth=0.5, seed=2)
    cache = HeadwiseCache(policy, max_length=case.length)
    with torch.no_grad():
        smollm2.model(input_ids=case.input_ids, cache=cache, use_cache=True)
    full = HeadPolicy.full_cache(g).kv_bytes(case.length)
    assert cache.nbytes() == policy.kv_bytes(case.length) < 0.45 * full
