"""Fused MoE experts during calibration: per-expert weights in and out, and per-expert input statistics.

transformers 5 holds routed experts fused: ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and
``down_proj [E, H, I]``, called as ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``.
Checkpoints store them per expert: ``<experts>.<e>.{gate,up,down}_proj.weight``.

Statistics (``ExpertStats``): each expert's ``gate``/``up`` get ``sum x x^T`` over the tokens the router
sends it; its ``down`` the same over its own intermediate activations ``act(x W_gate^T) * (x W_up^T)``
of those tokens. The routing and the layer's outputs are the model's own.

Rare experts: a router may send an expert few tokens or none in a small calibration set, and a Hessian
from a handful of tokens is noise that GPTQ would fit. Every expert therefore also gets ``prior`` tokens'
worth of every-token statistics (all calibration tokens through ``gate``/``up``; a subsample of up to
``PRIOR_TOKENS`` tokens sent through the expert for ``down``), scaled as if it had seen ``prior`` typical
tokens. An expert with thousands of routed tokens is essentially unchanged by it; an expert with none is
calibrated on the layer's whole input distribution instead of being left to round to nearest.
"""
from __future__ import annotations

import re

import torch

from k2quant.quant import gptq

PROJS = ("gate_proj", "up_proj", "down_proj")
PRIOR_TOKENS = 512  # tokens per layer sent through every expert for the ``down`` prior
_PER_EXPERT = re.compile(r"^(?P<container>.+)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


def is_fused(module: torch.nn.Module) -> bool:
    return all(isinstance(getattr(module, p, None), torch.Tensor) and getattr(module, p).dim() == 3
               for p in ("gate_up_proj", "down_proj"))


def expert_target(mods: dict[str, torch.nn.Module], rel: str) -> tuple[str, int, str] | None:
    """``("mlp.experts", 5, "gate_proj")`` for ``mlp.experts.5.gate_proj`` of a fused container, else None."""
    m = _PER_EXPERT.match(rel)
    if not m or m.group("container") not in mods or not is_fused(mods[m.group("container")]):
        return None
    e = int(m.group("e"))
    return (m.group("container"), e, m.group("proj")) if e < mods[m.group("container")].gate_up_proj.shape[0] else None


def fuse_experts(module: torch.nn.Module, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert tensors of ``module``'s fused containers stacked into ``gate_up_proj``/``down_proj``."""
    out = dict(local)
    for name, mod in module.named_modules():
        if not is_fused(mod):
            continue
        n = mod.gate_up_proj.shape[0]
        keys = {p: [f"{name}.{e}.{p}.weight" for e in range(n)] for p in PROJS}
        if not all(k in out for ks in keys.values() for k in ks):
            continue  # load_state_dict names what is missing
        gate_up = [torch.cat([out.pop(g), out.pop(u)]) for g, u in zip(keys["gate_proj"], keys["up_proj"])]
        out[f"{name}.gate_up_proj"] = torch.stack(gate_up)  # [E, 2I, H]
        out[f"{name}.down_proj"] = torch.stack([out.pop(k) for k in keys["down_proj"]])  # [E, H, I]
    return out


def set_expert_weight(mod: torch.nn.Module, e: int, proj: str, w: torch.Tensor) -> None:
    """Write one expert's ``proj`` weight ``[N, K]`` into the fused parameters."""
    inter = mod.down_proj.shape[-1]
    with torch.no_grad():
        if proj == "gate_proj":
            mod.gate_up_proj[e, :inter].copy_(w)
        elif proj == "up_proj":
            mod.gate_up_proj[e, inter:].copy_(w)
        else:
            mod.down_proj[e].copy_(w)


def expert_act(mod: torch.nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s intermediate activations (the input of its ``down_proj``) for tokens ``x`` ``[T, H]``."""
    gate, up = torch.nn.functional.linear(x, mod.gate_up_proj[e]).chunk(2, dim=-1)
    return mod.act_fn(gate) * up


class _Container:
    def __init__(self, num_experts: int, inter: int):
        self.inter = inter
        self.hu: dict[int, torch.Tensor] = {}  # routed gate/up input statistics
        self.hd: dict[int, torch.Tensor] = {}  # routed down input statistics
        self.count = [0] * num_experts
        self.h_all: torch.Tensor | None = None
        self.n_all = 0
        self.hd_prior: dict[int, torch.Tensor] = {}
        self.n_prior = 0


class ExpertStats:
    """Per-expert statistics of fused containers, gathered by forward pre-hooks (see the module docstring)."""

    def __init__(self, layer: torch.nn.Module, containers: set[str], prior: float):
        mods = dict(layer.named_modules())
        self.prior = prior
        self.c = {n: _Container(*mods[n].down_proj.shape[::2]) for n in containers}  # (E, I)
        self.handles = [mods[n].register_forward_pre_hook(self._hook(n), with_kwargs=True) for n in containers]

    def _hook(self, name: str):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            with torch.no_grad():
                self._add(self.c[name], mod, x.reshape(-1, x.shape[-1]), idx.reshape(x.shape[0] if x.dim() == 2
                                                                                     else -1, idx.shape[-1]))
        return hook

    def _add(self, st: _Container, mod, x: torch.Tensor, idx: torch.Tensor) -> None:
        st.h_all = gptq.hessian(x, st.h_all)
        st.n_all += x.shape[0]
        for e in range(len(st.count)):
            rows = (idx == e).any(dim=-1).nonzero().squeeze(-1)
            if rows.numel():
                xe = x[rows]
                st.hu[e] = gptq.hessian(xe, st.hu.get(e))
                st.hd[e] = gptq.hessian(expert_act(mod, e, xe), st.hd.get(e))
                st.count[e] += int(rows.numel())
        take = min(x.shape[0], PRIOR_TOKENS - st.n_prior)
        if take > 0 and self.prior > 0:
            xs = x[torch.linspace(0, x.shape[0] - 1, take).round().long()]
            for e in range(len(st.count)):
                st.hd_prior[e] = gptq.hessian(expert_act(mod, e, xs), st.hd_prior.get(e))
            st.n_prior += take

    def hessian(self, container: str, e: int, proj: str) -> torch.Tensor:
        """The statistics expert ``e``'s ``proj`` is quantized with: routed tokens plus the prior."""
        st = self.c[container]
        routed, prior, n = (st.hd.get(e), st.hd_prior.get(e), st.n_prior) if proj == "down_proj" else \
            (st.hu.get(e), st.h_all, st.n_all)
        h = routed.clone() if routed is not None else None
        if self.prior > 0 and prior is not None and n:
            h = prior * (self.prior / n) if h is None else h.add_(prior, alpha=self.prior / n)
        if h is None:  # no tokens and no prior: GPTQ on a zero Hessian is round to nearest
            k = st.h_all.shape[0] if proj != "down_proj" else st.inter
            h = torch.zeros(k, k)
        return h

    def routed(self, container: str, e: int) -> int:
        return self.c[container].count[e]

    def coverage(self) -> dict:
        """Per container: tokens seen, routed tokens per expert, and how many experts had few or none."""
        out = {}
        for name, st in self.c.items():
            counts = sorted(st.count)
            out[name] = {"tokens": st.n_all, "experts": len(counts), "routed": st.count,
                         "min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1],
                         "zero": sum(c == 0 for c in counts), "below_prior": sum(c < self.prior for c in counts)}
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()
