"""Symmetric INT4 with one scale per ``group_size`` inputs of a row, and its int32 packing.

Shapes: ``w`` ``[..., N, K]``, ``K % group_size == 0``; ``scale`` ``[..., N, K/g]`` bf16;
codes int8 ``[..., N, K]``; ``packed`` int32 ``[..., N, ceil(K/8)]``.

Two scale rules (``scheme.scale_rule``):

- ``library`` (compressed-tensors 0.20 on CPU, bit for bit): in bf16, amax = max(|min(w,0)|, max(w,0));
  scale = bf16(amax / 7.5), 0 -> bf16 eps; q = round_half_even(clamp(bf16(w / scale), -8, 7)).
- ``kimi`` (K2-Thinking's convention): scale = bf16(fp32(amax) / 7), 0 -> bf16 eps;
  q = clamp(round_half_even(fp32(w) / fp32(scale)), -7, 7). Idempotent on its own dequantized output.

Dequant is ``out_dtype(fp32(q) * fp32(scale))``: the library's bf16 product, one rounding.
Packing: code + 8 as a nibble; element 8k+j sits in bits 4j..4j+3 of word k (signed int32).
"""
from __future__ import annotations

import torch

from k2quant.quant import ste
from k2quant.quant.scheme import QuantScheme

INT4_MIN, INT4_MAX = -8, 7
OFFSET = 8
PACK_FACTOR = 8  # nibbles per int32 word
#: Library: amax / ((q_max - q_min) / 2); Kimi: amax / 7 (codes -7..7, 15 levels).
DIVISOR = {"library": (INT4_MAX - INT4_MIN) / 2, "kimi": float(INT4_MAX)}
CODE_RANGE = {"library": (INT4_MIN, INT4_MAX), "kimi": (-INT4_MAX, INT4_MAX)}
SCALE_DTYPE = torch.bfloat16
_ZERO_SCALE = torch.finfo(SCALE_DTYPE).eps  # 2**-7, what the library puts in all-zero groups


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``[..., N, K/g, g]`` of ``w``."""
    *lead, n, k = w.shape
    assert k % group_size == 0, f"K={k} not divisible by group size {group_size}"
    return w.reshape(*lead, n, k // group_size, group_size)


def group_amax(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Per-group amax ``[..., N, K/g]`` as the rule computes it (library: in bf16; kimi: in fp32)."""
    if scheme.scale_rule == "library":
        g = _groups(w.to(SCALE_DTYPE), scheme.group_size)  # the library computes in the weight dtype
        return torch.maximum(g.amin(dim=-1).clamp(max=0).abs(), g.amax(dim=-1).clamp(min=0))
    return _groups(w.to(torch.float32), scheme.group_size).abs().amax(dim=-1)


def scale_of_amax(amax: torch.Tensor, rule: str) -> torch.Tensor:
    """The rule's bf16 scale for group amax values (0 -> bf16 eps)."""
    scale = (amax.to(torch.float32) / DIVISOR[rule]).to(SCALE_DTYPE)
    return scale.masked_fill(scale == 0, _ZERO_SCALE)


def compute_scale(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Per-group dequant multiplier, bf16 ``[..., N, K/g]``."""
    return scale_of_amax(group_amax(w, scheme), scheme.scale_rule)


def quantize_values(x: torch.Tensor, scale: torch.Tensor, rule: str) -> torch.Tensor:
    """int8 codes of ``x`` with ``scale`` broadcast against it (any shapes): the one rounding expression of a rule.

    GPTQ quantizes one column at a time with this; ``quantize`` applies it group by group.
    """
    lo, hi = CODE_RANGE[rule]
    x = x.to(SCALE_DTYPE if rule == "library" else torch.float32)
    r = x.to(torch.float32) / scale.to(torch.float32)
    if rule == "library":
        r = r.to(SCALE_DTYPE).to(torch.float32)  # the library's division result is rounded to bf16
    return r.clamp_(lo, hi).round_().to(torch.int8)


def quantize(w: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """int8 codes ``[..., N, K]``."""
    q = quantize_values(_groups(w, scheme.group_size), scale.unsqueeze(-1), scheme.scale_rule)  # [..., N, K/g, g]
    return q.reshape(w.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``out_dtype(fp32(q) * fp32(scale))`` ``[..., N, K]``."""
    w = _groups(q.to(torch.float32), scheme.group_size) * scale.to(torch.float32).unsqueeze(-1)
    return w.reshape(q.shape).to(out_dtype)


def quantize_weight(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` for a float weight."""
    scale = compute_scale(w, scheme)
    return quantize(w, scale, scheme), scale


def fake_quantize(w: torch.Tensor, scheme: QuantScheme, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dequantize(quantize(w))`` in forward (bf16 product unless ``out_dtype``), identity backward."""
    dtype = out_dtype or w.dtype

    def fn(x: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_weight(x, scheme)
        return dequantize(q, scale, scheme, SCALE_DTYPE).to(dtype)

    return ste.straight_through(w, fn)


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 codes ``[..., N, K]`` -> int32 ``[..., N, ceil(K/8)]``; padding nibbles are raw 0."""
    *lead, n, k = q.shape
    words = -(-k // PACK_FACTOR)
    u = (q.to(torch.int64) + OFFSET)
    if words * PACK_FACTOR != k:
        u = torch.nn.functional.pad(u, (0, words * PACK_FACTOR - k))
    u = u.reshape(*lead, n, words, PACK_FACTOR)  # [..., N, K/8, 8]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    v = (u << shifts).sum(dim=-1)  # unsigned 32-bit pattern in int64
    v = torch.where(v >= 2**31, v - 2**32, v)  # as signed int32 (two's complement)
    return v.to(torch.int32)


def unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """int32 ``[..., N, W]`` -> int8 codes ``[..., N, k]``."""
    v = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=packed.device)
    u = (v.unsqueeze(-1) >> shifts) & 0xF  # [..., N, W, 8]
    u = u.reshape(*packed.shape[:-1], -1)[..., :k]
    return (u - OFFSET).to(torch.int8)
