"""k2quant diff: streaming per-tensor error between checkpoints, checked against errors computed
directly from the stored tensors (read with safetensors, dequantized tile by tile / group by group)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from k2quant.cli.eval import diff_cmd
from k2quant.errors import FormatError
from k2quant.eval import diff
from k2quant.formats import tiny
from k2quant.quant import int4_group
from k2quant.quant import scheme as qscheme


def _raw(path: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor of a checkpoint, read through its index with safetensors."""
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for fname in sorted(set(index.values())):
        with safe_open(str(path / fname), "pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def _fp8_ref(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Block FP8 by an explicit loop over 128x128 tiles (partial edge tiles included)."""
    w = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            tile = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
            w[tile] = q[tile].float() * scale_inv[i, j].float()
    return w.to(torch.bfloat16)


def _int4_ref(raw: dict[str, torch.Tensor], m: str) -> torch.Tensor:
    shape = tuple(raw[m + ".weight_shape"].tolist())
    q = int4_group.unpack(raw[m + ".weight_packed"], shape[1])
    return int4_group.dequantize(q, raw[m + ".weight_scale"], qscheme.get("int4-g32"), torch.bfloat16)


def _dequantized(path: Path) -> dict[str, torch.Tensor]:
    raw = _raw(path)
    out = {}
    for name, t in raw.items():
        m = name.rsplit(".", 1)[0]
        if name.endswith(".weight_packed"):
            out[m + ".weight"] = _int4_ref(raw, m)
        elif name.endswith(".weight") and m + ".weight_scale_inv" in raw:
            out[name] = _fp8_ref(t, raw[m + ".weight_scale_inv"])
        elif not name.endswith((".weight_scale", ".weight_shape", ".weight_scale_inv")):
            out[name] = t
    return out


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_diff_matches_direct_error(tiny_dirs, fmt):
    rep = diff.diff(tiny_dirs["bf16"], tiny_dirs[fmt])
    a, b = _raw(tiny_dirs["bf16"]), _dequantized(tiny_dirs[fmt])
    assert sorted(t.name for t in rep.tensors) == sorted(a) == sorted(b)
    quantized = 0
    for t in rep.tensors:
        x, y = a[t.name].double().numpy(), b[t.name].double().numpy()
        noise, signal = float(((x - y) ** 2).sum()), float((x ** 2).sum())
        assert t.stats.numel == x.size and t.stats.max_abs == float(np.abs(x - y).max())
        assert t.stats.noise == pytest.approx(noise, rel=1e-12, abs=0.0)
        assert t.stats.signal == pytest.approx(signal, rel=1e-12)
        if noise:
            quantized += 1
            assert t.stats.sqnr_db == pytest.approx(10 * math.log10(signal / noise), rel=1e-9)
            assert t.stats.rel_error == pytest.approx(math.sqrt(noise / signal), rel=1e-9)
        else:
            assert t.stats.sqnr_db == math.inf and t.stats.rel_error == 0.0
    # INT4: the 2 MoE layers' 8 routed experts x 3 projections; FP8: every decoder Linear
    assert quantized == {"int4": 48, "fp8": 48 + 6 + 15 + 3}[fmt]


def test_diff_groups_aggregate_tensors(tiny_dirs):
    rep = diff.diff(tiny_dirs["bf16"], tiny_dirs["int4"])
    groups = rep.groups()
    experts = [t for t in rep.tensors if t.layer == 1 and t.tensor_class == "routed_expert"]
    g = groups[(1, "routed_expert")]
    assert len(experts) == 24 and g.numel == sum(t.stats.numel for t in experts)
    assert g.noise == sum(t.stats.noise for t in experts) and g.max_abs == max(t.stats.max_abs for t in experts)
    assert groups[(1, "attention")].sqnr_db == math.inf
    assert set(rep.by_class()) == {"attention", "dense_mlp", "embedding", "lm_head", "norm", "routed_expert",
                                   "router", "router_bias", "shared_expert"}


def test_self_diff_is_lossless_cli(tiny_dirs, tmp_path):
    res = CliRunner().invoke(diff_cmd, [str(tiny_dirs["fp8"]), str(tiny_dirs["fp8"]), "--json",
                                        str(tmp_path / "d.json"), "--plot", str(tmp_path / "p" / "layers.png")],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    dump = json.loads((tmp_path / "d.json").read_text())
    assert len(dump["tensors"]) == 91
    assert all(t["sqnr_db"] == "inf" and t["rel_error"] == 0.0 and t["max_abs_error"] == 0.0 for t in dump["tensors"])
    assert dump["total"]["sqnr_db"] == "inf"
    assert (tmp_path / "p" / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "91 tensors in" in res.output and "∞" in res.output


def test_diff_cli_table(tiny_dirs):
    res = CliRunner().invoke(diff_cmd, [str(tiny_dirs["bf16"]), str(tiny_dirs["int4"])], env={"COLUMNS": "200"})
    rep = diff.diff(tiny_dirs["bf16"], tiny_dirs["int4"])
    assert res.exit_code == 0, res.output
    assert f"{rep.by_class()['routed_expert'].sqnr_db:.2f}" in res.output
    assert f"{rep.groups()[(2, 'routed_expert')].sqnr_db:.2f}" in res.output


def test_diff_rejects_other_model(tiny_dirs, tmp_path):
    other = tiny.build(tmp_path / "two-layers", "bf16", num_hidden_layers=2)
    with pytest.raises(FormatError, match=r"two-layers: has no tensor 'model\.layers\.2\..*' \(present in .*\); "
                                          r"diff needs two checkpoints of the same model"):
        diff.diff(tiny_dirs["bf16"], other)
    wide = tiny.build(tmp_path / "wide", "bf16", vocab_size=512)
    with pytest.raises(FormatError, match=r"model\.embed_tokens\.weight: shape \[1024, 320\] in .* but \[512, 320\]"):
        diff.diff(tiny_dirs["bf16"], wide)


def test_plot_series(tiny_dirs, tmp_path):
    from k2quant.eval import plot

    rep = diff.diff(tiny_dirs["bf16"], tiny_dirs["int4"])
    series, identical = plot.layer_series(rep)
    assert identical == ["attention", "dense_mlp", "norm", "router", "router_bias", "shared_expert"]
    groups = rep.groups()
    assert series == {"routed_expert": [(li, groups[(li, "routed_expert")].sqnr_db, groups[(li, "routed_expert")].rel_error)
                                        for li in (1, 2)]}
    assert plot.plot_layers(rep, tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"
