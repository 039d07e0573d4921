"""Which Linear layers a scheme quantizes, decided on the model's own architecture (``arch.Arch``).

Targets and ignores follow compressed-tensors: ``Linear`` (or another class name, e.g. an experts class
``Qwen3MoeExperts``) matches every module of that class, ``re:<regex>`` is ``re.match`` on the module name,
anything else is an exact module name. Only Linear layers (and the per-expert Linears of fused experts)
can be selected. Recipes name the common selections; fused groups must share one scheme.
"""
from __future__ import annotations

import re

from k2quant.errors import SchemeError
from k2quant.formats import arch as farch
from k2quant.quant import scheme as qscheme
from k2quant.quant.names import RECIPES
from k2quant.quant.scheme import KIMI_INT4_IGNORE, ROUTED_EXPERTS, QuantScheme

#: Linears that serving engines load as one fused matrix (vLLM packed_modules_mapping): one scheme per group
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"),
                ("w1", "w3"))


def recipe(name: str, arch: farch.Arch) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(targets, ignore)`` of a recipe on this model."""
    if name not in RECIPES:
        raise SchemeError(f"unknown recipe {name!r}; known: " + ", ".join(f"{k} ({v})" for k, v in RECIPES.items()))
    head = (arch.lm_head,) if arch.lm_head else ()
    if name == "experts":
        classes = tuple(sorted({cls for cls, _ in arch.experts.values()}))
        return classes, head
    if name == "linear":
        return ("Linear",), head
    return ("Linear",), head + tuple(f"re:.*\\.{re.escape(a)}\\." for a in arch.attention_modules)


def with_recipe(name: str | None, src, targets: list[str] | None = None,
                ignore: list[str] | None = None) -> tuple[list[str] | None, list[str] | None]:
    """``(targets, ignore)`` of ``--recipe name`` on the architecture of checkpoint ``src``; without a recipe,
    the given ones. A recipe and explicit targets/ignore together are refused."""
    if name is None:
        return targets, ignore
    if targets or ignore is not None:
        raise SchemeError(f"--recipe {name} sets the targets and the ignore list itself; pass either "
                          f"--recipe or --targets/--ignore")
    from k2quant.formats.checkpoint import Checkpoint

    t, i = recipe(name, farch.from_config(Checkpoint(src).config))
    return list(t), list(i)


def is_default(scheme: QuantScheme) -> bool:
    """The INT4 preset's own selection (K2-Thinking: Kimi's routed-expert regex and four-entry ignore)."""
    return scheme.targets == (ROUTED_EXPERTS,) and scheme.ignore == KIMI_INT4_IGNORE


def matches(module: str, patterns: tuple[str, ...] | list[str], arch: farch.Arch) -> bool:
    """compressed-tensors matching: class name, ``re:`` (re.match) or exact name."""
    return qscheme.match_any(module, patterns, arch.classes(module))


def selected(module: str, scheme: QuantScheme, arch: farch.Arch) -> bool:
    """True when ``module`` is a Linear the scheme targets and does not ignore."""
    return arch.is_linear(module) and scheme.matches(module, arch.classes(module))


def fused_group(module: str) -> tuple[str, ...]:
    """The sibling modules a loader fuses with ``module`` (itself included), or ``(module,)``."""
    parent, _, leaf = module.rpartition(".")
    for group in FUSED_GROUPS:
        if leaf in group:
            return tuple(f"{parent}.{g}" if parent else g for g in group)
    return (module,)
