"""k2quant's dequant-on-load loader (what ``eval --backend hf`` runs) against the convert path."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from k2quant.formats import convert, load


def _converted(src, dst) -> dict[str, torch.Tensor]:
    """The checkpoint's BF16 form written by ``convert`` and read back with safetensors."""
    convert.convert(src, dst, "bf16", None)
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index.values())):
        out |= load_file(str(dst / fname))
    return out


def _fuse_experts(sd: dict[str, torch.Tensor], num_layers: int, num_experts: int) -> dict[str, torch.Tensor]:
    """Per-expert Kimi names -> transformers' fused ``gate_up_proj`` [E, 2I, H] (gate rows first) and
    ``down_proj`` [E, H, I]."""
    out = dict(sd)
    for li in range(num_layers):
        p = f"model.layers.{li}.mlp.experts."
        if p + "0.gate_proj.weight" not in sd:
            continue
        gate_up = [torch.cat([out.pop(f"{p}{e}.gate_proj.weight"), out.pop(f"{p}{e}.up_proj.weight")])
                   for e in range(num_experts)]
        out[p + "gate_up_proj"] = torch.stack(gate_up)
        out[p + "down_proj"] = torch.stack([out.pop(f"{p}{e}.down_proj.weight") for e in range(num_experts)])
    return out


def _transformers_dtypes(bf16_dir) -> dict[str, torch.dtype]:
    """The dtype transformers' own ``from_pretrained`` gives each tensor of a BF16 checkpoint loaded in bf16
    (5.24+ keeps DeepSeek-V3's router in fp32; 5.23 did not)."""
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(str(bf16_dir), config=load.hf_config(bf16_dir),
                                                  dtype=torch.bfloat16)
    return {k: v.dtype for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int4"])
def test_loader_equals_convert_dequantization(tiny_dirs, tmp_path, fmt):
    want = _fuse_experts(_converted(tiny_dirs[fmt], tmp_path / "bf16"), 3, 8)
    dtypes = _transformers_dtypes(tmp_path / "bf16")
    model = load.load_model(tiny_dirs[fmt], dtype=torch.bfloat16)
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == dtypes[name], name  # in memory: what transformers itself gives
        assert torch.equal(got[name], t.to(got[name].dtype)), name  # bit-exact values
        assert torch.equal(got[name].to(t.dtype), t), name  # a wider dtype in memory holds the disk value exactly


def test_stored_dtypes_are_the_disk_dtypes(tiny_dirs, tmp_path):
    """``stored_dtypes`` (headers only) names the dtype each tensor has in the BF16 form on disk."""
    conv = _converted(tiny_dirs["fp8"], tmp_path / "bf16")
    assert load.stored_dtypes(tiny_dirs["fp8"]) == {k: v.dtype for k, v in conv.items()}
    assert conv["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16  # the router stays BF16 on disk


def test_kimi_k2_model_type_loads_as_deepseek_v3(tiny_dirs):
    cfg = json.loads((tiny_dirs["int4"] / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k2"
    model = load.load_model(tiny_dirs["int4"], dtype=torch.float32)
    assert type(model).__name__ == "DeepseekV3ForCausalLM" and model.config.model_type == "deepseek_v3"
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float32  # not left in bf16
    logits = model(input_ids=torch.tensor([[1, 5, 9, 700]])).logits
    assert logits.shape == (1, 4, 1024) and logits.dtype == torch.float32
