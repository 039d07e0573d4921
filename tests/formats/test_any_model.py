"""Selection from the model's own architecture, on families other than K2 (tiny Qwen3-MoE and Llama built
here with transformers): convert, verify, eval and qat through the same code, and the refusals.

Oracles: the tensor names transformers itself saved, compressed-tensors' own compressor, decompressor and
name matcher, transformers' models with weights set by hand, and torch's KL.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from compressed_tensors.utils.match import match_name
from safetensors.torch import load_file

import any_models
from helpers import config, ct_int4_compress, ct_int4_decompress, read_all

from k2quant.cli import main
from k2quant.errors import FormatError, K2QuantError
from k2quant.eval import measures
from k2quant.formats import arch, convert, load, plan, selection
from k2quant.quant import int4_group
from k2quant.qat import config as qat_config
from k2quant.qat import train as qat_train
from k2quant.qat import state as qat_state
from k2quant.quant import scheme as qscheme

transformers = pytest.importorskip("transformers")


def cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return any_models.build(tmp_path_factory.mktemp("qwen3moe") / "bf16", "qwen3_moe")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return any_models.build(tmp_path_factory.mktemp("llama") / "bf16", "llama", tokenizer=False)


def _linears(path: Path) -> set[str]:
    """Every Linear the loaders see: transformers' own nn.Linear modules plus the per-expert names it saved."""
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(str(path)))
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return names | {n[:-7] for n in any_models.saved_names(path) if ".experts." in n}


def _assert_config_matches_tensors(out: Path, linears: set[str]) -> set[str]:
    """compressed-tensors' own matcher over the written ignore list: quantized iff not ignored."""
    ignore = config(out)["quantization_config"]["ignore"]
    quantized = {n[: -len(".weight_packed")] for n in read_all(out) if n.endswith(".weight_packed")}
    for m in linears:
        assert (m in quantized) != any(match_name(m, p) for p in ignore), m
    return quantized


# -- Qwen3-MoE: experts found from the model ---------------------------------------------------------------
def test_qwen3_moe_recipe_experts_selects_what_transformers_saved_as_experts(qwen, tmp_path):
    code, msg = cli("convert", qwen, tmp_path / "o", "--to", "int4", "--recipe", "experts")
    assert code == 0, msg
    settings = json.loads((tmp_path / "o" / "k2quant_manifest.json").read_text())["settings"]["scheme"]
    assert settings["targets"] == ["Qwen3MoeExperts"]  # the experts class, read off the model
    experts = {n[:-7] for n in any_models.saved_names(qwen) if ".mlp.experts." in n}
    assert len(experts) == 2 * 4 * 3
    assert _assert_config_matches_tensors(tmp_path / "o", _linears(qwen)) == experts
    src, out = read_all(qwen), read_all(tmp_path / "o")
    for m in sorted(experts):
        ref = ct_int4_compress(src[m + ".weight"])
        assert torch.equal(out[m + ".weight_packed"], ref["weight_packed"])
        assert torch.equal(out[m + ".weight_scale"], ref["weight_scale"])
    code, msg = cli("verify", qwen, tmp_path / "o")
    assert code == 0 and "OK" in msg, msg


def test_qwen3_moe_every_linear_and_fp8_verify(qwen, tmp_path):
    code, msg = cli("convert", qwen, tmp_path / "i", "--to", "int4", "--targets", "Linear", "--ignore", "lm_head")
    assert code == 0, msg
    want = _linears(qwen) - {"lm_head"}
    assert _assert_config_matches_tensors(tmp_path / "i", _linears(qwen)) == want
    assert {m.rsplit(".", 1)[1] for m in want} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"}
    assert cli("convert", qwen, tmp_path / "f", "--to", "fp8")[0] == 0
    fp8 = {n[:-7] for n, t in read_all(tmp_path / "f").items() if t.dtype == torch.float8_e4m3fn}
    assert fp8 == want  # every Linear but lm_head; the router (not a Linear) stays BF16
    for d in ("i", "f"):
        code, msg = cli("verify", qwen, tmp_path / d)
        assert code == 0 and "OK" in msg, msg


def _ct_fake_quant(w: torch.Tensor) -> torch.Tensor:
    c = ct_int4_compress(w)
    return ct_int4_decompress(c["weight_packed"], c["weight_scale"], c["weight_shape"])


