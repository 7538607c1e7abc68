"""Full heads' keys and values stored in 8, 4 or 2 bits, KIVI's way (Liu et al., arXiv 2402.02750).

KIVI quantizes keys per channel and values per token, asymmetric min-max (scale and zero point
per group, q = round((x - min) / scale), x' = q * scale + min), and keeps the most recent tokens in
full precision (github.com/jy-yuan/KIVI, models/llama_kivi.py and quant/new_pack.py):
- keys: a residual of up to R full-precision tokens; once it reaches R they are quantized, each
  channel in groups of G tokens, and the residual empties. After T tokens, (T // R) * R are quantized.
- values: the last R tokens stay in full precision; each older one is quantized on its own, in
  groups of G channels (here: the whole head dim when G does not divide it). max(0, T - R) quantized.
G = 32 and R = 128: the group of the repository's examples (example.py: G = 32, R = 32) with the residual
of its LongBench script's defaults (utils/process_args.py: G = R = 128).

Storage: codes as uint8, two 4-bit or four 2-bit codes per byte (packed along the head dim, which must
then be a multiple of 2 or 4); scales and zero points (the group minimum, as KIVI stores it) in the
model's dtype; the two residual buffers of min(T, R) tokens in the model's dtype, allocated once. A
call's queries attend to earlier tokens as stored (dequantized) and to the call's own tokens in full
precision, as KIVI's prefill and decode do (and transformers' QuantizedCache): the quantization happens after the call.
Dequantizing happens at every call, into a transient tensor of one layer's full heads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import HeadwiseError

KIVI_GROUP = 32  # G: tokens per key group (per channel); channels per value group (per token)
KIVI_RESIDUAL = 128  # R: the most recent tokens kept in the model's dtype
BITS = (8, 4, 2)  # KIVI's paper reports 2 and 4 bits (KIVI-2, KIVI-4)
BITS_TEXT = "8, 4 or 2 bits (+q8, +q4, +q2)"
_GROWTH = 1.25  # capacity growth without a reserve, as layers.Store
_ALIGN = 16


def value_group(head_dim: int, group: int = KIVI_GROUP) -> int:
    """Channels per value group: G, or the whole head dim when G does not divide it."""
    return group if head_dim % group == 0 else head_dim


def check_quantizable(head_dim: int, bits: int, group: int = KIVI_GROUP, residual: int = KIVI_RESIDUAL) -> None:
    if bits not in BITS:
        raise HeadwiseError(f"full heads are stored in {BITS_TEXT}, not {bits}")
    if group < 1 or residual < group or residual % group:
        raise HeadwiseError(f"the residual ({residual} tokens) must be a positive multiple of the group ({group})")
    per_byte = 8 // bits
    if head_dim % per_byte:
        raise HeadwiseError(f"+q{bits} packs {per_byte} codes per byte along the head dim, which is not a multiple of "
                            f"{per_byte} here ({head_dim}); use +q8")


def check_dtype(dtype: torch.dtype, bits: int) -> None:
    """Refuse keys that quantizing cannot shrink: not floating point, or no more bits than the codes."""
    if not dtype.is_floating_point or torch.finfo(dtype).bits <= bits:
        why = "not floating point" if not dtype.is_floating_point else f"no more than {bits} bits"
        raise HeadwiseError(f"+q{bits} stores keys and values in {bits} bits, but this model's are {dtype} ({why}); "
                            f"drop +q{bits}, or quantize to fewer bits than the model's dtype has")


def quantized_head_bytes(tokens: int, head_dim: int, bits: int, dtype_bytes: int, group: int = KIVI_GROUP,
                         residual: int = KIVI_RESIDUAL) -> int:
    """Bytes one quantized KV head holds after `tokens` tokens (batch 1): codes, scales, zero points and
    residuals, as QuantizedStore allocates them when reserved for `tokens`."""
    check_quantizable(head_dim, bits, group, residual)
    code_bytes = head_dim * bits // 8  # one token's codes
    keys_q = tokens // residual * residual
    values_q = max(0, tokens - residual)
    keys = keys_q * code_bytes + 2 * (keys_q // group) * head_dim * dtype_bytes
    values = values_q * code_bytes + 2 * values_q * (head_dim // value_group(head_dim, group)) * dtype_bytes
    return keys + values + 2 * min(tokens, residual) * head_dim * dtype_bytes


# ---- the quantizer -------------------------------------------------------------------------------
def minmax_quantize(x: Tensor, dim: int, bits: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min-max over `dim` (kept): uint8 codes, scale and zero point (the minimum) in `dtype`.
    Codes are computed from the stored scale and zero point, so |x - dequantized| <= scale / 2."""
    xf = x.float()
    lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    scale = ((hi - lo) / (2 ** bits - 1)).to(dtype)
    zero = lo.to(dtype)
    s = scale.float()
    q = ((xf - zero.float()) / torch.where(s > 0, s, torch.ones_like(s))).round_().clamp_(0, 2 ** bits - 1)
    return q.to(torch.uint8), scale, zero


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [..., d] -> [..., d * bits / 8]: 8 / bits codes per byte, code i of each run of 8 / bits in bits
    i * bits and up (4 bits: the even index in the low nibble)."""
    per_byte = 8 // bits
    out = codes[..., 0::per_byte].clone()
    for i in range(1, per_byte):
        out |= codes[..., i::per_byte] << (i * bits)
    return out


def unpack(packed: Tensor, bits: int) -> Tensor:
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    return torch.stack([(packed >> (i * bits)) & mask for i in range(8 // bits)], -1).flatten(-2)


def quantize_keys(k: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """[b, h, n, d] keys, n a multiple of `group` -> packed codes [b, h, n, d*bits/8], scale and zero
    [b, h, n / group, d]: each channel over each group of `group` tokens."""
    b, h, n, d = k.shape
    q, scale, zero = minmax_quantize(k.reshape(b, h, n // group, group, d), 3, bits, k.dtype)
    return pack(q.reshape(b, h, n, d), bits), scale.squeeze(3), zero.squeeze(3)


def dequantize_keys(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int, out: Tensor) -> None:
    # In place in `out` (the codes converted by the copy): no temporary of the dequantized size.
    b, h, n, d = out.shape
    grouped = out.view(b, h, n // group, group, d)
    grouped.copy_(unpack(packed, bits).view(b, h, n // group, group, d))
    grouped.mul_(scale[:, :, :, None]).add_(zero[:, :, :, None])


def quantize_values(v: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """[b, h, n, d] values -> packed codes [b, h, n, d*bits/8], scale and zero [b, h, n, d / group]: each token
    over each group of `group` channels."""
    b, h, n, d = v.shape
    q, scale, zero = minmax_quantize(v.reshape(b, h, n, d // group, group), 4, bits, v.dtype)
    return pack(q.reshape(b, h, n, d), bits), scale.squeeze(4), zero.squeeze(4)


def dequantize_values(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int, out: Tensor) -> None:
    b, h, n, d = out.shape
    grouped = out.view(b, h, n, d // group, group)
    grouped.copy_(unpack(packed, bits).view(b, h, n, d // group, group))
    grouped.mul_(scale[..., None]).add_(zero[..., None])


# ---- the store -----------------------------------------------------------------------------------
class _Grown:
    """Quantized codes, scales and zero points along the token axis (dim 2), grown in place."""

    def __init__(self) -> None:
        self.parts: list[Tensor] | None = None
        self.cap = 0  # tokens allocated
        self.length = 0  # tokens (for key scales: tokens / group rows are used)

    def append(self, parts: tuple[Tensor, ...], rows: tuple[int, ...], tokens: int, capacity: int) -> None:
        """parts[i] holds rows[i] rows per token-slot unit; `capacity` is in tokens."""
        need = self.length + tokens
        if self.parts is None or need > self.cap:
            cap = max(need, capacity)
            new = [p.new_empty(*p.shape[:2], cap // r, *p.shape[3:]) for p, r in zip(parts, rows)]
            if self.parts is not None:
                for n, o, r in zip(new, self.parts, rows):
                    n[:, :, :self.length // r] = o[:, :, :self.length // r]
            self.parts, self.cap = new, cap
        for dst, src, r in zip(self.parts, parts, rows):
            dst[:, :, self.length // r:need // r] = src
        self.length = need

    def used(self, rows: tuple[int, ...]) -> list[Tensor]:
        return [p[:, :, :self.length // r] for p, r in zip(self.parts, rows)]

    def nbytes(self) -> int:
        return 0 if self.parts is None else sum(p.numel() * p.element_size() for p in self.parts)


class QuantizedStore:
    """A layers.Store for full heads whose keys and values are held in `bits` bits (KIVI).

    `update(k, v)` returns what the call's queries attend to (earlier tokens dequantized, the call's own
    in full precision) and stores the call; `keys` / `values` dequantize what is stored."""

    def __init__(self, head_dim: int, bits: int, reserve: int | None = None, group: int = KIVI_GROUP,
                 residual: int = KIVI_RESIDUAL):
        check_quantizable(head_dim, bits, group, residual)
        self.head_dim, self.bits, self.group, self.residual = head_dim, bits, group, residual
        self.vgroup = value_group(head_dim, group)
        self.reserve = reserve
        self.length = 0
        self.kq, self.vq = _Grown(), _Grown()  # quantized keys (codes, scale, zero); values likewise
        self.kr: Tensor | None = None  # residual keys [b, h, R, d] in the model's dtype; the first kr_len valid
        self.vr: Tensor | None = None
        self.kr_len = self.vr_len = 0

    # ---- storing -----------------------------------------------------------------------------
    def append(self, k: Tensor, v: Tensor) -> None:
        if self.kr is None:
            check_dtype(k.dtype, self.bits)
            cap = self.residual if self.reserve is None else min(self.residual, self.reserve)
            self.kr = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            self.vr = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
        r = self.residual
        # Keys: the residual and the call; whole runs of R tokens are quantized, the rest waits.
        keys = torch.cat([self.kr[:, :, :self.kr_len], k], 2) if self.kr_len else k
        n_q = keys.shape[2] // r * r
        if n_q:
            codes, scale, zero = quantize_keys(keys[:, :, :n_q], self.bits, self.group)
            self.kq.append((codes, scale, zero), (1, self.group, self.group), n_q, self._capacity(self.kq, n_q, True))
        self.kr_len = self._keep(self.kr, keys[:, :, n_q:])
        # Values: the last R tokens stay; every older one is quantized.
        values = torch.cat([self.vr[:, :, :self.vr_len], v], 2) if self.vr_len else v
        n_q = max(0, values.shape[2] - r)
        if n_q:
            codes, scale, zero = quantize_values(values[:, :, :n_q], self.bits, self.vgroup)
            self.vq.append((codes, scale, zero), (1, 1, 1), n_q, self._capacity(self.vq, n_q, False))
        self.vr_len = self._keep(self.vr, values[:, :, n_q:])
        self.length += k.shape[2]

    def _capacity(self, part: _Grown, adding: int, keys: bool) -> int:
        """Tokens to allocate when `part` must grow: what the reserve will need, else +25% (keys: whole runs
        of R tokens, so that their scales stay whole groups)."""
        r = self.residual
        if part.parts is None and self.reserve is not None:
            return self.reserve // r * r if keys else max(0, self.reserve - r)
        cap = max(part.length + adding, int(part.length * _GROWTH))
        unit = r if keys else _ALIGN
        return -(-cap // unit) * unit

    @staticmethod
    def _keep(buffer: Tensor, rest: Tensor) -> int:
        buffer[:, :, :rest.shape[2]] = rest  # `rest` never aliases `buffer`: it is a slice of a new cat or the call
        return rest.shape[2]

    # ---- reading -----------------------------------------------------------------------------
    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values the call's queries attend to, [b, h, T, d]; then the call is stored."""
        before, n = self.length, k.shape[2]
        out_k = k.new_empty(k.shape[0], k.shape[1], before + n, k.shape[3])
        out_v = v.new_empty(v.shape[0], v.shape[1], before + n, v.shape[3])
        if before:
            self._keys_into(out_k[:, :, :before])
            self._values_into(out_v[:, :, :before])
        out_k[:, :, before:] = k
        out_v[:, :, before:] = v
        self.append(k, v)
        return out_k, out_v

    def _keys_into(self, out: Tensor) -> None:
        n = self.kq.length
        if n:
            codes, scale, zero = self.kq.used((1, self.group, self.group))
            dequantize_keys(codes, scale, zero, self.bits, self.group, out[:, :, :n])
        out[:, :, n:] = self.kr[:, :, :self.kr_len]

    def _values_into(self, out: Tensor) -> None:
        n = self.vq.length
        if n:
            codes, scale, zero = self.vq.used((1, 1, 1))
            dequantize_values(codes, scale, zero, self.bits, self.vgroup, out[:, :, :n])
        out[:, :, n:] = self.vr[:, :, :self.vr_len]

    @property
    def keys(self) -> Tensor:
        out = self.kr.new_empty(*self.kr.shape[:2], self.length, self.head_dim)
        self._keys_into(out)
        return out

    @property
    def values(self) -> Tensor:
        out = self.vr.new_empty(*self.vr.shape[:2], self.length, self.head_dim)
        self._values_into(out)
        return out

    def per_head_bytes(self) -> float:
        if self.kr is None:
            return 0.0
        held = self.kq.nbytes() + self.vq.nbytes() + sum(t.numel() * t.element_size() for t in (self.kr, self.vr))
        return held / self.kr.shape[1]


__all__ = ["BITS", "BITS_TEXT", "KIVI_GROUP", "KIVI_RESIDUAL", "QuantizedStore", "check_dtype", "check_quantizable",
           "dequantize_keys", "dequantize_values", "minmax_quantize", "pack", "quantize_keys", "quantize_values",
           "quantized_head_bytes", "unpack", "value_group"]
