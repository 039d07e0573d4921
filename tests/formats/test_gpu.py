"""--device cuda runs the same pure-torch kernels on a GPU and writes the CPU bytes (skipped without CUDA)."""
import hashlib

import pytest
import torch

from k2quant.formats import convert
from k2quant.quant import scheme as qscheme

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("src,target", [("bf16", "fp8"), ("fp8", "int4"), ("int4", "bf16"), ("bf16", "int4")])
def test_cuda_output_equals_cpu(tiny_dirs, tmp_path, src, target):
    digests = []
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        convert.convert(tiny_dirs[src], out, target, qscheme.for_target(target), device=device, kernel="reference")
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.safetensors")})
    assert digests[0] == digests[1]
