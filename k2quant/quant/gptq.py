"""GPTQ for k2quant's symmetric group-wise INT4: codes that minimise the layer's output error, not the weight's.

Given a Linear's weight ``w`` ``[N, K]`` and the second moment of its inputs ``h = sum_t x_t x_t^T``
``[K, K]``, GPTQ quantizes the columns one at a time and spreads each column's rounding error over the
columns not yet quantized, using the Cholesky factor of ``h^-1`` (Frantar et al., 2022). The output
is what ``int4_group`` stores: int8 codes ``[N, K]`` and bf16 scales ``[N, K/g]``, with
``dequantize(q, scale)`` the loaded weight, in either scale rule (``library``: codes -8..7;
``kimi``: -7..7).

Choices (``GPTQConfig``):

- ``damp``: ``h + damp * mean(diag h) * I``. The larger, the closer to round-to-nearest.
- ``diag_reg``: ``h + diag_reg * diag(h)``: pulls towards the activation-weighted RTN solution (each
  column on its own) without touching the columns' relative importance.
- ``act_order``: quantize columns by decreasing ``diag(h)``. Groups stay contiguous on disk (the
  format has no ``g_idx``), so the scales are then computed up front (``scales="static"``).
- ``scales``: ``static``: the scheme's own scales of the source weight (what RTN writes, so verify
  can check them exactly); ``lazy``: each group's scale from the error-updated weights when GPTQ
  reaches the group (classic GPTQ, not with ``act_order``); ``mse``: per group, the shrink of the static
  scale that minimises the ``diag(h)``-weighted rounding error.

``quantize`` is the blocked fast version (lazy batch updates of ``block`` columns);
``quantize_ref`` the column-by-column reference, equal to it in exact arithmetic (tested in float64).
"""
from __future__ import annotations

import dataclasses

import torch

from k2quant.errors import SchemeError
from k2quant.quant import int4_group
from k2quant.quant.scheme import QuantScheme

SCALE_MODES = ("static", "lazy", "mse")
#: shrink factors tried by ``scales="mse"`` (1.0 = the scheme's own amax scale)
MSE_GRID = tuple(1.0 - 0.02 * i for i in range(26))


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    """Defaults chosen by measurement on SmolLM2-135M calibrated on Shakespeare (bench/gptq_smollm2.py): MSE
    scales and damping 0.1 lowered the output error on held-out Shakespeare *and* on the Python manual, where
    the textbook setting (damping 0.01, amax scales) is worse than round to nearest."""

    damp: float = 0.1
    diag_reg: float = 0.0
    act_order: bool = False
    scales: str = "mse"
    block: int = 128

    def __post_init__(self) -> None:
        problems = []
        if not self.damp > 0:
            problems.append(f"damp must be > 0 (a positive definite Hessian), got {self.damp}")
        if self.diag_reg < 0:
            problems.append(f"diag_reg must be >= 0, got {self.diag_reg}")
        if self.scales not in SCALE_MODES:
            problems.append(f"scales must be one of {list(SCALE_MODES)}, got {self.scales!r}")
        if self.act_order and self.scales == "lazy":
            problems.append("act_order needs scales fixed before the columns are visited (static or mse): the "
                            "format stores contiguous groups without g_idx")
        if self.block < 1:
            problems.append(f"block must be >= 1, got {self.block}")
        if problems:
            raise SchemeError("GPTQ: " + "; ".join(problems))


