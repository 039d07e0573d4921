"""Fake-quant matmuls whose weight is recomputed in backward instead of saved.

``linear(x, w, scheme)`` computes ``F.linear(x, fq(w))`` with ``fq = dispatch.fake_quantize`` (the convert
kernels' own quantize -> dequantize, output in ``x.dtype``; on CPU one fused pass tested equal to them). Backward is the
straight-through estimator: ``dL/dw = dL/dfq(w)`` (identity), and ``fq(w)`` is recomputed from
``w`` rather than kept alive, so no full-size fake-quant copy survives between forward and backward.
Only ``x`` and ``w`` (a view of the parameter) are saved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from k2quant.quant import dispatch
from k2quant.quant.scheme import QuantScheme


def weight(w: torch.Tensor, scheme: QuantScheme | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The weight the forward uses: ``out_dtype(dequantize(quantize(w)))``; a plain cast when ``scheme`` is None."""
    with torch.no_grad():
        if scheme is None:  # fake quant switched off: the same matmul on the cast weight
            return w.detach().to(out_dtype)
        return dispatch.fake_quantize(w.detach(), scheme, out_dtype)  # one fused pass on CPU


class _FakeQuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, scheme: QuantScheme | None) -> torch.Tensor:  # type: ignore[override]
        ctx.scheme = scheme
        ctx.save_for_backward(x, w)
        return F.linear(x, weight(w, scheme, x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        wq = weight(w, ctx.scheme, grad.dtype)  # recomputed, never saved
        grad_x = grad @ wq if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            # STE: d fq(w) / dw = I. The matmul runs in the compute dtype, as autograd's would for a bf16
            # weight; the result is handed to the master in its own dtype.  [N, T] @ [T, K] -> [N, K]
            g2 = grad.reshape(-1, grad.shape[-1])  # [T, N]
            grad_w = (g2.t() @ x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(w.dtype)
        return grad_x, grad_w, None


def linear(x: torch.Tensor, w: torch.Tensor, scheme: QuantScheme | None) -> torch.Tensor:
    """``F.linear(x, fq(w))`` in ``x.dtype``; identity gradient to ``w``; fq(w) recomputed in backward."""
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _FakeQuantLinear.apply(x, w, scheme)
    return F.linear(x, weight(w, scheme, x.dtype))
