"""The fused CPU kernel of the block-sparse prompt attention (`+blocksK`), block_sparse_cpu.cpp.

It is compiled by PyTorch's extension builder the first time a `+blocksK` prefill runs on a CPU (about 20 s, once
per machine and PyTorch version; cached in PyTorch's extensions directory). Where it cannot be built (no C++
compiler or ninja) or cannot run (float16; bfloat16 without oneDNN's packing), block_sparse.py takes its PyTorch
path: the same pattern, slower. HEADWISE_FUSED_KERNEL=0 forces that path (for side-by-side timing).
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._progress import note

SOURCE = Path(__file__).with_name("block_sparse_cpu.cpp")
_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
          "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"]}


@functools.cache
def _module() -> Any | None:
    if os.environ.get("HEADWISE_FUSED_KERNEL", "1") == "0":
        return None
    from torch.utils.cpp_extension import get_default_build_root, load

    capability = torch.backends.cpu.get_cpu_capability()
    tag = hashlib.sha256(f"{SOURCE.read_bytes()!r}{torch.__version__}{capability}openmp".encode()).hexdigest()[:12]
    name = f"headwise_block_sparse_cpu_{tag}"
    if not list(Path(get_default_build_root()).glob(f"**/{name}.so")):
        note("building the block-sparse CPU kernel (once per machine, ~20 s)")
    try:
        # -fopenmp: at::parallel_for is inlined here; without it the kernel runs on one thread. It links the
        # libgomp PyTorch has loaded (the same soname), so torch.set_num_threads governs it too.
        return load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp", *_FLAGS.get(capability, [])],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a toolchain PyTorch cannot use: the PyTorch path stays
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"headwise: the fused block-sparse CPU kernel did not build ({reason}); +blocksK prefills "
                      "take the slower PyTorch path (set HEADWISE_FUSED_KERNEL=0 to skip the build)", stacklevel=2)
        return None


def fused_available(query: Tensor) -> bool:
    """Whether the fused kernel runs `query`'s prefill: a CPU tensor in float32, or in bfloat16 where oneDNN packs
    it (AMX or AVX512-BF16), with an even head dimension."""
    if query.device.type != "cpu" or query.dtype not in (torch.float32, torch.bfloat16) or query.shape[-1] % 2:
        return False
    module = _module()
    return module is not None and (query.dtype == torch.float32 or module.packs_bfloat16())


def fused_block_sparse(query: Tensor, heads: Tensor, out: Tensor, keys: Tensor, values: Tensor, table: Tensor,
                       n_open: int, q0: int, sink: int, window: int, scaling: float) -> None:
    """Into `out` [b, h, m, d]: the attention of `query` [b, h, m, d] (both any strides, d contiguous) at the query
    heads `heads` (each KV head's group of query heads in turn) and positions q0 .. m - 1, over keys/values
    [b * kv, NB * 64, d] (padded to whole blocks). table [b * len(heads), NQ, L]: each query block's key blocks, -1
    for none, the first `n_open` read whole and the others masked to the sinks and each query's window."""
    kv, n, d = keys.shape
    nb = n // 64
    if query.dtype == torch.bfloat16:  # oneDNN's VNNI layout: pairs along the reduced dimension are adjacent
        kpack = keys.reshape(kv, nb, 64, d // 2, 2).permute(0, 1, 3, 2, 4)  # K^T per block: reduce over d
        vpack = values.reshape(kv, nb, 32, 2, d).transpose(-1, -2)  # V per block: reduce over the keys
    else:
        kpack, vpack = keys.reshape(kv, nb, 64, d).transpose(-1, -2), values.reshape(kv, nb, 64, d)
    _module().block_sparse_attention(query, heads.contiguous(), kpack.contiguous(), vpack.contiguous(),
                                     table.to(torch.int32).contiguous(), n_open, q0, sink, window, scaling, out)


__all__ = ["fused_available", "fused_block_sparse"]
