"""The targeted weights of a prepared model under Kimi's per-expert names, their codes and fake-quant values.

Fused ``gate_up_proj [E, 2I, H]`` splits into ``E.gate_proj`` (rows ``:I``) and ``E.up_proj`` (rows ``I:``);
``down_proj [E, H, I]`` into ``E.down_proj``. Names are module names (no ``.weight``), as convert uses.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from k2quant.qat import wrap
from k2quant.quant import scheme as qscheme


def targeted(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, wrap.Holder]]:
    """``(module name, 2-D weight view, holder)`` for every fake-quantized weight, in model order."""
    for h in wrap.holders(model):
        module = model.get_submodule(h.name)
        if not h.experts:
            yield h.name, module.weight, h
            continue
        for param, projs in wrap.EXPERT_PROJ.items():
            w = getattr(module, param)
            for e in h.experts.get(param, ()):
                rows = w.shape[1] // len(projs)
                for i, proj in enumerate(projs):
                    yield f"{h.name}.{e}.{proj}", w[e, i * rows:(i + 1) * rows], h  # [N, K]


def fake_quant_weights(model: nn.Module, out_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """``{module: fq(w)}``: the weights a forward with fake quant on multiplies by."""
    with torch.no_grad():
        return {name: qscheme.kernels(h.scheme).fake_quantize(w.detach(), h.scheme, out_dtype=out_dtype)
                for name, w, h in targeted(model)}


def codes(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (int8 codes [N, K], scale [N, K/g])}`` of every targeted weight, as convert would write them."""
    with torch.no_grad():
        return {name: qscheme.kernels(h.scheme).quantize_weight(w.detach(), h.scheme) for name, w, h in targeted(model)}


def flip_rate(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Share of codes that differ between two ``{module: codes}`` snapshots (0.0 when empty)."""
    changed = sum(int((before[k] != after[k]).sum()) for k in after if k in before)
    total = sum(after[k].numel() for k in after if k in before)
    return changed / total if total else 0.0