# -- statistics --------------------------------------------------------------------------------
def hessian(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out + x^T x`` in fp32 ``[K, K]`` for inputs ``x`` ``[..., K]`` (a sum over tokens, not a mean)."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)  # [T, K]
    h = x.T @ x
    return h if out is None else out.add_(h)


def _prepared(h: torch.Tensor, cfg: GPTQConfig, dtype: torch.dtype) -> torch.Tensor:
    """The damped, regularised Hessian; inputs never seen (zero diagonal) get a unit diagonal."""
    h = h.to(dtype).clone()
    d = h.diagonal()
    dead = d == 0
    d[dead] = 1.0
    if cfg.diag_reg:
        d.mul_(1.0 + cfg.diag_reg)
    d.add_(cfg.damp * d.mean())
    return h


def _upper_inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``h^-1`` (``h^-1 = U^T U``): row ``i`` spreads column ``i``'s error."""
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


# -- scales ------------------------------------------------------------------------------------
def static_scales(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The scheme's own scales of ``w`` (bf16 ``[N, K/g]``): exactly what round-to-nearest writes."""
    return int4_group.compute_scale(w, scheme)


def mse_scales(w: torch.Tensor, h_diag: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Per group, the clipped range whose rule scale minimises ``sum_j h_jj (w_j - deq_j)^2`` (bf16 ``[N, K/g]``)."""
    g = scheme.group_size
    amax = int4_group.group_amax(w, scheme).to(torch.float32)
    wg = int4_group._groups(w.to(torch.float32), g)  # [N, K/g, g]
    hd = h_diag.to(torch.float32).reshape(1, -1, g)  # [1, K/g, g]
    best, best_err = None, None
    for f in MSE_GRID:
        # the rule's own scale of a clipped range (a bf16 amax, as a dequantized group's is: kimi stays idempotent)
        s = int4_group.scale_of_amax((amax * f).to(int4_group.SCALE_DTYPE), scheme.scale_rule)
        q = int4_group.quantize_values(wg, s.unsqueeze(-1), scheme.scale_rule)
        deq = (q.to(torch.float32) * s.to(torch.float32).unsqueeze(-1)).to(int4_group.SCALE_DTYPE).float()
        err = ((wg - deq) ** 2 * hd).sum(-1)  # [N, K/g]
        if best is None:
            best, best_err = s, err
        else:
            take = err < best_err
            best, best_err = torch.where(take, s, best), torch.where(take, err, best_err)
    return best


def _initial_scales(w: torch.Tensor, h: torch.Tensor, scheme: QuantScheme, cfg: GPTQConfig) -> torch.Tensor:
    if cfg.scales == "mse":
        return mse_scales(w, h.diagonal(), scheme)
    return static_scales(w, scheme)  # "lazy" recomputes them group by group


def _column(w_col: torch.Tensor, s_col: torch.Tensor, rule: str,
            pin: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, dequantized value as loaded)`` of one column ``[N]`` with its scales ``[N]``; nonzero ``pin``
    entries are kept as the codes."""
    q = int4_group.quantize_values(w_col, s_col, rule)
    if pin is not None:
        q = torch.where(pin != 0, pin, q)
    deq = (q.to(torch.float32) * s_col.to(torch.float32)).to(int4_group.SCALE_DTYPE)
    return q, deq.to(w_col.dtype)


def pinned_extremes(w: torch.Tensor, scheme: QuantScheme, cfg: GPTQConfig) -> torch.Tensor | None:
    """kimi rule: int8 ``[N, K]``, +-7 where ``|w|`` is its group's amax (their RTN code), 0 elsewhere; else None.

    GPTQ keeps these codes whatever error reaches them, so every group still holds a +-7 and the kimi scale
    recomputed from the dequantized weights is the stored one: the checkpoint is idempotent, as RTN's is, and
    QAT starts from it unchanged. The error of the pinned code spreads to later columns like any other.
    """
    if scheme.scale_rule != "kimi" or cfg.scales == "lazy":
        return None
    wf = w.to(torch.float32)
    g = int4_group._groups(wf.abs(), scheme.group_size)  # [N, K/g, g]
    at_max = (g == g.amax(dim=-1, keepdim=True)).reshape(w.shape)
    return (at_max & (wf != 0)).to(torch.int8) * torch.sign(wf).to(torch.int8) * int4_group.INT4_MAX


def _setup(w, h, scheme, cfg, dtype):
    n, k = w.shape
    assert h.shape == (k, k), f"Hessian {tuple(h.shape)} does not match weight {tuple(w.shape)}"
    assert k % scheme.group_size == 0
    assert cfg.scales != "lazy" or cfg.block % scheme.group_size == 0, "lazy scales need whole groups per block"
    scale = _initial_scales(w, h, scheme, cfg)  # [N, K/g] bf16
    hp = _prepared(h, cfg, dtype)
    perm = torch.argsort(hp.diagonal(), descending=True, stable=True) if cfg.act_order else torch.arange(k)
    hp = hp[perm][:, perm]
    pin = pinned_extremes(w, scheme, cfg)
    return w.to(dtype)[:, perm].clone(), _upper_inverse_factor(hp), scale, perm, \
        None if pin is None else pin[:, perm]


def _lazy_scale(wp: torch.Tensor, col: int, scale: torch.Tensor, scheme: QuantScheme) -> None:
    """Classic GPTQ: at a group's first column, its scale from the current (error-updated) weights."""
    g = scheme.group_size
    if col % g == 0:
        scale[:, col // g] = int4_group.compute_scale(wp[:, col:col + g], scheme)[:, 0]


# -- the algorithm -----------------------------------------------------------------------------
def quantize_ref(w: torch.Tensor, h: torch.Tensor, scheme: QuantScheme, cfg: GPTQConfig = GPTQConfig(),
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference GPTQ, one column at a time over every remaining column: ``(codes int8 [N, K], scale bf16)``."""
    wp, u, scale, perm, pin = _setup(w, h, scheme, cfg, dtype)
    g = scheme.group_size
    q = torch.empty(wp.shape, dtype=torch.int8)
    for j in range(wp.shape[1]):
        if cfg.scales == "lazy":
            _lazy_scale(wp, j, scale, scheme)
        q[:, j], deq = _column(wp[:, j], scale[:, int(perm[j]) // g], scheme.scale_rule,
                               None if pin is None else pin[:, j])
        err = (wp[:, j] - deq) / u[j, j]
        wp[:, j:] -= err[:, None] * u[j, j:][None, :]
    return q[:, torch.argsort(perm)], scale


def quantize(w: torch.Tensor, h: torch.Tensor, scheme: QuantScheme, cfg: GPTQConfig = GPTQConfig(),
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked GPTQ: ``(codes int8 [N, K], scale bf16 [N, K/g])`` of weight ``w`` ``[N, K]`` under ``h``.

    Within a block of ``cfg.block`` columns the error goes column by column; the columns after the block
    get the whole block's error in one matrix product (the same arithmetic, reordered).
    """
    wp, u, scale, perm, pin = _setup(w, h, scheme, cfg, dtype)
    g, k = scheme.group_size, wp.shape[1]
    q = torch.empty(wp.shape, dtype=torch.int8)
    col_group = perm // g
    for b0 in range(0, k, cfg.block):
        b1 = min(b0 + cfg.block, k)
        wb, ub = wp[:, b0:b1], u[b0:b1, b0:b1]  # views: updates land in wp
        errs = torch.empty_like(wb)  # [N, B]
        for i in range(b1 - b0):
            if cfg.scales == "lazy":
                _lazy_scale(wp, b0 + i, scale, scheme)
            q[:, b0 + i], deq = _column(wb[:, i], scale[:, int(col_group[b0 + i])], scheme.scale_rule,
                                        None if pin is None else pin[:, b0 + i])
            errs[:, i] = (wb[:, i] - deq) / ub[i, i]
            wb[:, i:] -= errs[:, i:i + 1] * ub[i:i + 1, i:]
        wp[:, b1:] -= errs @ u[b0:b1, b1:]
    return q[:, torch.argsort(perm)], scale


def output_error(w: torch.Tensor, deq: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((w - deq) h (w - deq)^T)``: the summed squared output error over the calibration tokens."""
    d = (w.to(torch.float64) - deq.to(torch.float64))
    return float(((d @ h.to(torch.float64)) * d).sum())
