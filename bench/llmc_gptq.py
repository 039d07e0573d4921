"""llm-compressor's GPTQ on SmolLM2 with the calibration tokens bench/gptq_smollm2.py chose (the comparison).

Runs in its own venv (llm-compressor pins its own transformers), never in k2quant's:

    python3 -m venv /work/bench-venvs/llmc
    /work/bench-venvs/llmc/bin/pip install torch==2.13.0
    /work/bench-venvs/llmc/bin/pip install -c <(echo torch==2.13.0) llmcompressor==0.14.0.1
    /work/bench-venvs/llmc/bin/python bench/llmc_gptq.py SRC OUT/calib_ids.safetensors OUT/llmc

W4A16 symmetric INT4, group 32, every Linear but lm_head, llm-compressor's default GPTQ settings (its own
activation ordering, dampening, block size). Writes the fake-quantized (dequantized) weights as one BF16
safetensors file, and the wall time of ``oneshot`` into ``time.json``.
"""
import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("ids")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    ids = load_file(a.ids)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(a.src, dtype=torch.bfloat16)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recipe = GPTQModifier(
        ignore=["lm_head"],
        config_groups={"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1])
    seconds = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "time.json").write_text(json.dumps({"seconds": seconds, "threads": a.threads}))
    sd = {}
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and hasattr(mod, "weight_scale"):
            args = mod.quantization_scheme.weights
            w = fake_quantize(mod.weight.float(), mod.weight_scale.float(), getattr(mod, "weight_zero_point", None),
                              args)
            sd[f"{name}.weight"] = w.to(torch.bfloat16).contiguous()
    save_file(sd, str(out / "weights.safetensors"))
    print(f"llm-compressor GPTQ: {seconds:.1f} s, {len(sd)} modules")


if __name__ == "__main__":
    main()
