"""Fast CPU kernels (numba) for the convert hot paths, bit-identical to ``fp8_block`` and ``int4_group``.

The slow, obviously correct kernels stay the contract: every function here equals its reference under
``torch.equal`` (``tests/test_fast_kernels.py``). Rules kept exactly, as torch does them on CPU:

- no fastmath: fp32 division where the reference divides, one IEEE multiply where it multiplies;
- bf16 = round-to-nearest-even on the fp32 bits, NaN -> 0xFFFF (torch's vectorised cast);
- E4M3 = torch's ``fp8_e4m3fn_from_fp32_value``: RNE, subnormals (2^-9 steps), NaN -> 0x7f | sign;
  inputs are clamped to +-448 first, as the reference does;
- round half to even = ``np.rint`` (``torch.round``).

Shapes and dtypes are the references': ``w`` ``[..., N, K]`` bf16 (hot case), fp16 or fp32; FP8 codes
float8_e4m3fn with fp32 tile scales ``[..., ceil(N/bn), ceil(K/bk)]``; INT4 packed int32
``[..., N, K/8]`` with bf16 scales ``[..., N, K/g]`` (``K % g == 0``, ``g % 8 == 0``).
numba is a dependency of k2quant (pyproject). Should it fail to import or compile anyway (a platform its
wheels do not cover yet), ``available()`` is False and ``--kernel auto`` uses the reference kernels: the same
bytes, slower.
Loops are written so that LLVM vectorises them on any x86 host (checked in the assembly; the numbers are
``bench/convert.py``'s kernel rates): every hot index counts up from 0 over a slice (numba wraps negative
indices, and an index LLVM cannot prove >= 0 becomes a per-element gather); reductions are uint8/16/32
selects (numba promotes integer arithmetic to 64 bits, which halves the lanes) over a run-time count
(``_max_abs_bits``: with a constant one LLVM unrolls first and leaves the reduction scalar). Together these
made the kernels 1.5-4.4x faster on a Xeon whose LLVM tuning had kept the old loops scalar. One core reads
memory at ~4.4 GB/s here, so the INT4 row kernels prefetch the next row (``_prefetch``) while they compute the
codes of this one: the reads overlap the arithmetic instead of stalling the next row's amax pass.
INT4 results are defined for finite inputs only (the reference casts NaN to int8, which is undefined);
convert rejects NaN/Inf weights before encoding.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from typing import Iterator

import torch

from k2quant.errors import NonFinite
from k2quant.quant.names import INT4_RULES as SCALE_RULES

try:  # a dependency; guarded so that a broken numba install degrades to the reference kernels
    import numba
    import numpy as np
    from llvmlite import ir as llvm_ir
    from numba.core import cgutils
    from numba.extending import intrinsic, overload
except ImportError:  # pragma: no cover - exercised on installs without numba
    numba = None

FP8_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
AMAX_FLOOR = 1e-4  # fp8_block.AMAX_FLOOR

if numba is not None:
    _JIT = dict(nogil=True, cache=True, error_model="numpy")  # no fastmath: IEEE results only
    _F32_MAX = np.float32(FP8_E4M3_MAX)
    _F32_FLOOR = np.float32(AMAX_FLOOR)  # torch clamps an fp32 tensor with the scalar cast to fp32
    _BF16_EPS_BITS = np.uint16(0x3C00)  # 2**-7, int4_group's scale for all-zero groups
    _F32_INF_BITS = np.uint32(0x7F800000)  # |x| bits at or above this: Inf or NaN
    _E4M3_SUB = np.float32(2.0 ** -9)  # the E4M3 subnormal step
    # fp32 x + 1.5 * 2**23 rounds x to an integer (ties to even, as np.rint) held in the low mantissa bits, for
    # |x| < 2**22; the + 8 puts the INT4 code's offset there too (the sum stays even: the same ties)
    _RINT_PLUS_8 = np.float32(1.5 * 2.0 ** 23 + 8.0)

    def _as_f32(v):
        """fp32 value of one element given as bits: bf16 (uint16) or fp32 (uint32)."""

    def _as_bf16_f32(v):
        """fp32 value of ``bf16(element)``: exact for bf16 bits, RNE for fp32 bits."""

    def _abs_key(v):
        """``|element|`` as an unsigned integer in the element's own width (bf16: uint16, 16 vector lanes where
        fp32 bits have 8): integer order is float order (amax without float max)."""

    def _key_bits(m):
        """fp32 bit pattern of the ``|element|`` whose ``_abs_key`` is ``m``."""

    @overload(_as_f32, jit_options=_JIT)
    def _as_f32_impl(v):
        if v.bitwidth == 16:
            return lambda v: _f32_of_bf16(v)
        return lambda v: np.uint32(v).view(np.float32)

    @overload(_as_bf16_f32, jit_options=_JIT)
    def _as_bf16_f32_impl(v):
        if v.bitwidth == 16:
            return lambda v: _f32_of_bf16(v)
        return lambda v: _f32_of_bf16(_bf16_bits(np.uint32(v).view(np.float32)))

    @overload(_abs_key, jit_options=_JIT)
    def _abs_key_impl(v):
        if v.bitwidth == 16:
            return lambda v: np.uint16(v & np.uint16(0x7FFF))
        return lambda v: np.uint32(v & np.uint32(0x7FFFFFFF))

    @overload(_key_bits, jit_options=_JIT)
    def _key_bits_impl(m):
        if m.bitwidth == 16:
            return lambda m: np.uint32(np.uint32(m) << np.uint32(16))
        return lambda m: np.uint32(m)

    @intrinsic
    def _prefetch(typingctx, arr, idx):
        """Ask the CPU to bring ``arr[idx]``'s cache line into L2 (``llvm.prefetch``: no load, no fault).

        The row kernels call it for the next row while they compute this one, so that the reads from memory
        overlap the arithmetic instead of stalling the next row's first pass (one core reads ~4.4 GB/s here:
        a K2 expert's 29 MB of bf16 is 6.5 ms of it, measured)."""
        if not isinstance(arr, numba.types.Array) or not isinstance(idx, numba.types.Integer):
            return None

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]], wraparound=False)
            i32 = llvm_ir.IntType(32)
            fn = cgutils.get_or_insert_function(
                builder.module, llvm_ir.FunctionType(llvm_ir.VoidType(), [ptr.type, i32, i32, i32]),
                "llvm.prefetch.p0")
            builder.call(fn, [ptr, i32(0), i32(2), i32(1)])  # a read, locality 2 (L2), data
            return context.get_dummy_value()
        return numba.types.void(arr, idx), codegen

    @numba.njit(**_JIT)
    def _f32_of_bf16(b: np.uint16) -> np.float32:
        """fp32 value of a bf16 bit pattern (exact)."""
        return np.uint32(np.uint32(b) << np.uint32(16)).view(np.float32)

    @numba.njit(inline="always", **_JIT)
    def _bf16_rne(b: np.uint32) -> np.uint32:
        """fp32 bits ``b`` rounded to nearest even at bf16's precision: the bf16 bits in the high half (the low
        half is garbage; NaN is the caller's to handle)."""
        return np.uint32(b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))

    @numba.njit(**_JIT)
    def _bf16_bits(x: np.float32) -> np.uint16:
        """bf16 bit pattern of fp32 ``x``: round to nearest even; NaN -> 0xFFFF like torch's cast."""
        b = np.float32(x).view(np.uint32)
        r = np.uint16(_bf16_rne(b) >> np.uint32(16))
        return np.uint16(0xFFFF) if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else r

    @numba.njit(**_JIT)
    def _e4m3_bits(x: np.float32) -> np.uint8:
        """E4M3 code of fp32 ``x`` with ``|x| <= 448`` or NaN (torch's RNE cast), branch-free."""
        b = np.float32(x).view(np.uint32)
        sign = np.uint32(b >> np.uint32(24)) & np.uint32(0x80)
        a = b & np.uint32(0x7FFFFFFF)
        # normal: drop 20 mantissa bits with RNE, rebias 127 -> 7 (wraps harmlessly when not selected)
        normal = np.uint32(a - np.uint32(120 << 23) + np.uint32(0x7FFFF) + ((a >> np.uint32(20)) & np.uint32(1))) \
            >> np.uint32(20)
        # subnormal: multiples of 2^-9, ties to even (|x| * 512 is exact)
        sub = np.uint32(np.int32(np.rint(np.abs(x) * np.float32(512.0))))
        r = normal if a >= np.uint32(121 << 23) else sub
        r = np.uint32(0x7F) if a > np.uint32(0x7F800000) else r
        return np.uint8(r | sign)

    @numba.njit(**_JIT)
    def _clamp(x: np.float32, lo: np.float32, hi: np.float32) -> np.float32:
        """torch.clamp: NaN passes through."""
        y = lo if x < lo else x
        return hi if x > hi else y

    @numba.njit(**_JIT)
    def _amax_f32(bits: np.uint32) -> np.float32:
        """fp32 amax from the max |x| bit pattern (any NaN pattern -> the canonical NaN)."""
        return np.uint32(np.uint32(0x7FC00000) if bits > np.uint32(0x7F800000) else bits).view(np.float32)

    # -- FP8 ---------------------------------------------------------------------------------------
    # Hot loops are ``inline="always"`` helpers called from kernels built per block/group size (below):
    # inlined with a constant width, an elementwise loop vectorises fully; as a call, or with a runtime
    # width, it runs 4-6x slower (measured). Reductions are the opposite (``_max_abs_bits``): they take the
    # width at run time. Kernel factories capture only ints/bools, so numba's cache holds.
    @numba.njit(inline="always", **_JIT)
    def _max_abs_bits(xs, n):
        """fp32 bit pattern of max |x| over ``xs[:n]`` (``n`` >= 1), reduced in the element's width (``_abs_key``:
        bf16 groups 1.2x faster than in 32-bit lanes, measured). ``n`` must be a run-time value (a kernel
        argument): with a constant count LLVM unrolls the loop fully first and then leaves the reduction scalar
        (a K2 expert's group amaxes: 16 ms against 4.3 ms, measured)."""
        m = _abs_key(xs[0])
        for c in range(n):
            v = _abs_key(xs[c])
            m = v if v > m else m
        return _key_bits(m)

    @numba.njit(inline="always", **_JIT)
    def _prefetch_span(a, start, n):
        """``_prefetch`` ``a[start:start + n]``, every 32nd element: each line of a bf16 row; every other one of
        an fp32 row (the L2 fetches lines in pairs); an FP8 row's lines twice (a prefetch costs ~nothing)."""
        for c in range(start, start + n, 32):
            _prefetch(a, c)

    @numba.njit(inline="always", **_JIT)
    def _fp8_encode(ws, qs, s, n):
        """``qs[:n]`` = E4M3 bits of ``ws[:n] / s``, clamped to +-448 first (the reference's order)."""
        for c in range(n):
            qs[c] = _e4m3_bits(_clamp(_as_f32(ws[c]) / s, -_F32_MAX, _F32_MAX))

    @numba.njit(inline="always", **_JIT)
    def _e4m3_value(v: np.uint8) -> np.float32:
        """fp32 value of an E4M3 code (exact; NaN for 0x7f/0xff), branch-free: no per-call table to build.

        Decoding with it measured as fast as the per-tile tables it replaces (4.2 ms for a 2048x7168 expert on
        one core: bound by memory, ~10 GB/s); the bytes are the same (one IEEE multiply by the tile scale)."""
        b = np.uint32(v)
        mag = b & np.uint32(0x7F)
        # normal (exponent 1..15): rebias 7 -> 127 and widen the mantissa 3 -> 23 bits in one shift and add
        normal = np.uint32((mag << np.uint32(20)) + np.uint32(120 << 23))
        # subnormal (exponent 0): mantissa * 2^-9, exact in fp32
        sub = np.float32(np.float32(mag) * _E4M3_SUB).view(np.uint32)
        r = normal if mag >= np.uint32(8) else sub
        r = np.uint32(0x7FC00000) if mag == np.uint32(0x7F) else r
        return np.uint32(r | ((b & np.uint32(0x80)) << np.uint32(24))).view(np.float32)

    @numba.njit(inline="always", **_JIT)
    def _fp8_decode_row(q, scale, r, bn, bk, out):
        """Row ``r`` of the codes -> bf16 bits of ``fp32(code) * tile scale`` (one IEEE multiply) in ``out``.

        Returns the largest ``code & 0x7f`` of the row: 0x7f exactly when it holds an E4M3 NaN code (the check
        rides the decode, so convert needs no second pass over the codes). The reduction is uint8 and every
        index a slice's, from 0: a wider (numba promotes integer arithmetic to 64 bits) or wrapped one keeps
        LLVM to 4 lanes and per-element gathers (15.6 ms against 4.9 ms a K2 expert, one core, measured)."""
        k = q.shape[1]
        i = r // bn
        qr = q[r]
        m = np.uint8(0)
        for j in range(k // bk):  # whole tiles: a constant width, fully vectorised
            m = max(m, _fp8_decode(qr[j * bk:j * bk + bk], out[j * bk:j * bk + bk], scale[i, j], bk))
        if k % bk:  # a partial last tile
            m = max(m, _fp8_decode(qr[k - k % bk:], out[k - k % bk:], scale[i, k // bk], k % bk))
        return m

    @numba.njit(inline="always", **_JIT)
    def _fp8_decode(qs, os, s, n):
        """``os[:n]`` = bf16 bits of ``fp32(qs[:n]) * s``; returns the largest ``code & 0x7f`` among them."""
        m = np.uint8(0)
        for c in range(n):
            v = qs[c]
            os[c] = _bf16_bits(_e4m3_value(v) * s)
            m = max(m, np.uint8(v & np.uint8(0x7F)))
        return m

    # -- INT4 --------------------------------------------------------------------------------------
    @numba.njit(**_JIT)
    def _int4_scale_bits(amax: np.float32, library: bool) -> np.uint16:
        """bf16 bits of a group's scale: bf16(bf16(amax) / 7.5) or bf16(amax / 7); zero -> 2^-7."""
        if library:  # the library's amax is in bf16; rounding is monotonic, so bf16(max) = max(bf16)
            s = _bf16_bits(_f32_of_bf16(_bf16_bits(amax)) / np.float32(7.5))
        else:
            s = _bf16_bits(amax / np.float32(7.0))
        return _BF16_EPS_BITS if (s & np.uint16(0x7FFF)) == 0 else s

    # A rule's code of one element, stored as code + 8 in a byte, for finite x of a group whose scale s came
    # from _int4_scale_bits (then |quotient| <= 16: the rounding add below is exact). Against the rule written
    # as is (np.rint, float clamps, _bf16_bits) this takes 2/3 of the vector instructions: the integer rounding
    # rides an fp32 add (_RINT_PLUS_8), the upper clamp is a byte min after it (rint and clamping to integers
    # commute; the lower one stays before, where a subnormal scale's quotient could wrap the byte), and bf16
    # rounding skips the NaN case. 1.2x a K2 expert's codes (measured).
    @numba.njit(inline="always", **_JIT)
    def _bf16_round(x: np.float32) -> np.float32:
        """fp32 value of bf16(x) (round to nearest even) for finite x."""
        return np.uint32(_bf16_rne(np.float32(x).view(np.uint32)) & np.uint32(0xFFFF0000)).view(np.float32)

    @numba.njit(inline="always", **_JIT)
    def _int4_stored_library(x, s):
        """The library rule, x bf16 or fp32 bits: rint(clamp(bf16(bf16(x) / s), -8, 7)) + 8 as uint8."""
        q = _bf16_round(_as_bf16_f32(x) / s)
        q = np.float32(-8) if q < np.float32(-8) else q
        return min(np.uint8(np.float32(q + _RINT_PLUS_8).view(np.uint32)), np.uint8(15))

    @numba.njit(inline="always", **_JIT)
    def _int4_stored_kimi(x, s):
        """The kimi rule, x bf16 or fp32 bits: clamp(rint(x / s), -7, 7) + 8 as uint8."""
        q = _as_f32(x) / s
        q = np.float32(-7) if q < np.float32(-7) else q
        return min(np.uint8(np.float32(q + _RINT_PLUS_8).view(np.uint32)), np.uint8(15))

    @numba.njit(inline="always", **_JIT)
    def _int4_row_scales(x, g, gn, library, scale, amax):
        """Every group's scale bits of one row x [K] (bf16 or fp32 bits) into ``scale`` [K/g]; ``amax`` [K/g]
        uint32 is scratch. Returns the largest |x| bits of the row (a NaN/Inf where they reach the fp32
        exponent mask).

        Two passes: every group's amax (``gn`` = ``g`` at run time, ``_max_abs_bits``), then every scale,
        vectorised across groups. Computed group by group between two reductions, the rule's divisions and
        roundings stayed scalar: 1.2 ms of a K2 expert's 12.7 ms (one core, measured)."""
        ng = x.shape[0] // g
        for gi in range(ng):
            amax[gi] = _max_abs_bits(x[gi * g:gi * g + g], gn)
        top = np.uint32(0)
        for gi in range(ng):
            m = amax[gi]
            top = m if m > top else top
            scale[gi] = _int4_scale_bits(_amax_f32(m), library)
        return top

    @numba.njit(inline="always", **_JIT)
    def _int4_encode_row(x, g, gn, library, packed, scale, codes, amax, nxt):
        """One row: x [K] (bf16 or fp32 bits) -> packed [K/2] bytes (little-endian words), scale [K/g] bits.

        The scales first (``_int4_row_scales``), then the codes with the constant ``g``, prefetching ``nxt``
        (the next row's source, [K]) as they go; ``codes`` [K] uint8 and ``amax`` [K/g] uint32 are scratch.
        Returns whether the row holds a NaN/Inf."""
        k = x.shape[0]
        top = _int4_row_scales(x, g, gn, library, scale, amax)
        for gi in range(k // g):
            c0 = gi * g
            xs = x[c0:c0 + g]
            cs = codes[c0:c0 + g]
            s = _f32_of_bf16(scale[gi])
            _prefetch_span(nxt, c0, g)
            if library:  # the library divides in bf16
                for c in range(g):
                    cs[c] = _int4_stored_library(xs[c], s)
            else:
                for c in range(g):
                    cs[c] = _int4_stored_kimi(xs[c], s)
        for b in range(k // 2):  # element 2b in the low nibble of byte b, 2b + 1 in the high one
            packed[b] = codes[2 * b] | np.uint8(codes[2 * b + 1] << np.uint8(4))
        return top >= _F32_INF_BITS


# -- kernels per block / group size (compile-time constants; numba caches each on disk) -------------
#: rows per parallel task of the row kernels: their scratch rows are allocated once per task, not per row
ROWS = 16


@functools.cache
def _fp8_quantize_kernel(bn: int, bk: int):
    @numba.njit(parallel=True, **_JIT)
    def kernel(w, q, scale, bk_n):
        """w [N, K] (bf16 or fp32 bits) -> q [N, K] E4M3 bits, scale [Nt, Kt] fp32 (NaN/Inf where the tile is);
        ``bk_n`` = ``bk`` at run time (``_max_abs_bits``).

        A row of tiles at a time, in two passes that walk its rows front to back (every tile's amax, then the
        codes): a tile's 128 rows lie K elements apart and share a few L1 sets, so tile by tile ran 1.75x
        slower (measured)."""
        n, k = w.shape
        nt, kt = scale.shape
        kf = k // bk  # whole tiles per row; a partial last one when k % bk
        for i in numba.prange(nt):  # over rows of tiles: a prange over single tiles runs 6x slower
            r0 = i * bn
            rows = min(bn, n - r0)
            m = np.zeros(kt, np.uint32)
            for r in range(r0, r0 + rows):
                wr = w[r]
                for j in range(kf):
                    v = _max_abs_bits(wr[j * bk:j * bk + bk], bk_n)
                    m[j] = v if v > m[j] else m[j]
                if k % bk:
                    v = _max_abs_bits(wr[kf * bk:], k % bk_n)
                    m[kf] = v if v > m[kf] else m[kf]
            for j in range(kt):  # scale = max(amax, 1e-4) / 448 (fp32)
                amax = _amax_f32(m[j])
                scale[i, j] = (_F32_FLOOR if amax < _F32_FLOOR else amax) / _F32_MAX
            for r in range(r0, r0 + rows):
                wr = w[r]
                qr = q[r]
                for j in range(kf):
                    _fp8_encode(wr[j * bk:j * bk + bk], qr[j * bk:j * bk + bk], scale[i, j], bk)
                if k % bk:
                    _fp8_encode(wr[kf * bk:], qr[kf * bk:], scale[i, kf], k % bk)
    return kernel


@functools.cache
def _fp8_dequantize_kernel(bn: int, bk: int):
    @numba.njit(parallel=True, **_JIT)
    def kernel(q, scale, out, special):
        """q [N, K] E4M3 bits, scale [>= Nt, >= Kt] fp32 -> out [N, K] bf16 bits;
        special [ceil(N / ROWS)]: 1 where those rows hold a NaN code."""
        n = q.shape[0]
        for b in numba.prange(special.shape[0]):
            m = np.uint8(0)
            for r in range(b * ROWS, min(n, b * ROWS + ROWS)):
                m = max(m, _fp8_decode_row(q, scale, r, bn, bk, out[r]))
            special[b] = m == np.uint8(0x7F)
    return kernel


@functools.cache
def _int4_quantize_kernel(g: int):
    @numba.njit(parallel=True, **_JIT)
    def kernel(w, library, packed, scale, special, gn):
        """w [N, K] (bf16 or fp32 bits) -> packed [N, K/2] bytes, scale [N, K/g] bf16 bits;
        special [ceil(N / ROWS)]: 1 where those rows hold a NaN/Inf; ``gn`` = ``g`` at run time."""
        n, k = w.shape
        for b in numba.prange(special.shape[0]):
            codes = np.empty(k, np.uint8)
            amax = np.empty(k // g, np.uint32)
            bad = False
            for r in range(b * ROWS, min(n, b * ROWS + ROWS)):
                bad |= _int4_encode_row(w[r], g, gn, library, packed[r], scale[r], codes, amax, w[min(r + 1, n - 1)])
            special[b] = bad
    return kernel


@functools.cache
def _fp8_to_int4_kernel(bn: int, bk: int, g: int):
    @numba.njit(parallel=True, **_JIT)
    def kernel(q, fp8_scale, library, packed, scale, special, gn):
        """FP8 codes -> bf16 (a row at a time, with the fp32 tile scales) -> INT4 packed + scales;
        special [ceil(N / ROWS)]: 1 where those rows hold a NaN code or decode beyond bf16's range (Inf: a
        scale near fp32's largest); ``gn`` = ``g`` at run time."""
        n, k = q.shape
        for b in numba.prange(special.shape[0]):
            row = np.empty(k, np.uint16)
            codes = np.empty(k, np.uint8)
            amax = np.empty(k // g, np.uint32)
            m = np.uint8(0)
            inf = False
            for r in range(b * ROWS, min(n, b * ROWS + ROWS)):
                m = max(m, _fp8_decode_row(q, fp8_scale, r, bn, bk, row))
                inf |= _int4_encode_row(row, g, gn, library, packed[r], scale[r], codes, amax, q[min(r + 1, n - 1)])
            special[b] = inf or m == np.uint8(0x7F)
    return kernel


@functools.cache
def _int4_dequantize_kernel(g: int):
    @numba.njit(parallel=True, **_JIT)
    def kernel(packed, scale, out):
        """packed [N, K/2] bytes, scale [N, K/g] bf16 bits -> out [N, K] bf16 bits."""
        n, k = out.shape
        h = g // 2
        for r in numba.prange(n):
            pr, o = packed[r], out[r]
            for gi in range(k // g):
                s = _f32_of_bf16(scale[r, gi])
                ps = pr[gi * h:gi * h + h]  # slices: indices from 0 (module docstring)
                os = o[gi * g:gi * g + g]
                for c in range(g):
                    code = np.int32((ps[c >> 1] >> np.uint8(4 * (c & 1))) & np.uint8(0xF)) - 8
                    os[c] = _bf16_bits(np.float32(code) * s)
    return kernel


# -- Python side -----------------------------------------------------------------------------------
@functools.cache
def available() -> bool:
    """True when numba imports and the hot-path kernels compile and run (bf16, 128x128 tiles, g=32).

    Other block/group sizes and fp32 inputs compile on first use; numba caches every kernel on disk.
    """
    if numba is None or sys.byteorder != "little":  # packed bytes are viewed as little-endian int32 words
        return False
    try:
        with _without_scipy_blas():
            _f32_of_bf16(np.uint16(0))  # numba's first compile (or cache load) loads its registries
        w = torch.linspace(-2, 2, 130 * 256).reshape(130, 256).to(torch.bfloat16)
        q, s = fp8_quantize(w)
        fp8_dequantize(q, s)
        for rule in SCALE_RULES:
            packed, scale = int4_quantize_pack(w, 32, rule)
            int4_unpack_dequantize(packed, scale, 256, 32)
            fp8_to_int4(q, s, 32, rule)
    except Exception:  # noqa: BLE001 - any compile or runtime failure means "use the reference"
        return False
    return True


@contextlib.contextmanager
def _without_scipy_blas() -> Iterator[None]:
    """Tell numba there is no BLAS while it loads its typing registries, if they are not loaded yet.

    numba's first compile imports ``numba.np.arraymath``, which probes for BLAS by importing scipy.linalg
    (0.45 s of a 2-core start-up, measured); no kernel here calls BLAS, and without it numba's ``np.dot``
    uses its own loop. Only numba's own probe is replaced, for the time of that import: the kernels load while
    the run's reader threads work (``pipeline.start_shard``), and any other thread may import scipy meanwhile."""
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:  # the probe is free, or done
        yield
        return
    from numba.np import linalg

    def no_blas() -> None:
        raise ImportError("k2quant: BLAS probe skipped (no kernel here calls BLAS)")

    probe, linalg.ensure_blas = linalg.ensure_blas, no_blas
    try:
        yield
    finally:
        linalg.ensure_blas = probe


def _check_cpu(t: torch.Tensor) -> None:
    if numba is None:
        raise RuntimeError("k2quant.quant.fast: numba did not import (reinstall k2quant's dependencies: "
                           "pip install numba); or use the reference kernels")
    assert t.device.type == "cpu", "fast kernels run on CPU tensors"


#: elements per thread below which a kernel runs on fewer threads: waking a thread costs a scheduler slice
#: (~8 ms per call, measured, whatever the size, when another process keeps a core busy)
MIN_WORK_PER_THREAD = 1 << 22


def _threads(work: int) -> None:
    """Use as many threads as torch is allowed (convert sizes that to the free cores), but at least
    ``MIN_WORK_PER_THREAD`` elements each."""
    allowed = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(max(1, min(allowed, work // MIN_WORK_PER_THREAD)))


def _float_array(w: torch.Tensor) -> np.ndarray:
    """numpy bits of a float weight: bf16 as uint16 (no copy), fp32 as uint32, fp16 via fp32 (exact)."""
    # not fp64: fp64 -> fp32 -> bf16 would round twice where the library rule rounds once
    assert w.dtype in (torch.bfloat16, torch.float16, torch.float32), f"unsupported weight dtype {w.dtype}"
    w = w.contiguous()
    if w.dtype == torch.bfloat16:
        return w.view(torch.uint16).numpy()
    return w.to(torch.float32).view(torch.int32).numpy().view(np.uint32)  # fp16 -> fp32 is exact




def _batched(x: torch.Tensor, fn, *rest: torch.Tensor):
    """Apply a 2-D kernel wrapper over leading batch dims ``[E, ...]`` (tiles never span them)."""
    outs = [fn(*args) for args in zip(x.reshape(-1, *x.shape[-2:]),
                                      *(t.reshape(-1, *t.shape[-2:]) for t in rest))]
    return tuple(torch.stack([o[i] for o in outs]).reshape(*x.shape[:-2], *outs[0][i].shape)
                 for i in range(len(outs[0])))


def _special(found: bool, check: bool, what: str) -> None:
    """Raise ``NonFinite`` when a checking call's kernel met special values in its input."""
    if check and found:
        raise NonFinite(what)


def fp8_quantize(w: torch.Tensor, block_size: tuple[int, int] = (128, 128),
                 check: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8_block.quantize_weight``: (q float8_e4m3fn ``[..., N, K]``, scale fp32 ``[..., Nt, Kt]``).

    ``check``: raise ``NonFinite`` if ``w`` holds NaN/Inf (a tile's scale is then NaN/Inf: no second pass)."""
    _check_cpu(w)
    if w.dim() > 2:
        return _batched(w, lambda x: fp8_quantize(x, block_size, check))
    n, k = w.shape
    bn, bk = block_size
    q = np.empty((n, k), np.uint8)
    scale = np.empty((-(-n // bn), -(-k // bk)), np.float32)
    _threads(n * k)
    _fp8_quantize_kernel(bn, bk)(_float_array(w), q, scale, bk)
    _special(check and not np.isfinite(scale).all(), check, "NaN/Inf weight")
    return torch.from_numpy(q).view(FP8_DTYPE), torch.from_numpy(scale)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] = (128, 128),
                   check: bool = False) -> torch.Tensor:
    """``fp8_block.dequantize(q, scale, scheme, bf16)``: bf16 ``[..., N, K]``.

    ``check``: raise ``NonFinite`` if ``q`` holds an E4M3 NaN code (0x7f/0xff), found during the decode."""
    _check_cpu(q)
    if q.dim() > 2:
        return _batched(q, lambda a, b: (fp8_dequantize(a, b, block_size, check),), scale)[0]
    bn, bk = block_size
    _check_grid(q, scale, block_size)
    _threads(q.numel())
    out = np.empty(q.shape, np.uint16)
    special = np.empty(-(-q.shape[0] // ROWS), np.bool_)
    _fp8_dequantize_kernel(bn, bk)(q.contiguous().view(torch.uint8).numpy(),
                                   scale.to(torch.float32).contiguous().numpy(), out, special)
    _special(special.any(), check, "E4M3 NaN code")
    return torch.from_numpy(out).view(torch.bfloat16)


def _check_grid(q: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int]) -> None:
    assert q.dtype == FP8_DTYPE, f"float8_e4m3fn codes expected, got {q.dtype}"
    n, k = q.shape
    bn, bk = block_size
    assert scale.dim() == 2 and scale.shape[0] >= -(-n // bn) and scale.shape[1] >= -(-k // bk), \
        f"scale {list(scale.shape)} does not cover {[n, k]} in {bn}x{bk} tiles"


def _int4_outputs(n: int, k: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    assert k % group_size == 0 and group_size % 8 == 0, f"K={k} not divisible by group size {group_size}"
    return np.empty((n, k // 8), np.int32), np.empty((n, k // group_size), np.uint16)


def int4_quantize_pack(w: torch.Tensor, group_size: int, scale_rule: str,
                       check: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``int4_group.pack(quantize_weight(w))``: (packed int32 ``[..., N, K/8]``, scale bf16 ``[..., N, K/g]``).

    ``check``: raise ``NonFinite`` if ``w`` holds NaN/Inf (found by the amax pass: no second pass)."""
    _check_cpu(w)
    assert scale_rule in SCALE_RULES, f"unknown scale rule {scale_rule!r}"
    *lead, n, k = w.shape
    rows = n * int(np.prod(lead))
    packed, scale = _int4_outputs(rows, k, group_size)
    special = np.empty(-(-rows // ROWS), np.bool_)
    _threads(rows * k)
    kernel = _int4_quantize_kernel(group_size)
    kernel(_float_array(w.reshape(-1, k)), scale_rule == "library", packed.view(np.uint8), scale, special, group_size)
    _special(special.any(), check, "NaN/Inf weight")
    return (torch.from_numpy(packed).reshape(*lead, n, k // 8),
            torch.from_numpy(scale).view(torch.bfloat16).reshape(*lead, n, k // group_size))


def int4_unpack_dequantize(packed: torch.Tensor, scale: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """``int4_group.dequantize(unpack(packed, k), scale, scheme, bf16)``: bf16 ``[..., N, k]``."""
    _check_cpu(packed)
    assert k % group_size == 0 and group_size % 8 == 0 and packed.shape[-1] == k // 8, \
        f"packed {list(packed.shape)} does not hold K={k} in groups of {group_size}"
    # bf16 only: an fp32 scale would be used unrounded by the reference
    assert packed.dtype == torch.int32 and scale.dtype == torch.bfloat16, "packed int32 and bf16 scales expected"
    *lead, n, _ = packed.shape
    out = np.empty((n * int(np.prod(lead)), k), np.uint16)
    _threads(out.size)
    _int4_dequantize_kernel(group_size)(
        packed.contiguous().reshape(-1, k // 8).numpy().view(np.uint8),
        scale.contiguous().reshape(-1, k // group_size).view(torch.uint16).numpy(), out)
    return torch.from_numpy(out).view(torch.bfloat16).reshape(*lead, n, k)


def fp8_to_int4(q: torch.Tensor, fp8_scale: torch.Tensor, group_size: int, scale_rule: str,
                block_size: tuple[int, int] = (128, 128), check: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``int4_quantize_pack(fp8_dequantize(q, fp8_scale), ...)`` fused: one bf16 row at a time, no full copy.

    ``check``: raise ``NonFinite`` if ``q`` holds an E4M3 NaN code, or a code times its tile scale overflows
    bf16 (the INT4 codes of an Inf are not defined), found during the decode and encode."""
    _check_cpu(q)
    assert scale_rule in SCALE_RULES, f"unknown scale rule {scale_rule!r}"
    if q.dim() > 2:
        return _batched(q, lambda a, b: fp8_to_int4(a, b, group_size, scale_rule, block_size, check), fp8_scale)
    n, k = q.shape
    bn, bk = block_size
    packed, scale = _int4_outputs(n, k, group_size)
    _check_grid(q, fp8_scale, block_size)
    special = np.empty(-(-n // ROWS), np.bool_)
    _threads(n * k)
    kernel = _fp8_to_int4_kernel(bn, bk, group_size)
    kernel(q.contiguous().view(torch.uint8).numpy(), fp8_scale.to(torch.float32).contiguous().numpy(),
           scale_rule == "library",
           packed.view(np.uint8), scale, special, group_size)
    _special(special.any(), check, "E4M3 NaN code or a product beyond bf16's range")
    return torch.from_numpy(packed), torch.from_numpy(scale).view(torch.bfloat16)


# -- input checks (one pass, no temporaries: the torch versions cost more than the conversion) --------
#: (bits dtype, exponent mask): an element is NaN/Inf (or an E4M3 NaN code) when ``bits & mask == mask``
_SPECIAL = {torch.bfloat16: (torch.uint16, 0x7F80), torch.float16: (torch.uint16, 0x7C00),
            torch.float32: (torch.uint32, 0x7F800000), torch.float8_e4m3fn: (torch.uint8, 0x7F)}

if numba is not None:
    @numba.njit(parallel=True, **_JIT)
    def _count_special(bits, mask):
        n = 0
        for i in numba.prange(bits.size):
            if (bits[i] & mask) == mask:
                n += 1
        return n

    @numba.njit(**_JIT)
    def _any_special_words(words, mask, low, high):
        """SWAR over 64-bit words: does any lane have ``lane & m == m``? (lane-wise has-zero on ``(w & m) ^ m``)."""
        for i in range(words.size):
            y = (words[i] & mask) ^ mask
            if (y - low) & ~y & high:
                return True
        return False


def _lanes(value: int, width: int) -> np.uint64:
    return np.uint64(sum(value << (width * i) for i in range(64 // width)))


def count_nonfinite(t: torch.Tensor) -> int:
    """Number of NaN/Inf elements of a float tensor, or NaN codes (0x7f/0xff) of an E4M3 tensor."""
    _check_cpu(t)
    if t.dtype not in _SPECIAL:
        return int((~torch.isfinite(t)).sum())
    bits_dtype, mask = _SPECIAL[t.dtype]
    bits = t.contiguous().view(bits_dtype).reshape(-1).numpy()
    width = bits.dtype.itemsize * 8
    whole = bits.size * bits.dtype.itemsize // 8 * 8 // bits.dtype.itemsize  # elements in whole words
    clean = not _any_special_words(bits[:whole].view(np.uint64), _lanes(mask, width), _lanes(1, width),
                                   _lanes(1 << (width - 1), width))
    if clean and not (bits[whole:] & mask == mask).any():
        return 0
    _threads(bits.size)
    return int(_count_special(bits, bits.dtype.type(mask)))


# -- QAT: fake quant (quantize -> dequantize) in one pass -------------------------------------------
@functools.cache
def _int4_fake_quantize_kernel(g: int):
    @numba.njit(parallel=True, **_JIT)
    def kernel(w, library, out, gn):
        """w [N, K] (bf16 or fp32 bits) -> out [N, K] bf16 bits of ``dequantize(quantize(w))``;
        ``gn`` = ``g`` at run time (``_max_abs_bits``)."""
        n, k = w.shape
        for b in numba.prange(-(-n // ROWS)):
            scale = np.empty(k // g, np.uint16)
            amax = np.empty(k // g, np.uint32)
            for r in range(b * ROWS, min(n, b * ROWS + ROWS)):
                x = w[r]
                o = out[r]
                _int4_row_scales(x, g, gn, library, scale, amax)
                nxt = w[min(r + 1, n - 1)]
                for gi in range(k // g):
                    xs = x[gi * g:gi * g + g]
                    os = o[gi * g:gi * g + g]
                    s = _f32_of_bf16(scale[gi])
                    _prefetch_span(nxt, gi * g, g)
                    if library:  # the codes exactly as _int4_encode_row computes them
                        for c in range(g):
                            os[c] = _bf16_bits(np.float32(np.int32(_int4_stored_library(xs[c], s)) - 8) * s)
                    else:
                        for c in range(g):
                            os[c] = _bf16_bits(np.float32(np.int32(_int4_stored_kimi(xs[c], s)) - 8) * s)
    return kernel


def int4_fake_quantize(w: torch.Tensor, group_size: int, scale_rule: str,
                       out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``int4_group.fake_quantize(w, scheme, out_dtype)`` (forward value) in one pass: the bf16 product
    ``code * scale``, cast to ``out_dtype`` (exact for fp32). ``w`` ``[..., N, K]`` fp32 or bf16, finite."""
    _check_cpu(w)
    assert scale_rule in SCALE_RULES, f"unknown scale rule {scale_rule!r}"
    *lead, n, k = w.shape
    assert k % group_size == 0, f"K={k} not divisible by group size {group_size}"
    out = np.empty((n * int(np.prod(lead)), k), np.uint16)
    # a copy: a numpy view marks the tensor's storage non-resizable, and FSDP2 frees its parameters' storage
    # by resizing it (QAT fake-quantizes FSDP2 parameters)
    w = w.detach().clone()
    _threads(w.numel())
    _int4_fake_quantize_kernel(group_size)(_float_array(w.reshape(-1, k)), scale_rule == "library", out, group_size)
    return torch.from_numpy(out).view(torch.bfloat16).reshape(w.shape).to(out_dtype)
