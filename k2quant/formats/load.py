"""k2quant's own dequant-on-load loader: any of the three formats into transformers' DeepseekV3.

transformers 5.23 mis-loads block FP8 with partial edge tiles on CPU (576-row ``kv_a_proj_with_mqa``
fails, 192 rows load silently wrong), so weights are dequantized here with the convert path's own
kernels and handed to ``from_pretrained`` as a state dict with Kimi's per-expert names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from k2quant.errors import K2QuantError
from k2quant.formats import convert, plan
from k2quant.formats.checkpoint import Checkpoint
from k2quant.formats.shards import DTYPES

#: model_type values that load as transformers' DeepseekV3 (Kimi's configs say kimi_k2)
DEEPSEEK_V3_ALIASES = ("kimi_k2", "deepseek_v3")


def iter_dequantized(path: str | Path, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of the BF16 form of the checkpoint, one module at a time."""
    ckpt = Checkpoint(path)
    p = plan.make_plan(ckpt, "bf16", None, max_shard_size=1 << 62)
    for item in p.items:
        yield from convert.run_item(item, p.source_format, None, device).items()


def stored_dtypes(path: str | Path) -> dict[str, torch.dtype]:
    """``{name: dtype}`` of every tensor of the checkpoint's BF16 form (quantized weights as BF16), from the
    headers alone. transformers may hold some of them wider in memory (5.24 keeps DeepSeek-V3's router,
    ``mlp.gate.weight``, in fp32 whatever dtype the model loads in); this is what they are on disk."""
    p = plan.make_plan(Checkpoint(path), "bf16", None, max_shard_size=1 << 62)
    return {e.name: DTYPES[e.dtype] for item in p.items for e in item.entries}


def dequantized_state_dict(path: str | Path, out_dtype: torch.dtype | None = None,
                           device: str = "cpu") -> dict[str, torch.Tensor]:
    """The whole BF16 form of a checkpoint (quantized weights dequantized exactly as convert does)."""
    sd = {}
    for name, t in iter_dequantized(path, device):
        sd[name] = t.to(out_dtype) if out_dtype is not None and t.is_floating_point() and t.dim() > 1 else t
    return sd


def hf_config(path_or_config: str | Path | dict):
    """A ``DeepseekV3Config`` from a checkpoint dir or config dict; ``kimi_k2`` maps to ``deepseek_v3``."""
    from transformers import DeepseekV3Config

    if isinstance(path_or_config, dict):
        cfg = dict(path_or_config)
    else:
        cfg = dict(Checkpoint(path_or_config).config)
    for key in ("quantization_config", "compression_config", "auto_map", "architectures", "model_type"):
        cfg.pop(key, None)
    return DeepseekV3Config(**cfg)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tiktoken.model")


def missing_tokenizer(path: str | Path, fix: str = "") -> str | None:
    """The message for a checkpoint directory without tokenizer files (None when it has one)."""
    if any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        return None
    return (f"{path}: no tokenizer (expected one of {list(TOKENIZER_FILES)}); copy the model's tokenizer files "
            f"into the checkpoint directory{' ' + fix if fix else ''}")


def load_tokenizer(path: str | Path, fix: str = ""):
    """The tokenizer in checkpoint directory ``path`` (transformers' AutoTokenizer, no remote code).
    ``fix``: what else the user may do, appended to the message when there is none."""
    from transformers import AutoTokenizer

    path = Path(path)
    if (problem := missing_tokenizer(path, fix)) is not None:
        raise K2QuantError(problem)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise K2QuantError(f"{path}: no loadable tokenizer ({str(exc).splitlines()[0][:200]}); copy the model's "
                           f"tokenizer files into the checkpoint directory{' ' + fix if fix else ''}") from None


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
               experts_implementation: str | None = "eager"):
    """transformers ``DeepseekV3ForCausalLM`` holding the checkpoint's (dequantized) weights."""
    from transformers import DeepseekV3ForCausalLM

    config = hf_config(path)
    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    sd = dequantized_state_dict(path)
    model = DeepseekV3ForCausalLM.from_pretrained(None, config=config, state_dict=sd, dtype=dtype, **kwargs)
    return model.to(device).eval()
