"""One definition of every quantization scheme, used by convert, QAT and export alike.

Granularity is only ``block_size``: FP8 uses ``(128, 128)`` tiles, INT4 uses ``(1, group_size)``
groups. Leading dimensions beyond the last two are batch (an expert stack ``[E, N, K]``).
In memory ``scale`` is always the dequant multiplier: ``w ~= q * scale``.
"""
from __future__ import annotations

import dataclasses
import re

import torch

from k2quant.errors import SchemeError
from k2quant.quant.names import (  # noqa: F401 - re-exported: the scheme vocabulary lives in names
    CONVERT_INT4_RULE,
    FORMATS,
    FP8,
    FP8_BLOCK,
    INT4,
    INT4_GROUP_SIZE,
    KIMI_INT4_IGNORE,
    ROUTED_EXPERTS,
    SCALE_RULES,
)


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """A weight quantization scheme: what codes, what scales, which modules."""

    name: str
    dtype: str
    block_size: tuple[int, int]
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.float32
    scale_rule: str = "deepseek"
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if self.dtype not in SCALE_RULES:
            problems.append(f"unknown dtype {self.dtype!r}; expected one of {sorted(SCALE_RULES)}")
        elif self.scale_rule not in SCALE_RULES[self.dtype]:
            problems.append(
                f"scale rule {self.scale_rule!r} is not defined for {self.dtype}; "
                f"use one of {list(SCALE_RULES[self.dtype])}"
            )
        if len(self.block_size) != 2 or any(int(b) < 1 for b in self.block_size):
            problems.append(f"block_size must be two positive ints, got {self.block_size}")
        if self.dtype == INT4 and self.block_size[0] != 1:
            problems.append(f"INT4 groups run along the input dim: block_size (1, g), got {self.block_size}")
        if self.dtype == INT4 and self.block_size[1] % 8 != 0:
            problems.append(f"INT4 group size must be a multiple of 8 (one int32 word), got {self.block_size[1]}")
        if not self.symmetric:
            problems.append("only symmetric schemes are supported")
        for pat in (*self.targets, *self.ignore):
            if pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as exc:
                    problems.append(f"bad regex {pat!r}: {exc}")
        if problems:
            raise SchemeError(f"scheme {self.name!r}: " + "; ".join(problems))

    @property
    def group_size(self) -> int:
        return self.block_size[1]

    def with_(self, **changes) -> QuantScheme:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def matches(self, module: str, classes: tuple[str, ...] = ()) -> bool:
        """True when ``module`` is targeted and not ignored (``re.match`` semantics, like the loaders).

        ``classes``: the class names the module answers to (``("Linear",)``, an experts class), so that a
        plain target such as ``Linear`` selects every module of that class, as compressed-tensors does."""
        return match_any(module, self.targets, classes) and not match_any(module, self.ignore, classes)


def match_name(name: str, pattern: str, classes: tuple[str, ...] = ()) -> bool:
    """compressed-tensors / vLLM matching: ``re:`` is ``re.match`` (start-anchored), else the exact module
    name or one of the module's class names."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or pattern in classes


def match_any(name: str, patterns: tuple[str, ...] | list[str], classes: tuple[str, ...] = ()) -> bool:
    return any(match_name(name, p, classes) for p in patterns)


SCHEMES: dict[str, QuantScheme] = {
    "fp8-block-128": QuantScheme(
        name="fp8-block-128", dtype=FP8, block_size=FP8_BLOCK, scale_dtype=torch.float32,
        scale_rule="deepseek", targets=("re:.*",),
    ),
    "int4-g32": QuantScheme(
        name="int4-g32", dtype=INT4, block_size=(1, INT4_GROUP_SIZE), scale_dtype=torch.bfloat16,
        scale_rule=CONVERT_INT4_RULE, targets=(ROUTED_EXPERTS,), ignore=KIMI_INT4_IGNORE,
    ),
}


def get(name: str, **overrides) -> QuantScheme:
    """A preset by name, with field overrides (e.g. ``group_size=64``, ``scale_rule="kimi"``)."""
    if name not in SCHEMES:
        raise SchemeError(f"unknown scheme {name!r}; known: {sorted(SCHEMES)}")
    scheme = SCHEMES[name]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "group_size" in overrides:
        overrides["block_size"] = (1, int(overrides.pop("group_size")))
    return scheme.with_(**overrides) if overrides else scheme


def for_target(target: str, group_size: int | None = None, scale_rule: str | None = None,
               targets: list[str] | tuple[str, ...] | None = None,
               ignore: list[str] | tuple[str, ...] | None = None) -> QuantScheme | None:
    """The scheme a ``--to`` target writes with (None for bf16): its preset plus overrides."""
    if target not in FORMATS:
        raise SchemeError(f"unknown target format {target!r}; use one of {list(FORMATS)}")
    if target == "bf16":
        return None
    if target == "fp8":
        return get("fp8-block-128")
    return get("int4-g32", group_size=group_size, scale_rule=scale_rule,
               targets=tuple(targets) if targets else None,
               ignore=tuple(ignore) if ignore is not None else None)
