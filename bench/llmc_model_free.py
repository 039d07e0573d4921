"""llm-compressor's ``model_free_ptq`` on a bench fixture: the end-to-end comparison for ``convert --to int4``.

Runs in its own venv (llm-compressor pins its own transformers and compressed-tensors; see bench/README.md):

    /work/bench-venvs/llmc/bin/python bench/llmc_model_free.py bench/out/fixture/fp8 /tmp/llmc-out --threads 2

The scheme is k2quant's ``convert --to int4`` default: symmetric INT4, group 32, on the routed experts only
(Kimi-K2-Thinking's ignore list); an FP8 source goes through llm-compressor's FP8 block dequantizer
converter first. Prints one JSON line: the ``model_free_ptq`` call's seconds and the process's so far.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time

T0 = time.perf_counter()

KIMI_INT4_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="model_free_ptq max_workers")
    a = ap.parse_args()

    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import model_free_ptq

    torch.set_num_threads(a.threads)
    cfg = json.load(open(f"{a.src}/config.json"))
    converter = None
    if cfg.get("quantization_config", {}).get("quant_method") == "fp8":
        from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer

        index = json.load(open(f"{a.src}/model.safetensors.index.json"))["weight_map"]
        fp8 = sorted(n[: -len(".weight_scale_inv")] for n in index if n.endswith(".weight_scale_inv"))
        converter = FP8BlockDequantizer(targets=fp8, weight_block_size=[128, 128])  # every FP8 weight
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=32))
    shutil.rmtree(a.dst, ignore_errors=True)
    t = time.perf_counter()
    model_free_ptq(a.src, a.dst, scheme=scheme, ignore=KIMI_INT4_IGNORE, max_workers=a.workers, device="cpu",
                   converter=converter)
    now = time.perf_counter()
    print(json.dumps({"model_free_ptq_s": now - t, "process_s_so_far": now - T0}))


if __name__ == "__main__":
    main()
