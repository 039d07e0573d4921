"""Error types raised at k2quant's boundaries (scheme construction, file reading, the CLI).

Every message names the file, the tensor, what was expected, what was found, and the fix.
"""
from __future__ import annotations


class K2QuantError(ValueError):
    """Base class: a problem the user can fix. The CLI prints it and exits non-zero."""


class SchemeError(K2QuantError):
    """An invalid quantization scheme or target selection."""


class FormatError(K2QuantError):
    """A checkpoint on disk is not what its format requires."""


class OutputError(K2QuantError):
    """The output location cannot be written safely."""


def collect(problems: list[str], cls: type[K2QuantError] = FormatError) -> None:
    """Raise one error listing every problem found, or return if there are none."""
    if not problems:
        return
    if len(problems) == 1:
        raise cls(problems[0])
    head = f"{len(problems)} problems found:\n"
    shown = problems[:20]
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise cls(head + "\n".join(f"  - {p}" for p in shown) + more)


class NonFinite(ArithmeticError):
    """Internal, not a user error: a kernel asked to check its input met a NaN/Inf (or an E4M3 NaN code).

    The caller that knows the file and tensor counts them and raises a ``FormatError`` naming both."""
