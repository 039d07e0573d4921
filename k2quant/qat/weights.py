"""The targeted weights of a prepared model under Kimi's per-expert names, their codes and fake-quant values.

Fused ``gate_up_proj [E, 2I, H]`` splits into ``E.gate_proj`` (rows ``:I``) and ``E.up_proj`` (rows ``I:``);
``down_proj [E, H, I]`` into ``E.down_proj``. Names are module names (no ``.weight``), as convert uses.

Under FSDP2 a parameter is a ``DTensor`` sharded along dim 0 (``torch.chunk`` rows); only the rows this
process holds are visited (whole experts, or rows of a Linear). INT4 groups run along the last dim, so
the codes of local rows are exactly those rows' codes: nothing is gathered.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = Shard = ()  # type: ignore[assignment,misc]

from k2quant.errors import K2QuantError
from k2quant.qat import wrap
from k2quant.quant import dispatch


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(this process's rows, index of its first row)``; the tensor itself and 0 when not sharded."""
    if not isinstance(t, DTensor):
        return t, 0
    if not all(isinstance(p, Shard) and p.dim == 0 for p in t.placements):
        raise K2QuantError(f"parameter of shape {tuple(t.shape)} sharded as {t.placements}; k2quant qat expects "
                           f"FSDP2's row sharding (Shard(0))")
    chunk = -(-t.shape[0] // t.device_mesh.size())  # torch.chunk's rows per rank
    return t.to_local(), min(t.device_mesh.get_local_rank() * chunk, t.shape[0])


def targeted(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, wrap.Holder]]:
    """``(module name, 2-D weight view, holder)`` for every fake-quantized weight this process holds, in
    model order (a Linear sharded by FSDP2 under ``name@first_row``)."""
    for h in wrap.holders(model):
        module = model.get_submodule(h.name)
        if not h.experts:
            w, first = local_rows(module.weight)
            if w.numel():
                yield (f"{h.name}@{first}" if isinstance(module.weight, DTensor) else h.name), w, h
            continue
        for param, projs in wrap.EXPERT_PROJ.items():
            w, first = local_rows(getattr(module, param))
            for e in h.experts.get(param, ()):
                if not first <= e < first + w.shape[0]:
                    continue  # another process's expert
                rows = w.shape[1] // len(projs)
                for i, proj in enumerate(projs):
                    yield f"{h.name}.{e}.{proj}", w[e - first, i * rows:(i + 1) * rows], h  # [N, K]


def fake_quant_weights(model: nn.Module, out_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """``{module: fq(w)}``: the weights a forward with fake quant on multiplies by."""
    with torch.no_grad():
        return {name: dispatch.kernels(h.scheme).fake_quantize(w.detach(), h.scheme, out_dtype=out_dtype)
                for name, w, h in targeted(model)}


def codes(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (int8 codes [N, K], scale [N, K/g])}`` of every targeted weight, as convert would write them."""
    with torch.no_grad():
        return {name: dispatch.kernels(h.scheme).quantize_weight(w.detach(), h.scheme) for name, w, h in targeted(model)}


def flip_counts(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(codes that differ, codes compared)`` between two ``{module: codes}`` snapshots."""
    changed = sum(int((before[k] != after[k]).sum()) for k in after if k in before)
    return changed, sum(after[k].numel() for k in after if k in before)


def flip_rate(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
              sum_over: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Share of codes that differ between two ``{module: codes}`` snapshots (0.0 when empty). Among several
    processes each snapshot holds only its own rows: ``sum_over`` sums the counts over them."""
    n = torch.tensor(flip_counts(before, after), dtype=torch.float64)
    if sum_over is not None:
        n = sum_over(n)
    return float(n[0] / n[1]) if n[1] else 0.0
