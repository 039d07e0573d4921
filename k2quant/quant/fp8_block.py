"""Block-FP8 (E4M3, one fp32 scale per ``block_size`` tile), DeepSeek's published recipe.

Shapes: ``w`` is ``[..., N, K]``; ``scale`` is ``[..., ceil(N/bn), ceil(K/bk)]`` fp32. Partial edge
tiles have their own scale over their real elements (zero padding cannot raise an amax).

    scale = max(amax, 1e-4) / 448              (fp32, per tile)
    q     = e4m3(clamp(fp32(w) / scale, +-448)) (round to nearest even)
    w'    = out_dtype(fp32(q) * scale)          (one fp32 multiply, one rounding)
"""
from __future__ import annotations

import torch

from k2quant.quant import ste
from k2quant.quant.scheme import QuantScheme

FP8_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
#: Lower bound on a tile's amax (DeepSeek kernel.py since Aug 2025): an all-zero tile gets a finite scale.
AMAX_FLOOR = 1e-4


def grid_shape(shape: tuple[int, ...] | torch.Size, block_size: tuple[int, int]) -> tuple[int, ...]:
    """Scale-grid shape for a weight shape: ``[..., ceil(N/bn), ceil(K/bk)]``."""
    *lead, n, k = shape
    bn, bk = block_size
    return (*lead, -(-n // bn), -(-k // bk))


def _tiles(w: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """fp32 zero-padded tile view ``[..., Nt, bn, Kt, bk]``."""
    *lead, n, k = w.shape
    bn, bk = block_size
    nt, kt = -(-n // bn), -(-k // bk)
    w32 = w.to(torch.float32)
    if nt * bn != n or kt * bk != k:
        w32 = torch.nn.functional.pad(w32, (0, kt * bk - k, 0, nt * bn - n))
    return w32.reshape(*lead, nt, bn, kt, bk)


def _expand(scale: torch.Tensor, shape: torch.Size, block_size: tuple[int, int]) -> torch.Tensor:
    """Repeat each tile's scale over its tile and crop to ``shape`` (``[..., N, K]``)."""
    bn, bk = block_size
    n, k = shape[-2], shape[-1]
    full = scale.repeat_interleave(bn, dim=-2).repeat_interleave(bk, dim=-1)
    return full[..., :n, :k]


def compute_scale(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Per-tile dequant multiplier, fp32 ``[..., ceil(N/bn), ceil(K/bk)]``."""
    amax = _tiles(w, scheme.block_size).abs().amax(dim=(-3, -1))  # [..., Nt, Kt]
    return amax.clamp_min(AMAX_FLOOR) / FP8_E4M3_MAX


def quantize(w: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """E4M3 codes ``[..., N, K]`` for ``w`` under per-tile ``scale``."""
    x = w.to(torch.float32) / _expand(scale.to(torch.float32), w.shape, scheme.block_size)
    # clamp before the cast: older torch CPU casts do not saturate (overflow gives NaN)
    return x.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)


def dequantize(q: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``out_dtype(fp32(q) * scale)`` with the tile scale repeated and cropped."""
    w32 = q.to(torch.float32) * _expand(scale.to(torch.float32), q.shape, scheme.block_size)
    return w32.to(out_dtype)


def quantize_weight(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` for a float weight."""
    scale = compute_scale(w, scheme)
    return quantize(w, scale, scheme), scale


def fake_quantize(w: torch.Tensor, scheme: QuantScheme, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dequantize(quantize(w))`` in forward, identity gradient in backward."""
    dtype = out_dtype or w.dtype

    def fn(x: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_weight(x, scheme)
        return dequantize(q, scale, scheme, dtype)

    return ste.straight_through(w, fn)
