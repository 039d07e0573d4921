"""k2quant.qat: fake-quant numerics, straight-through gradients, the experts wrapper, prepare/remove."""
from __future__ import annotations

import ast
import pathlib

import pytest
import torch
import torch.nn.functional as F

import k2quant.qat as qat_pkg
from k2quant import qat
from k2quant.errors import SchemeError
from k2quant.qat import fake_quant
from k2quant.quant import int4_group
from k2quant.quant import scheme as qscheme

RULES = ("kimi", "library")


def fq_ref(w: torch.Tensor, rule: str, group_size: int = 32) -> torch.Tensor:
    """Slow oracle written from the spec formulas: a loop over groups (all rows at once); bf16 result."""
    out = torch.empty(w.shape, dtype=torch.bfloat16)
    eps = torch.tensor(2.0 ** -7, dtype=torch.bfloat16)
    for g0 in range(0, w.shape[-1], group_size):
        g = w[..., g0:g0 + group_size]  # [..., N, 32]
        if rule == "kimi":
            s = (g.float().abs().amax(-1, keepdim=True) / 7).to(torch.bfloat16)
            s = torch.where(s == 0, eps, s)
            q = (g.float() / s.float()).round().clamp(-7, 7)
        else:
            gb = g.to(torch.bfloat16)
            amax = torch.maximum(gb.amin(-1, keepdim=True).clamp(max=0).abs(), gb.amax(-1, keepdim=True).clamp(min=0))
            s = (amax.float() / 7.5).to(torch.bfloat16)
            s = torch.where(s == 0, eps, s)
            q = (gb.float() / s.float()).to(torch.bfloat16).float().clamp(-8, 7).round()
        out[..., g0:g0 + group_size] = (q * s.float()).to(torch.bfloat16)
    return out


def _weights(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w.view(-1)[:7] *= 10  # outliers
    w.reshape(-1, shape[-1])[1, :32] = 0  # an all-zero group
    return w.to(dtype)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(256, 384), (200, 320), (3, 64, 96)])
def test_fake_quant_weight_is_dequantize_of_quantize(rule, dtype, shape):
    scheme = qscheme.get("int4-g32", scale_rule=rule)
    w = _weights(shape, dtype)
    got = fake_quant.weight(w, scheme, torch.bfloat16)
    q, scale = int4_group.quantize_weight(w, scheme)
    assert torch.equal(got, int4_group.dequantize(q, scale, scheme, torch.bfloat16))
    assert torch.equal(got, fq_ref(w, rule))
    if len(shape) == 3:  # the stack quantizes exactly like each expert alone
        assert torch.equal(got, torch.stack([fake_quant.weight(w[e], scheme, torch.bfloat16) for e in range(shape[0])]))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_forward_equals_linear_on_fake_quant_weight(rule, dtype):
    scheme = qscheme.get("int4-g32", scale_rule=rule)
    w = _weights((96, 64), torch.float32).requires_grad_(True)
    x = torch.randn(5, 7, 64).to(dtype)
    assert torch.equal(fake_quant.linear(x, w, scheme), F.linear(x, fq_ref(w.detach(), rule).to(dtype)))
    with torch.no_grad():
        assert torch.equal(fake_quant.linear(x, w, scheme), F.linear(x, fq_ref(w, rule).to(dtype)))


def test_gradient_passes_straight_through():
    scheme = qscheme.get("int4-g32", scale_rule="kimi")
    g = torch.Generator().manual_seed(1)
    # small integers: every product and sum below is exact in fp32, whatever the summation order
    x = torch.randint(-3, 4, (4, 6, 64), generator=g).float().requires_grad_(True)
    w = _weights((32, 64), torch.float32).requires_grad_(True)
    grad = torch.randint(-3, 4, (4, 6, 32), generator=g).float()
    fake_quant.linear(x, w, scheme).backward(grad)
    wq = fq_ref(w.detach(), "kimi").float().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, wq).backward(grad)
    assert torch.equal(w.grad, wq.grad)  # d fq(w)/dw = identity
    assert torch.equal(x.grad, x2.grad)
    assert bool(w.grad.abs().sum() > 0)


