"""Slow, obviously correct references written from the specs: explicit loops over tiles, groups, nibbles.

Independent of k2quant's kernels (no shared code): tests compare the kernels with these via torch.equal.
"""
from __future__ import annotations

import math

import torch

E4M3_MAX = 448.0


def fp8_quantize_ref(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek recipe per tile: s = max(amax, 1e-4)/448 (fp32); q = e4m3(clamp(x/s, +-448))."""
    n, k = w.shape
    nt, kt = math.ceil(n / block), math.ceil(k / block)
    scale = torch.empty(nt, kt, dtype=torch.float32)
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    for i in range(nt):
        for j in range(kt):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s = torch.clamp(tile.abs().max(), min=1e-4) / E4M3_MAX
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = \
                torch.clamp(tile / s, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fp8_dequant_ref(q: torch.Tensor, scale: torch.Tensor, block: int = 128,
                    out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    n, k = q.shape
    out = torch.empty(n, k, dtype=out_dtype)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            sl = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            out[sl] = (q[sl].float() * scale[i, j].float()).to(out_dtype)
    return out


def int4_quantize_ref(w: torch.Tensor, group: int = 32, rule: str = "library") -> tuple[torch.Tensor, torch.Tensor]:
    """Per group. library: bf16 arithmetic, amax/7.5, clamp [-8,7]; kimi: fp32, bf16(amax/7), clamp [-7,7]."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, k // group, dtype=torch.bfloat16)
    eps = torch.tensor(2.0 ** -7, dtype=torch.bfloat16)
    for r in range(n):
        for g in range(k // group):
            x = w[r, g * group:(g + 1) * group]
            if rule == "library":
                x = x.to(torch.bfloat16)
                amax = torch.maximum(x.min().clamp(max=0).abs(), x.max().clamp(min=0))
                s = amax / torch.tensor(7.5, dtype=torch.bfloat16)  # bf16 op: fp32 math, one rounding
                s = eps if s == 0 else s
                codes = torch.round(torch.clamp(x / s, -8, 7))  # x / s in bf16, as the library on CPU
            else:
                amax = x.float().abs().max()
                s = (amax / 7.0).to(torch.bfloat16)
                s = eps if s == 0 else s
                codes = torch.clamp(torch.round(x.float() / s.float()), -7, 7)
            scale[r, g] = s
            q[r, g * group:(g + 1) * group] = codes.to(torch.int8)
    return q, scale


def int4_dequant_ref(q: torch.Tensor, scale: torch.Tensor, group: int = 32) -> torch.Tensor:
    n, k = q.shape
    out = torch.empty(n, k, dtype=torch.bfloat16)
    for r in range(n):
        for g in range(k // group):
            out[r, g * group:(g + 1) * group] = q[r, g * group:(g + 1) * group].to(torch.bfloat16) * scale[r, g]
    return out


def pack_ref(q: torch.Tensor) -> torch.Tensor:
    """Element 8k+j (code + 8) in bits 4j..4j+3 of word k, stored as signed int32."""
    n, k = q.shape
    words = math.ceil(k / 8)
    out = torch.zeros(n, words, dtype=torch.int32)
    for r in range(n):
        for wi in range(words):
            v = 0
            for j in range(8):
                c = 8 * wi + j
                nib = int(q[r, c]) + 8 if c < k else 0
                v |= nib << (4 * j)
            out[r, wi] = v - (1 << 32) if v >= (1 << 31) else v
    return out


def _int4_code_ref(x: torch.Tensor, s: torch.Tensor, rule: str) -> torch.Tensor:
    """Codes of values ``x`` ``[N]`` with scales ``s`` ``[N]`` (bf16), as ``int4_quantize_ref`` rounds them."""
    if rule == "library":
        return torch.round(torch.clamp(x.to(torch.bfloat16) / s, -8, 7))
    return torch.clamp(torch.round(x.float() / s.float()), -7, 7)


def gptq_obs_ref(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, order: list[int], group: int = 32,
                 rule: str = "library", damp: float = 0.01, pin_extremes: bool = False) -> torch.Tensor:
    """GPTQ as the Optimal Brain Surgeon update (Frantar et al., eq. 3), float64, with fixed group scales.

    Columns are visited in ``order``; after quantizing column q the remaining columns F move by
    ``-(w_q - deq_q) / [H_F^-1]_qq * [H_F^-1]_{q,F}``, with ``H_F^-1`` the explicit inverse of the damped
    Hessian restricted to F (no Cholesky). ``pin_extremes``: an element whose |w| is its group's largest keeps
    the code sign(w) * 7. Returns int8 codes ``[N, K]``.
    """
    pinned = {}
    if pin_extremes:
        for r in range(w.shape[0]):
            for g0 in range(0, w.shape[1], group):
                grp = w[r, g0:g0 + group].float()
                for c in range(g0, g0 + group):
                    if grp[c - g0].abs() == grp.abs().max() and grp[c - g0] != 0:
                        pinned[(r, c)] = 7 if grp[c - g0] > 0 else -7
    w = w.to(torch.float64).clone()
    h = h.to(torch.float64).clone()
    d = torch.diagonal(h)
    d[d == 0] = 1.0
    h += damp * float(d.mean()) * torch.eye(h.shape[0], dtype=torch.float64)
    q = torch.empty(w.shape, dtype=torch.int8)
    remaining = list(order)
    while remaining:
        c = remaining[0]
        hinv = torch.linalg.inv(h[remaining][:, remaining])
        s = scale[:, c // group]
        codes = _int4_code_ref(w[:, c], s, rule)
        for (r, cc), v in pinned.items():
            if cc == c:
                codes[r] = v
        deq = (codes.to(torch.bfloat16) * s).to(torch.float64)
        q[:, c] = codes.to(torch.int8)
        err = (w[:, c] - deq) / hinv[0, 0]
        w[:, remaining] -= err[:, None] * hinv[0][None, :]
        remaining = remaining[1:]
    return q
