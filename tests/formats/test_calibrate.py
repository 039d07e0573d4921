"""Calibrated INT4 on the tiny K2 (fused MoE experts): each module's statistics are the inputs that module sees
in the quantized model, as transformers runs it (captured independently with hooks); planted defects are caught;
the output passes verify, loads through compressed-tensors and resumes per layer."""
import shutil

import pytest
import torch
from helpers import qat_workdir

from k2quant.formats import calibrate, load, verify
from k2quant.quant import gptq, int4_group
from k2quant.quant import scheme as qscheme

SAMPLES, SEQ = 4, 32


def _run(src, dst, on_stats=None, prior=0.0, **kw):
    calib = calibrate.CalibConfig(data=(str(src.parent / "data"),), samples=SAMPLES, seq_len=SEQ, batch_size=3,
                                  expert_prior=prior)
    return calibrate.run(src, dst, qscheme.for_target("int4", **kw), calib, force=True, on_stats=on_stats)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    _, src = qat_workdir(root, 2)
    stats = {}
    report = _run(src, root / "out", lambda k, h, n: stats.__setitem__(k, (h.clone(), n)))
    return src, root / "out", stats, report


def _ids(src):
    return calibrate.calibration_ids([str(src.parent / "data")], load.load_tokenizer(src), SAMPLES, SEQ)


def _oracle(src, dst) -> dict[str, tuple[torch.Tensor, int]]:
    """Per target: sum x x^T of its inputs when layer L of the *source* runs on what the quantized model (DST,
    loaded by transformers) feeds layer L. Experts: the tokens the router sends them, by explicit loops."""
    q_model = load.load_model(dst, dtype=torch.float32)
    s_model = load.load_model(src, dtype=torch.float32)
    out, calls = {}, []
    for layer in q_model.model.layers:
        layer.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        q_model(_ids(src), use_cache=False)
    for li, (args, kwargs) in enumerate(calls):
        layer = s_model.model.layers[li]
        hooks = []
        for name, mod in layer.named_modules():
            key = f"model.layers.{li}.{name}"
            if name.endswith("mlp.experts"):
                hooks.append(mod.register_forward_pre_hook(_expert_hook(out, key), with_kwargs=True))
        with torch.no_grad():
            layer(*args, **kwargs)
        for h in hooks:
            h.remove()
    return out


def _expert_hook(out, key):
    def hook(m, a, k):
        x, idx = a[0].double(), a[1]
        for e in range(m.gate_up_proj.shape[0]):
            rows = [t for t in range(x.shape[0]) if e in idx[t].tolist()]
            xe = x[rows]
            gate, up = (xe @ m.gate_up_proj[e].double().T).chunk(2, dim=-1)
            act = torch.nn.functional.silu(gate) * up
            for proj, inp in (("gate_proj", xe), ("up_proj", xe), ("down_proj", act)):
                out[f"{key}.{e}.{proj}"] = (inp.T @ inp, len(rows))
    return hook


def _mismatches(stats, oracle) -> list[str]:
    bad = [k for k in oracle if k not in stats]
    for k, (h, n) in stats.items():
        want, n_want = oracle[k]
        scale = float(want.abs().max()) or 1.0
        if n != n_want or not torch.allclose(h.double(), want, rtol=1e-3, atol=1e-4 * scale):
            bad.append(k)
    return bad


def test_statistics_are_the_quantized_models_inputs(work):
    src, dst, stats, report = work
    oracle = _oracle(src, dst)
    assert len(oracle) == 2 * 8 * 3  # two MoE layers, 8 experts, 3 projections: every routed expert
    assert _mismatches(stats, oracle) == []
    cov = report.expert_coverage["model.layers.1"]["mlp.experts"]
    assert sum(cov["routed"]) == SAMPLES * SEQ * 2  # top-2: every token counted twice
    assert cov["routed"] == [oracle[f"model.layers.1.mlp.experts.{e}.gate_proj"][1] for e in range(8)]


def test_written_codes_are_gptq_of_the_source_under_those_statistics(work):
    src, dst, stats, _ = work
    src_sd = load.dequantized_state_dict(src)
    from helpers import read_all
    out = read_all(dst)
    sch = qscheme.for_target("int4")
    for key in ("model.layers.1.mlp.experts.3.up_proj", "model.layers.2.mlp.experts.0.down_proj"):
        q, s = gptq.quantize(src_sd[key + ".weight"], stats[key][0], sch)
        assert torch.equal(out[key + ".weight_packed"], int4_group.pack(q))
        assert torch.equal(out[key + ".weight_scale"], s)