def test_no_fake_quant_copy_is_saved_for_backward():
    scheme = qscheme.get("int4-g32", scale_rule="kimi")
    w = _weights((64, 128), torch.float32).requires_grad_(True)
    x = torch.randn(3, 128, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fake_quant.linear(x, w, scheme)
    assert saved and all(t.data_ptr() in (x.data_ptr(), w.data_ptr()) for t in saved)
    assert sum(t.numel() for t in saved) == x.numel() + w.numel()
    y.sum().backward()
    assert w.grad is not None and x.grad is not None


# -- the model wrapper -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from k2quant.formats import load, tiny

    path = tiny.build(tmp_path_factory.mktemp("qat") / "bf16", "bf16", seed=3)
    return lambda: load.load_model(path)


def _ids(n=2, t=24, seed=0):
    return torch.randint(3, 1024, (n, t), generator=torch.Generator().manual_seed(seed))


def _expert_oracle(model, rule: str) -> None:
    """Replace every routed expert's weights by the loop oracle, per expert and per projection (in place)."""
    with torch.no_grad():
        for li in (1, 2):
            ex = model.model.layers[li].mlp.experts
            inter = ex.gate_up_proj.shape[1] // 2
            for e in range(ex.num_experts):
                gate, up = ex.gate_up_proj[e, :inter], ex.gate_up_proj[e, inter:]
                ex.gate_up_proj[e] = torch.cat([fq_ref(gate, rule), fq_ref(up, rule)])
                ex.down_proj[e] = fq_ref(ex.down_proj[e], rule)


@pytest.mark.parametrize("rule", RULES)
def test_prepared_model_equals_model_with_fake_quant_weights(tiny_model, rule):
    scheme = qscheme.get("int4-g32", scale_rule=rule)
    plain, prepared, oracle = tiny_model(), tiny_model(), tiny_model()
    holders = qat.prepare(prepared, scheme)
    assert [h.name for h in holders] == ["model.layers.1.mlp.experts", "model.layers.2.mlp.experts"]
    assert all(h.experts == {"gate_up_proj": tuple(range(8)), "down_proj": tuple(range(8))} for h in holders)
    _expert_oracle(oracle, rule)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(prepared(ids).logits, oracle(ids).logits)
        assert not torch.equal(prepared(ids).logits, plain(ids).logits)
        qat.set_enabled(prepared, False)  # off: exactly transformers' own forward
        assert torch.equal(prepared(ids).logits, plain(ids).logits)
    assert qat.remove(prepared) == 2
    with torch.no_grad():
        assert torch.equal(prepared(ids).logits, plain(ids).logits)
    assert list(prepared.state_dict()) == list(plain.state_dict())


def test_fake_quant_runs_once_per_hit_expert_and_projection(tiny_model, monkeypatch):
    model = tiny_model()
    qat.prepare(model, qscheme.get("int4-g32", scale_rule="kimi"))
    calls = []
    from k2quant.quant import dispatch

    real = dispatch.fake_quantize  # what the forward calls (the fused kernel on CPU)
    monkeypatch.setattr(dispatch, "fake_quantize", lambda w, *a, **k: calls.append(tuple(w.shape)) or real(w, *a, **k))
    hits = []
    for li in (1, 2):
        model.model.layers[li].mlp.gate.register_forward_hook(lambda m, a, out: hits.append(out[2].unique().numel()))
    with torch.no_grad():
        model(_ids(1, 3))
    assert len(calls) == 2 * sum(hits)  # one gate_up [2I, H] and one down [H, I] per hit expert
    assert sorted(set(calls)) == [(192, 320), (320, 96)]
    assert sum(hits) < 16  # 3 tokens, top-2: some experts were not hit and cost nothing


def test_training_step_gradients_reach_the_fused_parameters(tiny_model):
    model = tiny_model()
    qat.prepare(model, qscheme.get("int4-g32", scale_rule="kimi"))
    ex = model.model.layers[1].mlp.experts
    ex.gate_up_proj = torch.nn.Parameter(ex.gate_up_proj.detach().float())
    model(_ids(), labels=_ids()).loss.backward()
    assert ex.gate_up_proj.grad.dtype == torch.float32 and bool(ex.gate_up_proj.grad.abs().sum() > 0)
    assert model.model.layers[1].mlp.experts.down_proj.grad is not None


def test_widened_targets_wrap_linears(tiny_model):
    shared = r"re:.*shared_experts\.(gate|up|down)_proj$"
    scheme = qscheme.get("int4-g32", scale_rule="kimi", targets=(shared,), ignore=())
    model, oracle = tiny_model(), tiny_model()
    holders = qat.prepare(model, scheme)
    assert [h.name for h in holders] == [f"model.layers.{li}.mlp.shared_experts.{p}_proj" for li in (1, 2)
                                         for p in ("gate", "up", "down")]
    with torch.no_grad():
        for h in holders:
            lin = oracle.get_submodule(h.name)
            lin.weight.copy_(fq_ref(lin.weight, "kimi"))
        assert torch.equal(model(_ids()).logits, oracle(_ids()).logits)
    assert set(qat.fake_quant_weights(model)) == {h.name for h in holders}


def test_fused_gate_up_must_be_targeted_together(tiny_model):
    scheme = qscheme.get("int4-g32", ignore=(*qscheme.KIMI_INT4_IGNORE, "model.layers.2.mlp.experts.3.up_proj"))
    with pytest.raises(SchemeError) as exc:
        qat.prepare(tiny_model(), scheme)
    assert str(exc.value) == (
        "model.layers.2.mlp.experts.3: gate_proj and up_proj are stored fused (model.layers.2.mlp.experts."
        "gate_up_proj); both must be targeted or both ignored, found {'gate_proj': True, 'up_proj': False}: "
        "adjust --targets/--ignore")


def test_ignored_expert_is_left_unquantized(tiny_model):
    e3 = tuple(f"model.layers.2.mlp.experts.3.{p}_proj" for p in ("gate", "up", "down"))
    scheme = qscheme.get("int4-g32", ignore=(*qscheme.KIMI_INT4_IGNORE, *e3))
    model = tiny_model()
    holders = qat.prepare(model, scheme)
    assert holders[1].experts["down_proj"] == (0, 1, 2, 4, 5, 6, 7)
    names = set(qat.fake_quant_weights(model))
    assert len(names) == 2 * 8 * 3 - 3 and not names & set(e3)


def test_codes_and_flip_rate(tiny_model):
    model = tiny_model()
    qat.prepare(model, qscheme.get("int4-g32", scale_rule="kimi"))
    before = {k: q for k, (q, _) in qat.codes(model).items()}
    assert qat.flip_rate(before, before) == 0.0
    after = {k: v.clone() for k, v in before.items()}
    first = next(iter(after))
    after[first].view(-1)[:10] += 1  # 10 codes changed
    assert qat.flip_rate(before, after) == 10 / sum(v.numel() for v in after.values())


def test_prepare_twice_is_an_error(tiny_model):
    model = tiny_model()
    qat.prepare(model, qscheme.get("int4-g32"))
    with pytest.raises(SchemeError, match="already prepared for QAT; call qat.remove"):
        qat.prepare(model, qscheme.get("int4-g32"))


def test_qat_imports_only_quant_and_torch():
    """The QAT core (fake quant, wrapping, weights); the workflow beside it reads and writes checkpoints."""
    allowed = ("torch", "k2quant.quant", "k2quant.qat", "k2quant.errors", "__future__", "dataclasses", "typing")
    for path in (pathlib.Path(qat_pkg.__file__).parent / f"{m}.py" for m in ("fake_quant", "wrap", "weights")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert n.startswith(allowed), f"{path.name} imports {n}"


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_fused_fake_quant_kernel_equals_the_oracle_and_the_reference(rule, dtype):
    """The one-pass CPU kernel QAT uses (``dispatch.fake_quantize``) against ``fq_ref`` and the reference kernel,
    on values with rounding ties, all-zero groups, tiny and huge groups, an expert stack; bf16 and fp32 outputs."""
    from k2quant.quant import dispatch, fast

    g = torch.Generator().manual_seed(7)
    w = torch.randn(3, 40, 128, generator=g) * torch.logspace(-6, 3, 40)[None, :, None]
    w[0, 0] = 0.0  # an all-zero row: every group gets the eps scale
    w[1, 1, :32] = torch.arange(32) * 0.5 - 8  # exact halves: ties
    w = w.to(dtype)
    scheme = qscheme.for_target("int4", scale_rule=rule)
    assert fast.available()
    for out_dtype in (torch.bfloat16, torch.float32):
        got = dispatch.fake_quantize(w, scheme, out_dtype)
        assert got.dtype == out_dtype
        assert torch.equal(got, fq_ref(w, rule).to(out_dtype))
        assert torch.equal(got, int4_group.fake_quantize(w, scheme, out_dtype=out_dtype))
        assert torch.equal(got, dispatch.fake_quantize(w, scheme, out_dtype, kernel="reference"))
