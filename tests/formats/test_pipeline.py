"""The conversion pipeline around the kernels: special values refused in one pass, overlapped reads and
writes that give the sequential run's bytes, and failures in the reader or writer thread."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from k2quant.errors import FormatError
from k2quant.formats import convert
from k2quant.formats.checkpoint import INDEX
from k2quant.quant import scheme as qscheme

EXPERT = "model.layers.2.mlp.experts.3.up_proj"


def shard_of(path, name):
    return path / json.loads((path / INDEX).read_text())["weight_map"][name]


def poisoned(tiny_dirs, tmp_path, fmt, fn):
    """A copy of the tiny ``fmt`` checkpoint with the expert's weight rewritten by ``fn``."""
    src = tmp_path / f"src-{fmt}"
    shutil.copytree(tiny_dirs[fmt], src)
    f = shard_of(src, EXPERT + ".weight")
    sd = load_file(str(f))
    sd[EXPERT + ".weight"] = fn(sd[EXPERT + ".weight"].clone())
    save_file(sd, str(f), metadata={"format": "pt"})
    return src, f


def assert_nothing_complete(out):
    assert not (out / INDEX).exists()
    assert not list(out.glob("*.k2q-tmp"))
    assert not list(out.glob("*.safetensors"))


@pytest.mark.parametrize("kernel", ["auto", "reference"])
@pytest.mark.parametrize("target", ["fp8", "int4"])
def test_nan_inf_in_a_float_weight_is_refused_in_every_direction(tiny_dirs, tmp_path, kernel, target):
    def poison(w):  # [96, 320]: one NaN and one Inf, in different tiles and groups, past the first rows
        w[70, 200] = float("nan")
        w[33, 5] = -float("inf")
        return w

    src, f = poisoned(tiny_dirs, tmp_path, "bf16", poison)
    with pytest.raises(FormatError) as e:
        convert.convert(src, tmp_path / "o", target, qscheme.for_target(target), kernel=kernel)
    assert str(e.value) == (f"{f}: weight {EXPERT}.weight holds 2 NaN/Inf values and cannot be quantized; fix the "
                            f"source weights or keep this module unquantized with --ignore {EXPERT}")
    assert_nothing_complete(tmp_path / "o")


@pytest.mark.parametrize("kernel", ["auto", "reference"])
@pytest.mark.parametrize("target", ["bf16", "int4"])
@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_nan_code_in_an_fp8_weight_is_refused_in_every_direction(tiny_dirs, tmp_path, kernel, target, code):
    def poison(q):  # one E4M3 NaN code deep inside the tensor
        q.view(torch.uint8)[90, 250] = code
        return q

    src, f = poisoned(tiny_dirs, tmp_path, "fp8", poison)
    with pytest.raises(FormatError) as e:
        convert.convert(src, tmp_path / "o", target, qscheme.for_target(target), kernel=kernel)
    assert str(e.value) == (f"{f}: FP8 weight '{EXPERT}.weight' holds NaN codes (0x7f/0xff); the checkpoint is "
                            f"corrupt: re-download this shard")
    assert_nothing_complete(tmp_path / "o")