DEFECTS = {
    # the layer's outputs recomputed with the unquantized weights: the next layer calibrates on stale inputs
    "stale activations": ("_set_weight", lambda *a, **k: None),
    # each expert quantized with its neighbour's statistics
    "wrong expert": ("hessian", None),
    # the next layer gets this layer's inputs again
    "wrong layer": ("calibrate_layer", None),
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_planted_defect_is_caught(work, tmp_path, monkeypatch, defect):
    src, dst_good, _, _ = work
    from k2quant.formats import moe

    if defect == "stale activations":
        monkeypatch.setattr(calibrate, "_set_weight", lambda *a, **k: None)
    elif defect == "wrong expert":
        orig = moe.ExpertStats.hessian
        monkeypatch.setattr(moe.ExpertStats, "hessian", lambda self, c, e, p: orig(self, c, (e + 1) % 8, p))
        monkeypatch.setattr(moe.ExpertStats, "routed", lambda self, c, e: self.c[c].count[e])
    else:
        orig = calibrate.calibrate_layer

        def same_inputs(layer_mod, lay, weights, hidden, *a, **k):
            codes, _, cov, secs = orig(layer_mod, lay, weights, hidden, *a, **k)
            return codes, hidden, cov, secs
        monkeypatch.setattr(calibrate, "calibrate_layer", same_inputs)
    stats = {}
    _run(src, tmp_path / "bad", lambda k, h, n: stats.__setitem__(k, (h.clone(), n)))
    monkeypatch.undo()
    assert _mismatches(stats, _oracle(src, tmp_path / "bad")) != []


def test_output_verifies_and_loads_through_compressed_tensors(work, tmp_path):
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    src, dst, _, _ = work
    rep = verify.verify(src, dst)
    assert rep.ok, rep.problems
    assert 0 < rep.max_error["routed_expert"] <= 1
    shutil.copytree(dst, tmp_path / "hf")
    import json
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["model_type"] = "deepseek_v3"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    ours = load.load_model(dst, experts_implementation=None)
    ids = _ids(src)[:2]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ours(ids).logits)


def test_verify_rejects_a_broken_calibrated_output(work, tmp_path):
    """Codes shuffled within a module (same scales, codes in range): the error bound against the source fails."""
    from safetensors.torch import load_file, save_file

    src, dst, _, _ = work
    shutil.copytree(dst, tmp_path / "bad")
    name = "model.layers.1.mlp.experts.2.down_proj.weight_packed"
    f = next(p for p in (tmp_path / "bad").glob("*.safetensors") if name in load_file(str(p)))
    t = load_file(str(f))
    t[name] = t[name].flip(0).contiguous()
    save_file(t, str(f), metadata={"format": "pt"})
    rep = verify.verify(src, tmp_path / "bad")
    msgs = [p["problem"] for p in rep.problems if p["tensor"] == "model.layers.1.mlp.experts.2.down_proj.weight"]
    assert any("squared error of round-to-nearest" in m for m in msgs), rep.problems


def test_expert_prior_fills_experts_without_tokens(work, tmp_path):
    """An expert the router never picks gets the every-token statistics (prior), not a zero Hessian."""
    src, _, _, _ = work
    stats = {}
    _run(src, tmp_path / "p", lambda k, h, n: stats.__setitem__(k, (h.clone(), n)), prior=16.0)
    routed = {k: v for k, v in stats.items() if ".experts." in k}
    assert all(float(h.diagonal().min()) > 0 for h, _ in routed.values())


def test_interrupted_run_resumes_at_the_next_layer_with_identical_bytes(work, tmp_path, monkeypatch):
    src, dst_good, _, _ = work
    orig = calibrate.calibrate_layer

    def crash_at_layer_2(layer_mod, lay, *a, **k):
        if lay.index == 2:
            raise KeyboardInterrupt
        return orig(layer_mod, lay, *a, **k)
    monkeypatch.setattr(calibrate, "calibrate_layer", crash_at_layer_2)
    with pytest.raises(KeyboardInterrupt):
        _run(src, tmp_path / "r")
    assert not (tmp_path / "r" / "model.safetensors.index.json").exists()  # not a checkpoint yet
    monkeypatch.undo()
    calib = calibrate.CalibConfig(data=(str(src.parent / "data"),), samples=SAMPLES, seq_len=SEQ, batch_size=3,
                                  expert_prior=0.0)
    rep = calibrate.run(src, tmp_path / "r", qscheme.for_target("int4"), calib, resume=True)
    assert rep.layers_kept == 2
    files = sorted(p.name for p in dst_good.glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "r").glob("*.safetensors"))
    assert all((dst_good / f).read_bytes() == (tmp_path / "r" / f).read_bytes() for f in files)


def test_fp8_source_and_kimi_rule(work, tmp_path, tiny_dirs):
    """An FP8 source is read through convert's dequantization; kimi-rule codes stay in -7..7 and verify passes."""
    src, _, _, _ = work
    fp8 = tmp_path / "fp8"
    from k2quant.formats import convert
    convert.convert(src, fp8, "fp8", qscheme.for_target("fp8"))
    for f in src.glob("tokenizer*"):
        shutil.copy(f, fp8 / f.name)
    shutil.copytree(src.parent / "data", tmp_path / "data")
    _run(fp8, tmp_path / "out", prior=32.0, scale_rule="kimi")
    rep = verify.verify(fp8, tmp_path / "out")
    assert rep.ok, rep.problems
    from helpers import read_all
    packed = read_all(tmp_path / "out")["model.layers.1.mlp.experts.0.gate_proj.weight_packed"]
    q = int4_group.unpack(packed, 320)
    assert int(q.min()) >= -7
