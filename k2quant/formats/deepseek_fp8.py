"""DeepSeek/Kimi native block-FP8: ``<m>.weight`` F8_E4M3 ``[N, K]`` + ``<m>.weight_scale_inv`` F32 grid.

Reading also accepts compressed-tensors ``float-quantized`` block checkpoints, whose scale is
named ``weight_scale`` (a multiplier too, usually BF16).
"""
from __future__ import annotations

import torch

from k2quant.formats.shards import Entry
from k2quant.quant import fp8_block
from k2quant.quant.scheme import QuantScheme

SCALE = "weight_scale_inv"
CT_SCALE = "weight_scale"


def entries(module: str, shape: tuple[int, ...], scheme: QuantScheme) -> list[Entry]:
    return [Entry(f"{module}.weight", "F8_E4M3", tuple(shape)),
            Entry(f"{module}.{SCALE}", "F32", fp8_block.grid_shape(shape, scheme.block_size))]


def encode(module: str, w: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    q, scale = fp8_block.quantize_weight(w, scheme)
    return {f"{module}.weight": q, f"{module}.{SCALE}": scale.to(torch.float32)}


def quantization_config(scheme: QuantScheme, source_qc: dict | None = None) -> dict:
    """The four-key block DeepSeek documents; ``scale_fmt`` carried over from a native FP8 source."""
    qc: dict = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": list(scheme.block_size)}
    if source_qc and source_qc.get("quant_method") == "fp8" and "scale_fmt" in source_qc:
        qc["scale_fmt"] = source_qc["scale_fmt"]
    return qc
