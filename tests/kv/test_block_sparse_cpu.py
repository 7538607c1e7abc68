"""kv.block_sparse_cpu: the fused CPU kernel builds here, is the CPU's default, holds in bfloat16, and when it
cannot be built the PyTorch path runs instead, with one warning."""

from __future__ import annotations

import os

import pytest
import torch

from headwise.kv import block_sparse_cpu
from headwise.kv.block_sparse import block_sparse_prefill_attention
from headwise.kv.block_sparse_cpu import fused_available
from headwise.kv.streaming import StreamingKeys
from tests.kv.test_block_sparse import _call, _pattern_reference


def test_the_fused_kernel_is_the_cpu_default_and_holds_in_bfloat16():
    """The fused kernel builds here (CI's machine) and runs float32 and, where oneDNN packs it, bfloat16; in
    bfloat16 it is as close to the float64 pattern as SDPA's kernel is."""
    if os.environ.get("HEADWISE_FUSED_KERNEL") == "0":
        pytest.skip("HEADWISE_FUSED_KERNEL=0 turns the fused kernel off")
    query, keys, values, st = _call(seed=11, m=700, n=700, d=16)
    assert fused_available(query)
    torch.testing.assert_close(block_sparse_prefill_attention(query, st, 0.3, 64, 100, 3),
                               block_sparse_prefill_attention(query, st, 0.3, 64, 100, 3, path="fused"))
    bf = query.bfloat16()
    if not fused_available(bf):
        pytest.skip("oneDNN cannot pack bfloat16 on this CPU: bfloat16 takes the flash path")
    ref = _pattern_reference(query, keys, values, 0.3, 64, 100, 3)
    st16 = StreamingKeys(keys.bfloat16(), values.bfloat16(), st.positions, None, None, 0)
    fused = block_sparse_prefill_attention(bf, st16, 0.3, 64, 100, 3, path="fused").double()
    flash = block_sparse_prefill_attention(bf, st16, 0.3, 64, 100, 3, path="flash").double()
    assert (fused - ref).abs().max() <= 1.5 * (flash - ref).abs().max()
    assert (fused - ref).abs().mean() <= 1.5 * (flash - ref).abs().mean()


def test_without_a_compiler_the_pytorch_path_runs_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(UserWarning, match="did not build") as caught:
        assert block_sparse_cpu._module.__wrapped__() is None  # the build, past the cache of this process's one
    assert len(caught) == 1
    monkeypatch.setattr(block_sparse_cpu, "_module", lambda: None)  # what the cache then holds
    query, keys, values, st = _call(seed=2, m=450, n=450)
    assert not fused_available(query)
    torch.testing.assert_close(block_sparse_prefill_attention(query, st, 0.3, 5, 30, 2).double(),
                               _pattern_reference(query, keys, values, 0.3, 5, 30, 2), atol=2e-5, rtol=1e-5)
