"""Kernel selection for the convert hot paths: ``reference`` (pure torch, CPU and CUDA) or ``fast``.

Both compute the same bytes; the fast CPU kernels (``quant/fast.py``) are tested equal to the
reference on every input. ``auto`` takes the fast kernels on CPU when they are available.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Callable

import torch

from k2quant.errors import NonFinite, SchemeError
from k2quant.quant import fp8_block, int4_group
from k2quant.quant.names import FP8, INT4, KERNELS
from k2quant.quant.scheme import QuantScheme

#: the reference kernel module of each scheme dtype (one table, no if/elif chains)
KERNEL_MODULES = {FP8: fp8_block, INT4: int4_group}


def kernels(scheme: QuantScheme):
    """The reference kernel module (``quantize_weight``, ``dequantize``, ``fake_quantize``) of a scheme."""
    return KERNEL_MODULES[scheme.dtype]


@dataclasses.dataclass(frozen=True)
class Ops:
    """The five conversion operations, all taking and returning 2-D ``[N, K]`` tensors."""

    name: str
    fp8_decode: Callable[[torch.Tensor, torch.Tensor, QuantScheme], torch.Tensor]
    int4_decode: Callable[[torch.Tensor, torch.Tensor, int, QuantScheme], torch.Tensor]
    fp8_encode: Callable[[torch.Tensor, QuantScheme], tuple[torch.Tensor, torch.Tensor]]
    int4_encode: Callable[[torch.Tensor, QuantScheme], tuple[torch.Tensor, torch.Tensor]]
    fp8_to_int4: Callable[[torch.Tensor, torch.Tensor, QuantScheme, QuantScheme], tuple[torch.Tensor, torch.Tensor]]
    count_nonfinite: Callable[[torch.Tensor], int]  # NaN/Inf of a float tensor, NaN codes of an E4M3 one
    #: True: fp8_decode, fp8_encode, int4_encode and fp8_to_int4 raise ``errors.NonFinite`` on NaN/Inf input (or
    #: E4M3 NaN codes), found in the same pass that converts it; False: the caller counts them first
    checks_input: bool = False


def _ref_int4_encode(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = int4_group.quantize_weight(w, scheme)
    return int4_group.pack(q), scale


def _ref_fp8_to_int4(q: torch.Tensor, scale: torch.Tensor, src: QuantScheme,
                     dst: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    # through BF16, so FP8 -> INT4 equals FP8 -> BF16 -> INT4 byte for byte; a product beyond bf16's range
    # (Inf) has no INT4 code: refused as the fast kernel does (the caller has checked the codes and scales)
    w = fp8_block.dequantize(q, scale, src, torch.bfloat16)
    if not bool(torch.isfinite(w).all()):
        raise NonFinite("an FP8 code times its scale overflows bf16")
    return _ref_int4_encode(w, dst)


def _ref_count_nonfinite(t: torch.Tensor) -> int:
    if t.dtype == torch.float8_e4m3fn:
        return int(((t.view(torch.uint8) & 0x7F) == 0x7F).sum())
    return int((~torch.isfinite(t)).sum())


REFERENCE = Ops(
    "reference",
    fp8_decode=lambda q, s, sch: fp8_block.dequantize(q, s, sch, torch.bfloat16),
    int4_decode=lambda p, s, k, sch: int4_group.dequantize(int4_group.unpack(p, k), s, sch, torch.bfloat16),
    fp8_encode=fp8_block.quantize_weight,
    int4_encode=_ref_int4_encode,
    fp8_to_int4=_ref_fp8_to_int4,
    count_nonfinite=_ref_count_nonfinite,
)


def _load_fast_ops() -> Ops | None:
    try:
        from k2quant.quant import fast
    except ImportError:
        return None
    if not fast.available():
        return None
    return Ops(
        "fast",
        fp8_decode=lambda q, s, sch: fast.fp8_dequantize(q, s, sch.block_size, check=True),
        int4_decode=lambda p, s, k, sch: fast.int4_unpack_dequantize(p, s, k, sch.group_size),
        fp8_encode=lambda w, sch: fast.fp8_quantize(w, sch.block_size, check=True),
        int4_encode=lambda w, sch: fast.int4_quantize_pack(w, sch.group_size, sch.scale_rule, check=True),
        fp8_to_int4=lambda q, s, src, dst: fast.fp8_to_int4(q, s, dst.group_size, dst.scale_rule, src.block_size,
                                                            check=True),
        count_nonfinite=fast.count_nonfinite,
        checks_input=True,
    )


_fast_lock = threading.Lock()
_fast_loaded: list[Ops | None] = []  # the fast ops (None: not available here) once loaded


def _fast_ops() -> Ops | None:
    """The fast kernels, loaded once per process (numba's import, its registries, the cached kernels: ~0.8 s on
    2 cores); a caller that arrives during the load waits for it."""
    with _fast_lock:
        if not _fast_loaded:
            _fast_loaded.append(_load_fast_ops())
        return _fast_loaded[0]


def _wants_fast(kernel: str, device: str) -> bool:
    return kernel in ("auto", "fast") and str(device).startswith("cpu")


def ready(kernel: str = "auto", device: str = "cpu") -> bool:
    """True when ``ops(kernel, device)`` returns without loading anything first."""
    return not _wants_fast(kernel, device) or bool(_fast_loaded)


def ops(kernel: str = "auto", device: str = "cpu") -> Ops:
    """The operations for ``kernel`` ("auto", "fast", "reference") on ``device``."""
    if kernel not in KERNELS:
        raise SchemeError(f"unknown kernel {kernel!r}; use one of {list(KERNELS)}")
    if not _wants_fast(kernel, device):
        if kernel == "fast":
            raise SchemeError(f"--kernel fast runs on the CPU only; on {device} use --kernel reference or auto "
                              f"(the pure-torch kernels run on any device)")
        return REFERENCE
    fast = _fast_ops()
    if fast is None and kernel == "fast":
        raise SchemeError("--kernel fast: numba, a k2quant dependency, did not import or compile here (reinstall "
                          "it: pip install numba); or use --kernel reference (the same bytes, slower)")
    return fast or REFERENCE


def fake_quantize(w: torch.Tensor, scheme: QuantScheme, out_dtype: torch.dtype, kernel: str = "auto") -> torch.Tensor:
    """``kernels(scheme).fake_quantize(w, scheme, out_dtype)`` (forward value, no autograd): the fused one-pass
    CPU kernel for INT4 when ``kernel`` allows it, the reference otherwise (the same values)."""
    if scheme.dtype == INT4 and w.dtype in (torch.float32, torch.bfloat16) and ops(kernel, w.device.type).name == "fast":
        from k2quant.quant import fast

        return fast.int4_fake_quantize(w, scheme.group_size, scheme.scale_rule, out_dtype)
    return kernels(scheme).fake_quantize(w, scheme, out_dtype=out_dtype)
