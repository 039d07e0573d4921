"""Converted checkpoints load unchanged in transformers (and compressed-tensors) with identical logits."""
import json
import shutil

import pytest
import torch
from helpers import read_all
from reference import fp8_dequant_ref

from k2quant.formats import convert, load
from k2quant.quant import scheme as qscheme

transformers = pytest.importorskip("transformers")
IDS = torch.tensor([[1, 5, 77, 300, 12, 999, 3, 41]])


def as_deepseek_v3(path):
    """transformers does not know model_type kimi_k2: rewrite it, as Kimi's deploy guide suggests."""
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "deepseek_v3"
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_bf16_output_loads_with_reference_logits(tiny_dirs, tmp_path):
    convert.convert(tiny_dirs["fp8"], tmp_path / "bf16", "bf16", None)
    model = transformers.AutoModelForCausalLM.from_pretrained(as_deepseek_v3(tmp_path / "bf16"), dtype=torch.bfloat16)
    src = read_all(tiny_dirs["fp8"])
    ref_sd = {n: t for n, t in src.items() if not n.endswith("_scale_inv")}
    for n in list(ref_sd):
        if n + "_scale_inv" in src:
            ref_sd[n] = fp8_dequant_ref(src[n], src[n + "_scale_inv"])
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(None, config=model.config, state_dict=ref_sd,
                                                             dtype=torch.bfloat16)
    assert torch.equal(logits(model), logits(ref))


def test_int4_output_loads_through_compressed_tensors(tiny_dirs, tmp_path):
    pytest.importorskip("compressed_tensors")
    convert.convert(tiny_dirs["bf16"], tmp_path / "int4", "int4", qscheme.for_target("int4"))
    shutil.copytree(tmp_path / "int4", tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(as_deepseek_v3(tmp_path / "hf"), dtype=torch.bfloat16)
    ours = load.load_model(tmp_path / "int4", experts_implementation=None)
    fused = "model.layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(dict(model.named_parameters())[fused], dict(ours.named_parameters())[fused])
    assert torch.equal(logits(model), logits(ours))


def test_loader_matches_convert_dequantization_for_each_format(tiny_dirs, tmp_path):
    for fmt in ("fp8", "int4"):
        convert.convert(tiny_dirs[fmt], tmp_path / fmt, "bf16", None)
        want = read_all(tmp_path / fmt)
        got = load.dequantized_state_dict(tiny_dirs[fmt])
        assert set(got) == set(want)
        assert all(torch.equal(got[n], want[n]) for n in want)
