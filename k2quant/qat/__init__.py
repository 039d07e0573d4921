"""Quantization-aware training: straight-through fake quant on a model's targeted weights.

Two layers, imports flowing one way (workflow -> core, never back):

- core: ``fake_quant``, ``wrap``, ``weights``: torch and ``k2quant.quant`` only. ``prepare(model, scheme)``
  / ``remove(model)``; the numerics are the convert kernels' own, so export equals the trained forward.
- workflow: ``config`` (settings, no torch), ``data``, ``model``, ``masters``, ``losses``, ``dist``
  (FSDP2/DDP), ``state`` (save/resume), ``export`` (INT4 through convert) and ``train`` (the run).

The core's functions are re-exported here, loaded on first use: importing ``k2quant.qat.config`` (the
command line does) does not load torch.
"""
from __future__ import annotations

import importlib

_CORE = {"Holder": "wrap", "holders": "wrap", "prepare": "wrap", "remove": "wrap", "set_enabled": "wrap",
         "codes": "weights", "fake_quant_weights": "weights", "flip_counts": "weights", "flip_rate": "weights",
         "local_rows": "weights",
         "targeted": "weights"}
__all__ = sorted(_CORE)


def __getattr__(name: str):
    if name in _CORE:
        return getattr(importlib.import_module(f"k2quant.qat.{_CORE[name]}"), name)
    raise AttributeError(f"module 'k2quant.qat' has no attribute {name!r}")
