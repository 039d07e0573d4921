"""QAT from an INT4 start (``--teacher`` with an INT4 source): latent weights in the start's code bins."""
from __future__ import annotations

import torch

from k2quant.qat import model as qat_model
from k2quant.quant import int4_group
from k2quant.quant import scheme as qscheme


def test_in_bins_keeps_the_start_exactly_and_moves_towards_the_teacher():
    scheme = qscheme.for_target("int4", scale_rule="kimi")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 64, 256, generator=g) * 0.02  # the unquantized (teacher) weights
    w[0, 0, :32] = 0  # an all-zero group
    start = int4_group.fake_quantize(w, scheme, torch.float32)  # on the grid, as read from an INT4 checkpoint
    start[1, 2, :32] = int4_group.fake_quantize(w[1, 2, :32].flip(0)[None], scheme, torch.float32)[0]  # moved codes
    latent = qat_model.in_bins(start, w, scheme)
    # step 0 computes exactly what the start computes (tests/qat/test_smollm2_qat.py: and exports its codes)
    assert torch.equal(int4_group.fake_quantize(latent, scheme, torch.bfloat16),
                       int4_group.fake_quantize(start, scheme, torch.bfloat16))
    dist_start, dist_latent = (start - w).abs(), (latent - w).abs()
    assert bool((dist_latent <= dist_start + 1e-6).all())  # never further from the teacher (up to bf16 rounding)
    assert float(dist_latent.sum()) < 0.05 * float(dist_start.sum())  # and almost on it
    assert float((latent != start).float().mean()) > 0.9  # off the grid points: updates can flip codes
