"""fp32 master weights for training in bf16."""
from __future__ import annotations

import torch
from torch import nn

from k2quant.qat import weights


class Masters:
    """fp32 master copies of the compute parameters.

    A bf16 parameter gets a separate fp32 master and is rounded to nearest bf16 after each step. A
    parameter that transformers holds wider in memory than the checkpoint stores it (``grid``: name ->
    stored dtype, e.g. transformers 5.24's fp32 router over a BF16 tensor on disk) is treated the same
    way: a separate fp32 master, the parameter kept on the stored dtype's grid, so that the checkpoint
    written holds exactly what the forward computed with. Other fp32 parameters (the fake-quantized
    targets) are their own master."""

    def __init__(self, model: nn.Module, grid: dict[str, torch.dtype] | None = None):
        self.grid = dict(grid or {})
        self.names, self.params, self.masters = [], [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                own = p.dtype == torch.float32 and name not in self.grid
                m = p if own else p.detach().float().clone().requires_grad_(True)
                self.names.append(name)
                self.params.append(p)
                self.masters.append(m)

    def grads_to_masters(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    def masters_to_params(self) -> None:
        with torch.no_grad():
            for n, p, m in zip(self.names, self.params, self.masters):
                if m is not p:
                    p.copy_(m.to(self.grid.get(n, p.dtype)))  # round to nearest bf16 (or the stored dtype)

    def stored(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A model state dict with the ``grid`` parameters in their stored dtype (exact: they lie on its grid)."""
        return {k: v.to(self.grid[k]) if k in self.grid else v for k, v in sd.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The separate fp32 masters (their local shards under FSDP) by parameter name."""
        return {n: weights.local_rows(m.detach())[0] for n, p, m in zip(self.names, self.params, self.masters) if m is not p}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p, m in zip(self.names, self.params, self.masters):
                if m is not p:
                    weights.local_rows(m)[0].copy_(sd[n])  # a rank's own shard under FSDP
        self.masters_to_params()
