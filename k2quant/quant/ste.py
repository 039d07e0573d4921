"""Straight-through estimator: forward runs a quantize->dequantize exactly, backward is identity.

The forward output is exactly ``fn(w)`` (no ``w + (fq - w).detach()`` trick, which is not
bit-exact in floating point). Nothing is saved for backward, so no fake-quant copy stays alive.
"""
from __future__ import annotations

from typing import Callable

import torch


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        ctx.in_dtype = w.dtype
        with torch.no_grad():
            return fn(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad.to(ctx.in_dtype), None


def straight_through(w: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(w)`` in forward; the gradient w.r.t. ``w`` is passed through unchanged."""
    if not (torch.is_grad_enabled() and w.requires_grad):
        return fn(w)
    return _StraightThrough.apply(w, fn)
