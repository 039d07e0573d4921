"""Put fake quantization on a transformers model's targeted weights, and take it off.

Targets are chosen by the scheme (``QuantScheme.matches``) on the per-expert module names the checkpoint
stores (``model.layers.L.mlp.experts.E.{gate,up,down}_proj``) and on Linear names, with the class names
compressed-tensors matches (``Linear``, the experts class such as ``Qwen3MoeExperts``), exactly as convert
chooses them, so the fake-quantized set and the exported INT4 set are the same. Any transformers model with
these modules works (DeepSeek-V3/Kimi, Qwen3-MoE, Llama, ...). Two kinds of holder:

- transformers 5's fused experts (``gate_up_proj [E, 2I, H]``, gate rows first, ``down_proj [E, H, I]``):
  the forward is replaced by the same eager loop, in which each *hit* expert's slice is fake-quantized
  once per forward through ``fake_quant.linear`` (fq recomputed in backward, never saved). Row groups
  run along H (resp. I), so the ``[2I, H]`` slice quantizes exactly like separate gate and up.
- ``nn.Linear`` (when ``--targets`` widens to shared experts, attention, ...): ``fake_quant.linear``.

Parameters keep their names and dtypes; only ``forward`` is shadowed per instance, so state dicts,
optimizers and FSDP see the model unchanged. Apply before any sharding.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
from torch import nn

from k2quant.errors import SchemeError
from k2quant.qat import fake_quant
from k2quant.quant.scheme import QuantScheme

ATTR = "_k2q_qat"  # per-instance state of a prepared module
EXPERT_PROJ = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


@dataclasses.dataclass
class Holder:
    """One prepared module: which of its weights are fake-quantized, and whether quant is on."""

    name: str
    scheme: QuantScheme
    experts: dict[str, tuple[int, ...]]  # fused param -> targeted expert indices ({} for a Linear)
    enabled: bool = True

    def scheme_for(self, param: str, expert: int | None = None) -> QuantScheme | None:
        if not self.enabled:
            return None
        if expert is None:
            return self.scheme
        return self.scheme if expert in self.experts.get(param, ()) else None


def is_fused_experts(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, p, None), nn.Parameter) and getattr(module, p).dim() == 3
               for p in EXPERT_PROJ)


def _expert_targets(name: str, module: nn.Module, scheme: QuantScheme) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    problems = []
    for param, projs in EXPERT_PROJ.items():
        hit = []
        for e in range(getattr(module, param).shape[0]):
            flags = [scheme.matches(f"{name}.{e}.{p}", ("Linear", type(module).__name__)) for p in projs]
            if any(flags) and not all(flags):
                problems.append(f"{name}.{e}: gate_proj and up_proj are stored fused ({name}.{param}); both must "
                                f"be targeted or both ignored, found {dict(zip(projs, flags))}: adjust --targets/--ignore")
            if all(flags):
                hit.append(e)
        if hit:
            out[param] = tuple(hit)
    if problems:
        raise SchemeError(problems[0] if len(problems) == 1 else "; ".join(problems[:5]))
    return out


def prepare(model: nn.Module, scheme: QuantScheme) -> list[Holder]:
    """Fake-quantize every targeted weight of ``model`` in forward (in place). Returns the holders."""
    holders = []
    for name, module in model.named_modules():
        if hasattr(module, ATTR):
            raise SchemeError(f"{name}: module is already prepared for QAT; call qat.remove(model) first")
        if is_fused_experts(module):
            experts = _expert_targets(name, module, scheme)
            if experts:
                holders.append(_attach(module, Holder(name, scheme, experts), _experts_forward))
        elif isinstance(module, nn.Linear) and scheme.matches(name, ("Linear",)):
            holders.append(_attach(module, Holder(name, scheme, {}), _linear_forward))
    return holders


def _attach(module: nn.Module, holder: Holder, fn) -> Holder:
    setattr(module, ATTR, holder)
    module.forward = fn.__get__(module)  # shadows the class forward for this instance only
    return holder


def remove(model: nn.Module) -> int:
    """Undo ``prepare``: the class forwards come back. Returns how many modules were restored."""
    n = 0
    for module in model.modules():
        if hasattr(module, ATTR):
            delattr(module, ATTR)
            del module.forward
            n += 1
    return n


def holders(model: nn.Module) -> Iterator[Holder]:
    for module in model.modules():
        if hasattr(module, ATTR):
            yield getattr(module, ATTR)


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch fake quant on or off (off: the same matmuls on the weights cast to the compute dtype)."""
    for h in holders(model):
        h.enabled = enabled


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    holder: Holder = getattr(self, ATTR)
    y = fake_quant.linear(x, self.weight, holder.scheme_for("weight"))
    return y if self.bias is None else y + self.bias.to(y.dtype)


def _experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop, with fake-quant linears on the targeted experts.

    hidden_states ``[T, H]``, top_k_index / top_k_weights ``[T, k]``; returns ``[T, H]``.
    """
    holder: Holder = getattr(self, ATTR)
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)  # [T, k, E+1]
        mask = mask.permute(2, 1, 0)  # [E+1, k, T]
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit[:, 0].tolist():
        if e == self.num_experts:  # the sentinel transformers uses for tokens routed elsewhere
            continue
        top_k_pos, token_idx = torch.where(mask[e])
        x = hidden_states[token_idx]  # [t, H]
        gate_up = fake_quant.linear(x, self.gate_up_proj[e], holder.scheme_for("gate_up_proj", e))  # [t, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        h = fake_quant.linear(self.act_fn(gate) * up, self.down_proj[e], holder.scheme_for("down_proj", e))
        h = h * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, h.to(final.dtype))
    return final
