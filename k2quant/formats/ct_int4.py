"""compressed-tensors ``pack-quantized`` W4A16: ``weight_packed`` I32, ``weight_scale`` BF16, ``weight_shape`` I64."""
from __future__ import annotations

import torch

from k2quant.formats.shards import Entry
from k2quant.quant import int4_group
from k2quant.quant.scheme import KIMI_INT4_IGNORE, QuantScheme



def entries(module: str, shape: tuple[int, ...], scheme: QuantScheme) -> list[Entry]:
    n, k = shape
    return [Entry(f"{module}.weight_packed", "I32", (n, -(-k // int4_group.PACK_FACTOR))),
            Entry(f"{module}.weight_scale", "BF16", (n, k // scheme.group_size)),
            Entry(f"{module}.weight_shape", "I64", (2,))]


def encode(module: str, w: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    q, scale = int4_group.quantize_weight(w, scheme)
    return {f"{module}.weight_packed": int4_group.pack(q),
            f"{module}.weight_scale": scale.to(torch.bfloat16),
            f"{module}.weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}


def quantization_config(scheme: QuantScheme, ignore: list[str] | tuple[str, ...] = KIMI_INT4_IGNORE) -> dict:
    """Kimi-K2-Thinking's block (group size from the scheme), with the given ``ignore`` list."""
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "kv_cache_scheme": None,
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "input_activations": None,
            "output_activations": None,
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": scheme.group_size, "dynamic": False, "actorder": None,
                        "block_structure": None, "observer": "minmax", "observer_kwargs": {}},
        }},
        "ignore": list(ignore),
    }