#: how each family stores expert e of the in-memory ``<layer>.mlp.experts`` on disk: (gate, up, down) names
DISK_EXPERT = {"qwen3_moe": lambda layer, e: [f"{layer}.mlp.experts.{e}.{p}" for p in ("gate_proj", "up_proj",
                                                                                         "down_proj")],
               "mixtral": lambda layer, e: [f"{layer}.block_sparse_moe.experts.{e}.{p}" for p in ("w1", "w3", "w2")]}


def _independent_int4_experts(src: Path, family: str = "qwen3_moe", dtype=torch.float32):
    """transformers' own model with each expert slice replaced by compressed-tensors' compress->decompress
    of the weight transformers saved under that expert's disk name."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype).eval()
    sd = read_all(src)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not hasattr(mod, "gate_up_proj"):
                continue
            for e in range(mod.gate_up_proj.shape[0]):
                layer = name.removesuffix(".mlp.experts")
                gate, up, down = (_ct_fake_quant(sd[n + ".weight"]) for n in DISK_EXPERT[family](layer, e))
                mod.gate_up_proj[e] = torch.cat([gate, up]).to(dtype)
                mod.down_proj[e] = down.to(dtype)
    return model


def _kl(base, cand, windows) -> torch.Tensor:
    with torch.no_grad():
        ids = torch.stack(windows)
        lp, lq = (F.log_softmax(m(ids).logits[:, :-1].float(), -1) for m in (base, cand))
    return (lp.exp() * (lp - lq)).sum(-1).flatten()


def test_qwen3_moe_eval_agrees_with_independent_fake_quant(qwen, tmp_path):
    assert cli("convert", qwen, tmp_path / "int4", "--to", "int4", "--recipe", "experts")[0] == 0
    text = tmp_path / "held.txt"
    text.write_text("\n\n\n".join(any_models.words_text(s, 400) for s in (101, 102)))
    code, msg = cli("eval", qwen, tmp_path / "int4", "--tasks", "k2quant_ppl", "--text", text, "--limit", "1",
                    "--max-length", "64", "--measure-tokens", "126", "--batch-size", "2", "--report", tmp_path / "r")
    assert code == 0, msg
    got = json.loads((tmp_path / "r" / "results.json").read_text())["direct"]["int4"]
    tok = transformers.AutoTokenizer.from_pretrained(str(qwen))
    windows = measures.token_windows(tok, [text.read_text()], 64, 126)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(qwen), dtype=torch.float32).eval()
    kl = _kl(base, _independent_int4_experts(qwen), windows)
    assert got["tokens"] == kl.numel() == 126
    assert kl.mean().item() > 1e-5  # a real difference, so agreement below means something
    assert got["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-3)


def test_qwen3_moe_qat_exports_the_trained_fake_quant(qwen, tmp_path):
    (tmp_path / "data").mkdir()
    for i in range(2):
        (tmp_path / "data" / f"p{i}.txt").write_text(any_models.words_text(i, 900))
    cfg = qat_config.QatConfig(src=str(qwen), data=[str(tmp_path / "data")], out=str(tmp_path / "q"), steps=3, lr=3e-3,
                            seq_len=32, batch_size=2, loss="kl", warmup=0.2, eval_batches=1, log_every=1,
                            targets=["Qwen3MoeExperts"], ignore=[])
    recs = []
    report = qat_train.run(cfg, progress=recs.append)
    assert report.exported and report.steps_done == 3
    # top-2 of 4 experts, 2 layers: every token counted twice per layer, from the experts' own routing
    assert all(sum(c) == 2 * 2 * 32 for r in recs for c in r["expert_tokens"].values()) and recs[0]["expert_tokens"]
    sd = load_file(str(Path(cfg.out) / qat_state.STATE / qat_state.MODEL_FILE))
    out, scheme = read_all(Path(cfg.out)), cfg.scheme()
    quantized = {n[: -len(".weight_packed")] for n in out if n.endswith(".weight_packed")}
    assert quantized == {n[:-7] for n in any_models.saved_names(qwen) if ".mlp.experts." in n}
    mismatches = 0
    for li in range(2):
        gate_up, down = sd[f"model.layers.{li}.mlp.experts.gate_up_proj"], sd[f"model.layers.{li}.mlp.experts.down_proj"]
        for e in range(4):
            for proj, w in (("gate_proj", gate_up[e, :32]), ("up_proj", gate_up[e, 32:]), ("down_proj", down[e])):
                m = f"model.layers.{li}.mlp.experts.{e}.{proj}"
                got = ct_int4_decompress(out[m + ".weight_packed"], out[m + ".weight_scale"], out[m + ".weight_shape"])
                want = int4_group.dequantize(*int4_group.quantize_weight(w, scheme), scheme, torch.bfloat16)
                mismatches += int((got != want).sum())
    assert mismatches == 0


# -- Mixtral: experts stored under other names (block_sparse_moe.experts.E.w1/w2/w3) ------------------------------
def test_mixtral_experts_found_from_the_model_convert_verify_eval(tmp_path):
    src = any_models.build(tmp_path / "bf16", "mixtral")
    code, msg = cli("convert", src, tmp_path / "d", "--to", "int4")
    assert code == 2 and "Pass --recipe experts to select the routed experts from the model" in msg
    assert cli("convert", src, tmp_path / "int4", "--to", "int4", "--recipe", "experts")[0] == 0
    experts = {n[:-7] for n in any_models.saved_names(src) if ".experts." in n}
    assert len(experts) == 2 * 4 * 3
    assert _assert_config_matches_tensors(tmp_path / "int4", {n[:-7] for n in any_models.saved_names(src)
                                                              if n.endswith("proj.weight") or ".experts." in n
                                                              or n == "lm_head.weight"}) == experts
    code, msg = cli("verify", src, tmp_path / "int4")
    assert code == 0 and "OK" in msg, msg
    text = tmp_path / "held.txt"
    text.write_text(any_models.words_text(103, 400))
    code, msg = cli("eval", src, tmp_path / "int4", "--tasks", "k2quant_ppl", "--text", text, "--limit", "1",
                    "--max-length", "64", "--measure-tokens", "126", "--batch-size", "2", "--report", tmp_path / "r")
    assert code == 0, msg
    got = json.loads((tmp_path / "r" / "results.json").read_text())["direct"]["int4"]
    windows = measures.token_windows(transformers.AutoTokenizer.from_pretrained(str(src)), [text.read_text()], 64, 126)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    kl = _kl(base, _independent_int4_experts(src, "mixtral"), windows)
    assert kl.mean().item() > 1e-5
    assert got["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-3)
    # qat's export writes split experts under DeepSeek-style names: refused up front for Mixtral's
    cfg = qat_config.QatConfig(src=str(src), data=[str(text)], out=str(tmp_path / "q"), steps=1, seq_len=32,
                            batch_size=2, targets=["MixtralExperts"], ignore=[])
    with pytest.raises(K2QuantError, match="qat would export 'model.layers.0.mlp.experts.0.gate_proj' .and 23 more"):
        qat_train.run(cfg)


# -- Llama (no experts): recipes, fused groups, refusals ---------------------------------------------------------
def test_default_int4_on_a_model_without_experts_is_refused(llama, tmp_path):
    code, msg = cli("convert", llama, tmp_path / "o", "--to", "int4")
    assert code == 2
    assert ("--to int4 by default quantizes the routed experts only (the K2-Thinking layout), but LlamaForCausalLM "
            "has 14 Linear weights on disk (8 attention, 6 mlp) and no routed experts. Pass --recipe linear") in msg
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_recipes_on_llama(llama, tmp_path):
    linears = _linears(llama)
    assert cli("convert", llama, tmp_path / "lin", "--to", "int4", "--recipe", "linear")[0] == 0
    assert _assert_config_matches_tensors(tmp_path / "lin", linears) == linears - {"lm_head"}
    assert "lm_head" in config(tmp_path / "lin")["quantization_config"]["ignore"]  # tied: no tensor, still a Linear
    assert cli("convert", llama, tmp_path / "mlp", "--to", "int4", "--recipe", "mlp")[0] == 0
    assert _assert_config_matches_tensors(tmp_path / "mlp", linears) == {m for m in linears if ".mlp." in m}
    code, msg = cli("convert", llama, tmp_path / "x", "--to", "int4", "--recipe", "linear", "--targets", "Linear")
    assert code == 2 and "pass either --recipe or --targets/--ignore" in msg


def test_fused_qkv_must_share_a_scheme(llama, tmp_path):
    code, msg = cli("convert", llama, tmp_path / "o", "--to", "int4", "--targets", "Linear", "--ignore", "lm_head",
                    "--ignore", r"re:.*\.k_proj$")
    assert code == 2
    assert ("model.layers.0.self_attn.q_proj int4, model.layers.0.self_attn.k_proj plain, "
            "model.layers.0.self_attn.v_proj int4: serving engines fuse these 3 into one matrix") in msg
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_selection_that_matches_nothing_names_the_model(llama, tmp_path):
    code, msg = cli("convert", llama, tmp_path / "o", "--to", "int4", "--targets", "re:.*experts.*", "--ignore", "x")
    assert code == 2
    assert "select none of the Linear weights: LlamaForCausalLM has 14 Linear weights on disk" in msg
    code, msg = cli("convert", llama, tmp_path / "o", "--to", "int4", "--targets", r"re:.*_proj")
    assert code == 2 and "select 14 Linear weights" in msg and "pass --ignore lm_head" in msg


def test_arch_reads_kinds_from_the_model(llama, qwen):
    a = arch.from_config(json.loads((llama / "config.json").read_text()))
    assert a.model_class == "LlamaForCausalLM" and a.lm_head == "lm_head" and not a.experts
    assert a.kind("model.layers.1.self_attn.k_proj") == "attention" and a.kind("model.layers.1.mlp.up_proj") == "mlp"
    assert a.kind("model.norm") is None and a.kind("model.embed_tokens") is None
    model = transformers.AutoModelForCausalLM.from_pretrained(str(llama))
    assert a.num_params == sum(p.numel() for p in model.parameters())
    q = arch.from_config(json.loads((qwen / "config.json").read_text()))
    assert q.experts == {f"model.layers.{i}.mlp.experts": ("Qwen3MoeExperts", 4) for i in range(2)}
    assert q.kind("model.layers.0.mlp.experts.3.down_proj") == "routed_expert"
    assert q.kind("model.layers.0.mlp.experts.4.down_proj") is None  # only 4 experts
    assert q.kind("model.layers.0.mlp.gate") is None  # the router is not a Linear


# -- the loader: any class, checked before allocating --------------------------------------------------------
def test_loader_builds_the_checkpoints_own_class(qwen, llama):
    for path, cls in ((qwen, "Qwen3MoeForCausalLM"), (llama, "LlamaForCausalLM")):
        ours = load.load_model(path, dtype=torch.float32)
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        assert type(ours).__name__ == cls
        ids = torch.tensor([[1, 5, 77, 300, 12, 999]])
        with torch.no_grad():  # fp32; the reduction order may differ with the threads an earlier test left
            torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_config_that_does_not_match_the_tensors_is_refused_before_loading(llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 30
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"describes a LlamaForCausalLM with [\d,]+ parameters \(and 0 saved buffer "
                                          r"values\), but the weights on disk hold [\d,]+ values; the config does "
                                          r"not belong to these weights"):
        load.load_model(bad)
    with pytest.raises(FormatError, match=r"needs about [\d.]+ GB .* but only 0.0 GB are free"):
        load.check_fits(llama, torch.float32, available=1000)


def test_k2_recipe_experts_writes_the_same_tensors_as_the_default(tiny_dirs, tmp_path):
    convert.convert(tiny_dirs["bf16"], tmp_path / "d", "int4", qscheme.for_target("int4"))
    targets, ignore = selection.with_recipe("experts", tiny_dirs["bf16"])
    convert.convert(tiny_dirs["bf16"], tmp_path / "r", "int4", qscheme.for_target("int4", targets=targets, ignore=ignore))
    a, b = read_all(tmp_path / "d"), read_all(tmp_path / "r")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert config(tmp_path / "d")["quantization_config"]["ignore"][1:] == ["re:.*self_attn.*",
                                                                           "re:.*shared_experts.*",
                                                                           r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]
    assert cli("verify", tiny_dirs["bf16"], tmp_path / "r")[0] == 0


def test_config_that_would_not_match_the_tensors_is_refused_before_writing(llama, tmp_path, monkeypatch):
    """The last guard: an ignore list that leaves an unquantized Linear to the loaders is refused, nothing written."""
    monkeypatch.setattr(plan, "_int4_ignore", lambda scheme, items, arch: ["lm_head"])
    code, msg = cli("convert", llama, tmp_path / "o", "--to", "int4", "--recipe", "mlp")
    assert code == 2
    assert ("the written config (targets ['Linear'], ignore ['lm_head']) would not match the tensors for 8 Linear "
            "weights (loaders quantize every Linear not ignored), e.g. ['model.layers.0.self_attn.k_proj (plain)', "
            "'model.layers.0.self_attn.o_proj (plain)', 'model.layers.0.self_attn.q_proj (plain)']") in msg
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
