"""What each tensor name means: modules, tensor classes, and which weights are Linear layers.

Kimi/DeepSeek names: ``model.layers.<L>.self_attn.<proj>``, ``model.layers.<L>.mlp.<proj>`` (dense),
``model.layers.<L>.mlp.experts.<E>.<proj>`` (routed), ``model.layers.<L>.mlp.shared_experts.<proj>``,
``model.layers.<L>.mlp.gate`` (router, not a Linear), norms, ``model.embed_tokens``, ``lm_head``.
"""
from __future__ import annotations

import re

_LAYER = r"(?:^|\.)layers\.(\d+)\."
#: Linear layers that the FP8 format quantizes (attention, dense MLP, routed and shared experts).
_LINEAR = re.compile(
    _LAYER + r"(?:self_attn\.(?:q_proj|k_proj|v_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(?:gate_proj|up_proj|down_proj)"
    r"|mlp\.experts\.\d+\.(?:gate_proj|up_proj|down_proj)"
    r"|mlp\.shared_experts\.(?:gate_proj|up_proj|down_proj))$")
_LM_HEAD = re.compile(r"(?:^|\.)lm_head$")

#: (class, pattern) in priority order; the first match names a tensor's class.
CLASSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("routed_expert", re.compile(r"\.mlp\.experts\.\d+\.")),
    ("shared_expert", re.compile(r"\.mlp\.shared_experts\.")),
    ("norm", re.compile(r"norm\.weight$|norm$")),
    ("router_bias", re.compile(r"\.mlp\.gate\.e_score_correction_bias$")),
    ("router", re.compile(r"\.mlp\.gate\.weight$")),
    ("attention", re.compile(r"\.self_attn\.")),
    ("dense_mlp", re.compile(r"\.mlp\.(?:gate|up|down)_proj\.")),
    ("embedding", re.compile(r"embed_tokens\.")),
    ("lm_head", re.compile(r"(?:^|\.)lm_head\.")),
)
#: suffixes that make a tensor part of a quantized module, not a module of its own
PART_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".weight_packed", ".weight_shape", ".weight")


def module_of(name: str) -> tuple[str, str] | None:
    """``("model.layers.1.mlp.experts.0.up_proj", "weight_packed")`` for a part name, else None."""
    for suf in PART_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)], suf[1:]
    return None


def is_linear(module: str) -> bool:
    """A Linear layer of attention, dense MLP or experts: the modules block-FP8 quantizes."""
    return _LINEAR.search(module) is not None


def is_int4_candidate(module: str) -> bool:
    """Linear layers INT4 targets may select: the FP8 set plus ``lm_head``."""
    return is_linear(module) or _LM_HEAD.search(module) is not None


def layer_index(name: str) -> int | None:
    m = re.search(_LAYER, name)
    return int(m.group(1)) if m else None


def tensor_class(name: str, num_hidden_layers: int | None = None) -> str:
    """Class of a tensor for reports: routed_expert, attention, norm, router, mtp, other, ..."""
    li = layer_index(name)
    if num_hidden_layers is not None and li is not None and li >= num_hidden_layers:
        return "mtp"
    for cls, pat in CLASSES:
        if pat.search(name):
            return cls
    return "other"


def fused_partners(module: str) -> str | None:
    """The module a loader fuses with this one (vLLM: gate+up, q_a+kv_a), which must share a format."""
    for a, b in (("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa")):
        if module.endswith(a):
            return module[: -len(a)] + b
        if module.endswith(b):
            return module[: -len(b)] + a
    return None
