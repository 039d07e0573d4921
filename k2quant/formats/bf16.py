"""Plain (unquantized) weights: a module is one ``<m>.weight`` in its stored dtype."""
from __future__ import annotations

from k2quant.formats.shards import Entry



def entries(module: str, shape: tuple[int, ...], dtype: str = "BF16") -> list[Entry]:
    return [Entry(f"{module}.weight", dtype, tuple(shape))]


def quantization_config(scheme=None, source_qc: dict | None = None) -> None:
    """BF16 checkpoints carry no quantization_config."""
    return None
