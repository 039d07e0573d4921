"""Calibrated INT4 on a dense Llama built by transformers: every Linear but lm_head calibrated on the inputs the
quantized model (loaded by transformers through compressed-tensors) feeds it; the CLI runs it end to end."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers import ct_int4_decompress, qat_workdir, read_all

from k2quant.cli import main
from k2quant.formats import calibrate, load, verify
from k2quant.quant import scheme as qscheme

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
SAMPLES, SEQ = 4, 32
TARGETS = ("re:.*_proj$",)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    _, k2 = qat_workdir(root, 2)
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    src = root / "llama"
    model.save_pretrained(src)
    for f in k2.glob("tokenizer*"):
        shutil.copy(f, src / f.name)
    stats = {}
    calib = calibrate.CalibConfig(data=(str(root / "data"),), samples=SAMPLES, seq_len=SEQ)
    scheme = qscheme.for_target("int4", targets=list(TARGETS), ignore=["lm_head"])
    calibrate.run(src, root / "out", scheme, calib, on_stats=lambda k, h, n: stats.__setitem__(k, (h.clone(), n)))
    return root, src, root / "out", stats


def test_every_linear_calibrated_on_the_quantized_models_inputs(llama):
    root, src, dst, stats = llama
    ids = calibrate.calibration_ids([str(root / "data")], load.load_tokenizer(src), SAMPLES, SEQ)
    # the quantized model in fp32: DST's weights as compressed-tensors' own decompressor reads them
    q_model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    out = read_all(dst)
    for name, mod in q_model.named_modules():
        if name + ".weight_packed" in out:
            w = ct_int4_decompress(*(out[f"{name}.weight_{p}"] for p in ("packed", "scale", "shape")))
            mod.weight.data = w.float()
    s_model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    calls, oracle = [], {}
    for layer in q_model.model.layers:
        layer.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        q_model(ids, use_cache=False)
    for li, (args, kwargs) in enumerate(calls):
        hooks = [m.register_forward_pre_hook(lambda m, a, key=f"model.layers.{li}.{n}": oracle.__setitem__(
            key, a[0].reshape(-1, a[0].shape[-1]).double())) for n, m in s_model.model.layers[li].named_modules()
            if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            s_model.model.layers[li](*args, **kwargs)
        for h in hooks:
            h.remove()
    assert sorted(stats) == sorted(oracle) and len(stats) == 2 * 7
    for key, x in oracle.items():
        h, n = stats[key]
        assert n == x.shape[0] == SAMPLES * SEQ
        assert torch.allclose(h.double(), x.T @ x, rtol=1e-3, atol=1e-4 * float((x.T @ x).abs().max())), key


def test_transformers_logits_equal_k2quants_dequantization(llama):
    root, src, dst, _ = llama
    assert verify.verify(src, dst).ok
    ct = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16)
    ours = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    ours.load_state_dict(load.dequantized_state_dict(dst), strict=False)
    ids = torch.tensor([[1, 5, 77, 300, 12, 999, 3, 41]])
    with torch.no_grad():
        assert torch.equal(ct(ids).logits, ours(ids).logits)


def test_cli_gptq_writes_what_the_library_writes(llama, tmp_path):
    root, src, dst, _ = llama
    res = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "cli"), "--to", "int4", "--method", "gptq",
                                    "--calib-data", str(root / "data"), "--calib-samples", str(SAMPLES),
                                    "--calib-seq-len", str(SEQ), "--targets", TARGETS[0], "--ignore", "lm_head",
                                    "--json", "-"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["modules_calibrated"] == 14
    want, got = read_all(dst), read_all(tmp_path / "cli")
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("args, message", [
    (["--method", "gptq"], "--method gptq needs --calib-data PATH (text, jsonl, or a directory of them)"),
    (["--calib-samples", "8"], "--calib-samples calibrate --method gptq only; add --method gptq or drop them"),
    (["--method", "gptq", "--calib-data", "x", "--workers", "2"],
     "--method gptq runs the layers in order in one process; drop --workers/--rank/--world-size"),
])
def test_cli_refuses_bad_calibration_flags(llama, tmp_path, args, message):
    _, src, _, _ = llama
    res = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "o"), "--to", "int4", *args])
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())
    assert not (tmp_path / "o").exists()


def test_too_little_calibration_text_is_one_clear_error(llama, tmp_path):
    root, src, _, _ = llama
    res = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "o"), "--to", "int4", "--method", "gptq",
                                    "--calib-data", str(root / "data"), "--calib-samples", "100000"])
    assert res.exit_code == 2
    out = " ".join(res.output.split())
    assert "fewer than --calib-samples 100000; add calibration text or lower --calib-samples" in out
    assert not (tmp_path / "o").exists()


def test_config_that_disagrees_with_the_weights_is_refused_before_writing(llama, tmp_path):
    root, src, _, _ = llama
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(main, ["convert", str(bad), str(tmp_path / "o"), "--to", "int4", "--method", "gptq",
                                    "--calib-data", str(root / "data"), "--calib-samples", "2",
                                    "--calib-seq-len", "16", "--targets", TARGETS[0], "--ignore", "lm_head"])
    assert res.exit_code == 2
    out = " ".join(res.output.split())
    assert ("model.layers.0: the checkpoint's tensors do not fit transformers' LlamaDecoderLayer built from "
            "config.json: missing [], unexpected [], shapes ['mlp.gate_proj.weight [160, 64] (expected [96, 64])'"
            in out), out
    assert not (tmp_path / "o").exists()
