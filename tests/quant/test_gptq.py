"""GPTQ core: the blocked version equals the column-by-column reference and an independent OBS formulation;
it reduces to round-to-nearest where it must, and lowers the output error where it should."""
import pytest
import torch

from k2quant.errors import SchemeError
from k2quant.quant import gptq, int4_group
from k2quant.quant import scheme as qscheme
from tests.reference import gptq_obs_ref, int4_quantize_ref


def _scheme(rule: str) -> qscheme.QuantScheme:
    return qscheme.get("int4-g32", scale_rule=rule)


def _problem(n: int, k: int, seed: int = 0, tokens: int = 512):
    """A weight and the Hessian of correlated inputs (low-rank structure plus noise, a few large channels)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    basis = torch.randn(16, k, generator=g)
    x = torch.randn(tokens, 16, generator=g) @ basis + 0.3 * torch.randn(tokens, k, generator=g)
    x[:, :4] *= 8.0  # outlier channels
    return w, gptq.hessian(x)


STATIC = gptq.GPTQConfig(scales="static", damp=0.01)  # the textbook setting: RTN's own scales
CONFIGS = [gptq.GPTQConfig(), STATIC, gptq.GPTQConfig(act_order=True), gptq.GPTQConfig(scales="lazy"),
           gptq.GPTQConfig(scales="mse", act_order=True), gptq.GPTQConfig(damp=0.1, diag_reg=0.5, block=96)]


@pytest.mark.parametrize("rule", ["library", "kimi"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"ao{int(c.act_order)}-{c.scales}-b{c.block}")
@pytest.mark.parametrize("shape", [(64, 256), (40, 320)])
def test_blocked_equals_reference_float64(rule, cfg, shape):
    w, h = _problem(*shape)
    q, s = gptq.quantize(w, h, _scheme(rule), cfg, dtype=torch.float64)
    q_ref, s_ref = gptq.quantize_ref(w, h, _scheme(rule), cfg, dtype=torch.float64)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)


@pytest.mark.parametrize("rule", ["library", "kimi"])
@pytest.mark.parametrize("act_order", [False, True])
def test_equals_optimal_brain_surgeon_formulation(rule, act_order):
    """Cholesky + lazy batches against explicit inverses of the shrinking Hessian, static scales."""
    w, h = _problem(24, 128, seed=1)
    cfg = gptq.GPTQConfig(act_order=act_order, block=64, scales="static", damp=0.01)
    q, s = gptq.quantize(w, h, _scheme(rule), cfg, dtype=torch.float64)
    _, s_ref = int4_quantize_ref(w, 32, rule)
    assert torch.equal(s, s_ref)  # static scales are round-to-nearest's
    hd = h.diagonal() + cfg.damp * h.diagonal().mean()
    order = sorted(range(128), key=lambda c: -float(hd[c])) if act_order else list(range(128))
    assert torch.equal(q, gptq_obs_ref(w, h, s_ref, order, 32, rule, cfg.damp, pin_extremes=rule == "kimi"))


@pytest.mark.parametrize("rule", ["library", "kimi"])
def test_uncorrelated_inputs_give_round_to_nearest(rule):
    """A diagonal Hessian spreads no error: GPTQ must write exactly RTN's codes and scales."""
    w, _ = _problem(32, 256)
    h = torch.diag(torch.rand(256, generator=torch.Generator().manual_seed(3)) + 0.1)
    q, s = gptq.quantize(w, h, _scheme(rule), gptq.GPTQConfig(act_order=True, scales="static"))
    q_rtn, s_rtn = int4_quantize_ref(w, 32, rule)
    assert torch.equal(s, s_rtn) and torch.equal(q, q_rtn)


def test_unseen_inputs_are_round_to_nearest_and_finite():
    """Channels no token ever used (zero rows/columns of H) stay RTN; an all-zero H gives RTN everywhere."""
    w, _ = _problem(16, 64)
    q, s = gptq.quantize(w, torch.zeros(64, 64), _scheme("library"), STATIC)
    assert torch.equal(q, int4_quantize_ref(w, 32, "library")[0])


@pytest.mark.parametrize("rule", ["library", "kimi"])
def test_lowers_output_error_against_round_to_nearest(rule):
    w, h = _problem(96, 256, seed=4)
    sch = _scheme(rule)
    q_rtn, s_rtn = int4_quantize_ref(w, 32, rule)
    err_rtn = gptq.output_error(w, int4_group.dequantize(q_rtn, s_rtn, sch), h)
    for cfg in CONFIGS:
        q, s = gptq.quantize(w, h, sch, cfg)
        err = gptq.output_error(w, int4_group.dequantize(q, s, sch), h)
        assert err < 0.8 * err_rtn, (cfg, err, err_rtn)
        lo, hi = int4_group.CODE_RANGE[rule]
        assert int(q.min()) >= lo and int(q.max()) <= hi


def test_mse_scales_never_worse_than_amax():
    w, h = _problem(64, 256, seed=5)
    sch = _scheme("library")
    s_mse = gptq.mse_scales(w, h.diagonal(), sch)
    hd = h.diagonal()

    def werr(s):
        deq = int4_group.dequantize(int4_group.quantize(w, s, sch), s, sch).float()
        return (((w.float() - deq) ** 2) * hd).reshape(64, 8, 32).sum(-1)

    s_amax = int4_quantize_ref(w, 32, "library")[1]
    assert bool((werr(s_mse) <= werr(s_amax) * (1 + 1e-6)).all())
    assert float(werr(s_mse).sum()) < 0.95 * float(werr(s_amax).sum())
    assert bool((s_mse > 0).all()) and bool((s_mse <= s_amax).all())


def test_float32_agrees_with_float64():
    w, h = _problem(64, 256, seed=6)
    q32, _ = gptq.quantize(w, h, _scheme("library"))
    q64, _ = gptq.quantize(w, h, _scheme("library"), dtype=torch.float64)
    assert float((q32 == q64).float().mean()) > 0.999


def test_bad_config_is_one_clear_error():
    with pytest.raises(SchemeError) as exc:
        gptq.GPTQConfig(damp=0, act_order=True, scales="lazy")
    assert str(exc.value) == ("GPTQ: damp must be > 0 (a positive definite Hessian), got 0; act_order needs scales "
                              "fixed before the columns are visited (static or mse): the format stores contiguous "
                              "groups without g_idx")


@pytest.mark.parametrize("scales", ["static", "mse"])
def test_kimi_rule_output_is_idempotent_so_qat_starts_from_it(scales):
    """The kimi scale recomputed from the dequantized GPTQ weights is the stored scale, and the codes are the
    stored codes (the property QAT's step 0 relies on), checked with the reference RTN."""
    w, h = _problem(64, 256, seed=7)
    sch = _scheme("kimi")
    q, s = gptq.quantize(w, h, sch, gptq.GPTQConfig(scales=scales))
    q_again, s_again = int4_quantize_ref(int4_group.dequantize(q, s, sch), 32, "kimi")
    assert torch.equal(s_again, s) and torch.equal(q_again, q)
