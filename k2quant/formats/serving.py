"""The serving hardware and settings a capacity plan is made for: the GPU table, KV-cache dtypes and the
default reserve. Plain Python (no torch): the command line offers these as choices.
"""
from __future__ import annotations

import dataclasses

MIB = 2**20
GIB = 2**30
#: Default reserve: the 10 % of each GPU that vLLM leaves outside its weight + KV pool at its default
#: ``--gpu-memory-utilization 0.9`` (CUDA context, NCCL / cuBLAS workspaces, CUDA graphs, activations).
DEFAULT_RESERVE = 0.10
KV_DTYPES: dict[str, int] = {"bf16": 2, "fp8": 1}  # bytes per cached value


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One GPU model: ``mem_bytes`` is the total the driver reports (what engines budget against)."""

    name: str
    mem_bytes: int
    label: str = ""  # as sold, e.g. "141GB"
    source: str = ""  # where mem_bytes comes from


#: Driver-reported totals (nvidia-smi ``memory.total``, rocm-smi ``VRAM Total Memory``), not the
#: label it is sold under: the labels mix units (H200 "141GB" is 140.4 GiB = 150.8 GB; B200
#: "192GB" is 192.3 GB = 179.1 GiB; MI300X "192GB" is 191.7 GiB = 205.8 GB).
GPUS: dict[str, Gpu] = {g.name: g for g in (
    Gpu("A100-40GB", 40960 * MIB, "40GB", "nvidia-smi 40960MiB"),
    Gpu("A100", 81920 * MIB, "80GB", "nvidia-smi 81920MiB"),
    Gpu("H100", 81559 * MIB, "80GB", "nvidia-smi 81559MiB"),
    Gpu("H800", 81559 * MIB, "80GB", "nvidia-smi 81559MiB"),
    Gpu("H20", 97871 * MIB, "96GB", "nvidia-smi 97871MiB"),
    Gpu("H200", 143771 * MIB, "141GB", "nvidia-smi 143771MiB"),
    Gpu("B200", 183359 * MIB, "192GB", "nvidia-smi 183359MiB"),
    Gpu("MI300X", 205822885888, "192GB", "rocm-smi 205822885888 B"),
)}
