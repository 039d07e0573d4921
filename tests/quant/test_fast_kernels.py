"""The numba kernels (k2quant.quant.fast) against the torch kernels they replace, bit for bit.

The torch kernels (fp8_block, int4_group) are the contract: convert picks either path with ``--kernel``
and the output files must not depend on the choice. They are themselves checked against the slow loops
of tests/reference.py (test_quant.py, and once more here). Inputs: ragged shapes, every dtype convert
reads, magnitudes from subnormal to near overflow, all-zero tiles/groups, +-max, all 254 non-NaN E4M3
codes and all 16 INT4 codes.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("numba")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from reference import fp8_quantize_ref, int4_quantize_ref, pack_ref  # noqa: E402

from k2quant.quant import fast, fp8_block, int4_group  # noqa: E402
from k2quant.quant import scheme as S  # noqa: E402

FP8 = S.get("fp8-block-128")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
NAN_CODES = (0x7F, 0xFF)
SMALLEST_SUBNORMAL = {torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24, torch.float32: 2.0**-149}
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view, so that -0.0 vs 0.0 and every rounding bit count."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def finite_max(dtype: torch.dtype, rule: str | None = None) -> float:
    """Largest magnitude to draw: the dtype's max (bf16's for the library rule, which casts to bf16)."""
    return torch.finfo(torch.bfloat16 if rule == "library" and dtype == torch.float32 else dtype).max


def weights(shape, dtype, seed, log2_scale, specials, zero_block=None, rule=None) -> torch.Tensor:
    """Random weights of magnitude ~2^log2_scale, with special values and an all-zero block planted."""
    g = torch.Generator().manual_seed(seed)
    fin = torch.finfo(dtype)
    top = finite_max(dtype, rule)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 ** log2_scale
    w = w.clamp(-top, top).to(dtype)
    flat = w.view(-1)
    pool = torch.tensor([0.0, -0.0, top, -top, fin.tiny, -fin.tiny, fin.smallest_normal / 8,
                         -SMALLEST_SUBNORMAL[dtype], 1.0, -0.5], dtype=torch.float64).to(dtype)
    idx = torch.randint(0, flat.numel(), (specials,), generator=g)
    flat[idx] = pool[torch.randint(0, len(pool), (specials,), generator=g)]
    if zero_block is not None:
        (r0, r1), (c0, c1) = zero_block
        w[..., r0:r1, c0:c1] = 0
    return w


@st.composite
def fp8_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n, k = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    lo, hi = (-24, 14) if dtype == torch.float16 else (-140, 126)
    zr, zc = draw(st.integers(0, (n - 1) // 128)), draw(st.integers(0, (k - 1) // 128))
    w = weights((n, k), dtype, draw(st.integers(0, 2**31)), draw(st.integers(lo, hi)), draw(st.integers(0, 40)),
                zero_block=((zr * 128, zr * 128 + 128), (zc * 128, zc * 128 + 128)) if draw(st.booleans()) else None)
    return w


@st.composite
def int4_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    rule = draw(st.sampled_from(("library", "kimi")))
    group_size = draw(st.sampled_from((32, 64, 128)))
    n, k = draw(st.integers(1, 40)), group_size * draw(st.integers(1, 5))
    lo, hi = (-24, 14) if dtype == torch.float16 else (-140, 126)
    zr, zg = draw(st.integers(0, n - 1)), draw(st.integers(0, k // group_size - 1))
    w = weights((n, k), dtype, draw(st.integers(0, 2**31)), draw(st.integers(lo, hi)), draw(st.integers(0, 40)),
                zero_block=((zr, zr + 1), (zg * group_size, (zg + 1) * group_size)) if draw(st.booleans()) else None,
                rule=rule)
    return w, group_size, rule


@st.composite
def fp8_codes(draw, k_multiple=1):
    """E4M3 codes (any but NaN) with fp32 tile scales from tiny to huge, some from real quantization."""
    n, k = draw(st.integers(1, 300)), k_multiple * draw(st.integers(1, 300 // k_multiple))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    codes = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int32)
    codes = torch.where((codes & 0x7F) == 0x7F, codes ^ 0x01, codes).to(torch.uint8)  # NaN -> +-448
    grid = fp8_block.grid_shape((n, k), FP8.block_size)
    log2 = torch.randint(-140, 120, grid, generator=g).double()
    scale = (torch.rand(grid, generator=g, dtype=torch.float64) * 2.0 ** log2).float()
    if draw(st.booleans()):
        scale = torch.full(grid, fp8_block.AMAX_FLOOR / fp8_block.FP8_E4M3_MAX)  # all-zero tiles' scale
    return codes.view(torch.float8_e4m3fn), scale


def int4_reference(w, group_size, rule):
    scheme = S.get("int4-g32", group_size=group_size, scale_rule=rule)
    q, scale = int4_group.quantize_weight(w, scheme)
    return int4_group.pack(q), scale


# -- FP8 ---------------------------------------------------------------------------------------------
@SETTINGS
@given(fp8_cases())
def test_fp8_quantize_equals_torch(w):
    q, scale = fast.fp8_quantize(w)
    q_ref, s_ref = fp8_block.quantize_weight(w, FP8)
    assert torch.equal(bits(scale), bits(s_ref))
    assert torch.equal(bits(q), bits(q_ref))


@SETTINGS
@given(fp8_codes())
def test_fp8_dequantize_equals_torch(case):
    q, scale = case
    assert torch.equal(bits(fast.fp8_dequantize(q, scale)), bits(fp8_block.dequantize(q, scale, FP8)))


def test_fp8_every_code_and_rounding_ties():
    """All 254 non-NaN codes x scales whose products land on bf16 ties, subnormals and overflow."""
    codes = torch.tensor([c for c in range(256) if c not in NAN_CODES], dtype=torch.uint8)
    q = codes.repeat(128, 1).view(torch.float8_e4m3fn)  # [128, 254]: two tile columns
    for s in (1.0, 1 + 2**-8, 1 + 3 * 2**-9, 2**-133, 2**-126, 3.0e35, 1.7e38, 1e-4 / 448, 0.0):
        scale = torch.tensor([[s, s * 3]], dtype=torch.float32)
        assert torch.equal(bits(fast.fp8_dequantize(q, scale)), bits(fp8_block.dequantize(q, scale, FP8))), s


def test_fp8_quantize_every_code_point():
    """Weights at every code value times a tile scale, and halfway between neighbours (RNE ties)."""
    vals = torch.tensor([c for c in range(256) if c not in NAN_CODES], dtype=torch.uint8)
    f = vals.view(torch.float8_e4m3fn).double().sort().values
    mids = (f[1:] + f[:-1]) / 2
    w = torch.cat([f, mids, mids + 2**-30, mids - 2**-30]).float()
    w = w[: w.numel() // 128 * 128].reshape(-1, 128)  # 448 in every tile keeps the scale at exactly 1
    w[:, 0] = 448.0
    q, scale = fast.fp8_quantize(w)
    q_ref, s_ref = fp8_block.quantize_weight(w, FP8)
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(scale, s_ref)


def test_fp8_scale_grid_wider_than_needed():
    """Like the reference, extra scale rows/columns beyond the tensor are ignored (repeat, then crop)."""
    w = weights((200, 300), torch.bfloat16, seed=6, log2_scale=-6, specials=10)
    q, _ = fp8_block.quantize_weight(w, FP8)
    scale = torch.rand(3, 4) + 0.5  # [ceil(200/128) + 1, ceil(300/128) + 1]
    assert torch.equal(bits(fast.fp8_dequantize(q, scale)), bits(fp8_block.dequantize(q, scale, FP8)))
    packed, s = fast.fp8_to_int4(q[:, :256].contiguous(), scale, 32, "library")
    p_ref, s_ref = int4_reference(fp8_block.dequantize(q[:, :256], scale, FP8), 32, "library")
    assert torch.equal(packed, p_ref) and torch.equal(bits(s), bits(s_ref))


def test_fp8_expert_stack_equals_per_expert():
    w = weights((3, 200, 300), torch.bfloat16, seed=1, log2_scale=-6, specials=10)
    q, scale = fast.fp8_quantize(w)
    q_ref, s_ref = fp8_block.quantize_weight(w, FP8)
    assert scale.shape == (3, 2, 3) and torch.equal(bits(q), bits(q_ref)) and torch.equal(scale, s_ref)
    assert torch.equal(bits(fast.fp8_dequantize(q, scale)), bits(fp8_block.dequantize(q, scale, FP8)))


def test_fp8_matches_slow_loop_reference():
    w = weights((200, 300), torch.bfloat16, seed=2, log2_scale=-6, specials=20)
    q, scale = fast.fp8_quantize(w)
    q_ref, s_ref = fp8_quantize_ref(w)
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(scale, s_ref)


# -- INT4 --------------------------------------------------------------------------------------------
@SETTINGS
@given(int4_cases())
def test_int4_quantize_pack_equals_torch(case):
    w, group_size, rule = case
    packed, scale = fast.int4_quantize_pack(w, group_size, rule)
    p_ref, s_ref = int4_reference(w, group_size, rule)
    assert torch.equal(bits(scale), bits(s_ref))
    assert torch.equal(packed, p_ref)


@pytest.mark.parametrize("rule", ["library", "kimi"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_every_bf16_group_amax_equals_torch(rule, dtype):
    """A group for every finite positive bf16 amax a (subnormal scales included, where a quotient can exceed
    +-7.5 and the fast kernels' byte clamp must not wrap): a, -a and 30 steps between, byte for byte; the QAT
    fake-quant kernel, which computes the same codes, too."""
    a = torch.arange(1, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).double()  # 0x0001..0x7F7F
    steps = torch.linspace(-1, 1, 30, dtype=torch.float64)
    groups = torch.cat([a[:, None], -a[:, None], a[:, None] * steps], dim=1).to(torch.bfloat16).to(dtype)
    w = torch.cat([groups, groups[: (-len(groups)) % 8]]).reshape(-1, 8 * 32)  # rows of 8 groups
    packed, scale = fast.int4_quantize_pack(w, 32, rule)
    p_ref, s_ref = int4_reference(w, 32, rule)
    assert torch.equal(bits(scale), bits(s_ref))
    assert torch.equal(packed, p_ref)
    fq_ref = int4_group.fake_quantize(w, S.get("int4-g32", scale_rule=rule), out_dtype=torch.bfloat16)
    assert torch.equal(bits(fast.int4_fake_quantize(w, 32, rule)), bits(fq_ref))


@SETTINGS
@given(st.sampled_from((32, 64, 128)), st.integers(1, 40), st.integers(1, 4), st.integers(0, 2**31))
def test_int4_unpack_dequantize_equals_torch(group_size, n, groups, seed):
    """Random words (all 16 codes in every nibble) and bf16 scales from subnormal to huge."""
    g = torch.Generator().manual_seed(seed)
    k = group_size * groups
    packed = torch.randint(-2**31, 2**31, (n, k // 8), generator=g, dtype=torch.int64).to(torch.int32)
    scale = (torch.rand(n, groups, generator=g) * 2.0 ** torch.randint(-133, 120, (n, groups), generator=g)).bfloat16()
    scheme = S.get("int4-g32", group_size=group_size)
    ref = int4_group.dequantize(int4_group.unpack(packed, k), scale, scheme, torch.bfloat16)
    assert torch.equal(bits(fast.int4_unpack_dequantize(packed, scale, k, group_size)), bits(ref))


def test_int4_all_16_codes_round_trip():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 4)  # [3, 64]: every code in every nibble slot
    packed = pack_ref(q)
    scale = torch.tensor([[0.5, 2**-7], [3.0, 1e-38], [-1.5, 7.0]], dtype=torch.bfloat16)
    ref = int4_group.dequantize(q, scale, S.get("int4-g32"), torch.bfloat16)
    assert torch.equal(bits(fast.int4_unpack_dequantize(packed, scale, 64, 32)), bits(ref))


@pytest.mark.parametrize("rule", ["library", "kimi"])
def test_int4_matches_slow_loop_reference(rule):
    w = weights((20, 256), torch.bfloat16, seed=3, log2_scale=-6, specials=20)
    w[3, 32:64] = 0
    packed, scale = fast.int4_quantize_pack(w, 32, rule)
    q_ref, s_ref = int4_quantize_ref(w, 32, rule)
    assert torch.equal(bits(scale), bits(s_ref)) and torch.equal(packed, pack_ref(q_ref))


def test_int4_expert_stack_equals_per_expert():
    w = weights((3, 40, 256), torch.bfloat16, seed=4, log2_scale=-6, specials=10)
    packed, scale = fast.int4_quantize_pack(w, 32, "library")
    p_ref, s_ref = int4_reference(w, 32, "library")
    assert packed.shape == (3, 40, 32) and torch.equal(packed, p_ref) and torch.equal(bits(scale), bits(s_ref))
    ref = int4_group.dequantize(int4_group.unpack(packed, 256), scale, S.get("int4-g32"), torch.bfloat16)
    assert torch.equal(bits(fast.int4_unpack_dequantize(packed, scale, 256, 32)), bits(ref))


# -- FP8 -> INT4 (fused) -----------------------------------------------------------------------------
@SETTINGS
@given(fp8_codes(k_multiple=128), st.sampled_from((32, 64, 128)), st.sampled_from(("library", "kimi")))
def test_fp8_to_int4_equals_dequantize_then_quantize(case, group_size, rule):
    """Direct FP8 -> INT4 equals FP8 -> BF16 -> INT4 with the torch kernels, byte for byte; where a code times
    its scale overflows bf16 (Inf, which has no INT4 code) the checking call refuses instead."""
    from k2quant.errors import NonFinite

    q, scale = case
    w = fp8_block.dequantize(q, scale, FP8, torch.bfloat16)
    if not torch.isfinite(w).all():
        with pytest.raises(NonFinite):
            fast.fp8_to_int4(q, scale, group_size, rule, check=True)
        return
    packed, s = fast.fp8_to_int4(q, scale, group_size, rule, check=True)
    p_ref, s_ref = int4_reference(w, group_size, rule)
    assert torch.equal(bits(s), bits(s_ref))
    assert torch.equal(packed, p_ref)


def test_fp8_to_int4_expert_stack():
    w = weights((2, 130, 256), torch.bfloat16, seed=5, log2_scale=-6, specials=10)
    q, scale = fp8_block.quantize_weight(w, FP8)
    packed, s = fast.fp8_to_int4(q, scale, 32, "kimi")
    p_ref, s_ref = int4_reference(fp8_block.dequantize(q, scale, FP8), 32, "kimi")
    assert torch.equal(packed, p_ref) and torch.equal(bits(s), bits(s_ref))


def test_available():
    assert fast.available()


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"})


def test_kernels_load_without_scipy_and_leave_numba_as_it_was():
    """numba's BLAS probe is skipped while its registries load (scipy.linalg is not imported for it) and put
    back afterwards."""
    r = _python("""
        import sys
        import numba.np.linalg as la
        probe = la.ensure_blas
        from k2quant.quant import dispatch
        assert not dispatch.ready()
        assert dispatch.ops().name == "fast" and dispatch.ready()
        assert la.ensure_blas is probe, la.ensure_blas
        assert "scipy.linalg" not in sys.modules, "the kernels' load imported scipy.linalg"
        import scipy.linalg
        assert scipy.linalg.blas is not None
        print("ok")
    """)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, "ok", "")


def test_scipy_imports_in_another_thread_while_the_kernels_load():
    """The probe is numba's alone: a thread importing scipy.linalg meanwhile gets the real module."""
    r = _python("""
        import threading
        import scipy
        from k2quant.quant import dispatch
        got = []
        t = threading.Thread(target=lambda: got.append(__import__("scipy.linalg.cython_blas").linalg.cython_blas))
        t.start()
        assert dispatch.ops().name == "fast"
        t.join()
        assert got and got[0].__name__ == "scipy.linalg.cython_blas"
        print("ok")
    """)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, "ok", "")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_count_nonfinite_matches_torch(dtype):
    from k2quant.quant import dispatch

    g = torch.Generator().manual_seed(7)
    w = torch.randn(301, 77, generator=g).to(dtype)
    assert fast.count_nonfinite(w) == 0
    idx = torch.randint(0, w.numel(), (40,), generator=g)
    w.view(-1)[idx[:15]] = float("nan")
    w.view(-1)[idx[15:30]] = float("inf")
    w.view(-1)[idx[30:]] = -float("inf")
    w.view(-1)[0] = torch.finfo(dtype).max  # the largest finite value is not special
    assert fast.count_nonfinite(w) == int((~torch.isfinite(w)).sum()) == dispatch.REFERENCE.count_nonfinite(w)


