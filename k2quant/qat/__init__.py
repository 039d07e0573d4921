"""Quantization-aware training: straight-through fake quant on a model's targeted weights.

Imports only ``k2quant.quant`` and torch. ``prepare(model, scheme)`` / ``remove(model)``; the numerics
are the convert kernels' own (``quant.<dtype>.fake_quantize``), so export equals the trained forward.
"""
from k2quant.qat.wrap import Holder, holders, prepare, remove, set_enabled
from k2quant.qat.weights import codes, fake_quant_weights, flip_counts, flip_rate, local_rows, targeted

__all__ = ["Holder", "codes", "fake_quant_weights", "flip_counts", "flip_rate", "holders", "local_rows", "prepare",
           "remove", "set_enabled", "targeted"]