def test_count_nonfinite_fp8_nan_codes():
    codes = torch.arange(256, dtype=torch.uint8).repeat(3).view(torch.float8_e4m3fn).reshape(6, 128)
    want = int(torch.isnan(codes.float()).sum())
    assert want == 6  # 0x7f and 0xff, three times
    assert fast.count_nonfinite(codes) == want


# -- special values found by the converting kernels themselves (check=True: one pass, no count) --------
def _checking_calls():
    """(name, input dtype, call(x) with check=True) for every kernel convert asks to check its input."""
    def fp8_scale(q):  # ones: finite tiles, so that only the codes can be special
        return torch.ones(-(-q.shape[0] // 128), -(-q.shape[1] // 128))
    return [
        ("fp8_quantize", torch.bfloat16, lambda x: fast.fp8_quantize(x, check=True)),
        ("fp8_quantize fp32", torch.float32, lambda x: fast.fp8_quantize(x, check=True)),
        ("int4 library", torch.bfloat16, lambda x: fast.int4_quantize_pack(x, 32, "library", check=True)),
        ("int4 kimi fp16", torch.float16, lambda x: fast.int4_quantize_pack(x, 32, "kimi", check=True)),
        ("fp8_dequantize", FP8_DTYPE, lambda q: fast.fp8_dequantize(q, fp8_scale(q), check=True)),
        ("fp8_to_int4", FP8_DTYPE, lambda q: fast.fp8_to_int4(q, fp8_scale(q), 32, "library", check=True)),
    ]


FP8_DTYPE = torch.float8_e4m3fn


@pytest.mark.parametrize("name,dtype,call", _checking_calls(), ids=[c[0] for c in _checking_calls()])
def test_checking_kernels_find_every_special_value(name, dtype, call):
    """One NaN/Inf (or E4M3 NaN code) anywhere, in any row block or tile, raises NonFinite; none does not.

    Oracle: the planted position; the clean input also holds each dtype's largest finite value."""
    from k2quant.errors import NonFinite

    n, k = 300, 256  # several ROWS blocks and a partial last 128-row tile
    g = torch.Generator().manual_seed(11)
    if dtype == FP8_DTYPE:
        clean = torch.randint(0, 0x7E, (n, k), generator=g, dtype=torch.uint8)  # codes below the NaN code
        clean[5, 7] = 0x7E  # +448, the largest finite code
        specials = [0x7F, 0xFF]
    else:
        clean = torch.randn(n, k, generator=g).to(dtype)
        clean[5, 7] = torch.finfo(dtype).max
        specials = [float("nan"), float("inf"), -float("inf")]
    as_input = (lambda t: t.view(FP8_DTYPE)) if dtype == FP8_DTYPE else (lambda t: t)
    call(as_input(clean))  # no special value: no error
    for r, c in [(0, 0), (17, 129), (n - 1, k - 1), (150, 64)]:
        for value in specials:
            bad = clean.clone()
            bad[r, c] = value
            with pytest.raises(NonFinite):
                call(as_input(bad))


def test_checking_kernels_give_the_same_bytes():
    """check=True changes nothing but the raising: the results equal the non-checking calls'."""
    w = weights((130, 256), torch.bfloat16, seed=12, log2_scale=-6, specials=10)
    q, s = fast.fp8_quantize(w)
    q2, s2 = fast.fp8_quantize(w, check=True)
    assert torch.equal(bits(q), bits(q2)) and torch.equal(s, s2)
    for rule in ("library", "kimi"):
        a, b = fast.int4_quantize_pack(w, 32, rule), fast.int4_quantize_pack(w, 32, rule, check=True)
        assert torch.equal(a[0], b[0]) and torch.equal(bits(a[1]), bits(b[1]))
        a, b = fast.fp8_to_int4(q, s, 32, rule), fast.fp8_to_int4(q, s, 32, rule, check=True)
        assert torch.equal(a[0], b[0]) and torch.equal(bits(a[1]), bits(b[1]))
    assert torch.equal(bits(fast.fp8_dequantize(q, s)), bits(fast.fp8_dequantize(q, s, check=True)))


def test_fp32_above_bf16_max_is_not_special():
    """A finite fp32 weight beyond bf16's range makes an Inf library scale, but is not a NaN/Inf input."""
    w = torch.ones(4, 64)
    w[1, 3] = 3.395e38  # finite in fp32, rounds to Inf in bf16
    fast.int4_quantize_pack(w, 32, "library", check=True)
    fast.fp8_quantize(w, check=True)
