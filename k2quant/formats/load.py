"""k2quant's own dequant-on-load loader: any of the three formats into the checkpoint's own transformers class.

The class comes from ``config.json`` (``AutoModelForCausalLM``'s mapping, no remote code; ``kimi_k2`` loads as
DeepSeek-V3). transformers 5.23 mis-loads block FP8 with partial edge tiles on CPU (576-row
``kv_a_proj_with_mqa`` fails, 192 rows load silently wrong; SmolLM2's 576-wide layers are refused), so weights
are dequantized here with the convert path's own kernels and handed to ``from_pretrained`` as a state dict
under the names on disk (Kimi's per-expert names included). Before anything is allocated, the model the config
describes is checked against the tensors on disk and against free memory.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch

from k2quant.errors import FormatError, K2QuantError
from k2quant.formats import arch, items, plan
from k2quant.formats.checkpoint import Checkpoint
from k2quant.formats.shards import DTYPES

#: memory a load needs besides the model itself: the dequantized state dict handed to from_pretrained
STATE_DICT_COPIES = 1


def iter_dequantized(path: str | Path, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of the BF16 form of the checkpoint, one module at a time."""
    ckpt = Checkpoint(path)
    p = plan.make_plan(ckpt, "bf16", None, max_shard_size=1 << 62)
    for item in p.items:
        yield from items.run_item(item, p.source_format, None, device).items()


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
    """The transformers config of a checkpoint dir or config dict (``kimi_k2`` as ``deepseek_v3``; no remote code)."""
    cfg = path_or_config if isinstance(path_or_config, dict) else Checkpoint(path_or_config).config
    return arch.hf_config(cfg)


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (``MemAvailable``), or 0 when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_fits(path: str | Path, dtype: torch.dtype = torch.bfloat16, available: int | None = None) -> int:
    """Refuse a load before allocating: the config's model must hold exactly the parameters on disk, and fit.

    Returns the parameter count. ``available`` defaults to ``MemAvailable``."""
    ckpt = Checkpoint(path)
    a = arch.from_config(ckpt.config)
    p = plan.make_plan(ckpt, "bf16", None, max_shard_size=1 << 62)
    on_disk = sum(math.prod(e.shape) for it in p.items for e in it.entries if not a.past_last_layer(e.name))
    if a.num_params + a.num_buffer_values != on_disk:
        raise FormatError(f"{ckpt.path}/config.json describes a {a.model_class} with {a.num_params:,} parameters "
                          f"(and {a.num_buffer_values:,} saved buffer values), but the weights on disk hold {on_disk:,} "
                          f"values; the config does not belong to these weights (or names another architecture): "
                          f"fix config.json before loading")
    need = a.num_params * dtype.itemsize + STATE_DICT_COPIES * p.dst_bytes
    available = available_memory() if available is None else available
    if available and need > available:
        raise FormatError(f"{ckpt.path}: loading {a.model_class} ({a.num_params:,} parameters) in {dtype} needs about "
                          f"{need / 1e9:.1f} GB ({dtype.itemsize} B per parameter plus the dequantized weights), but "
                          f"only {available / 1e9:.1f} GB are free: use a machine with more memory, or the vllm backend")
    return a.num_params


def model_class(config):
    """The transformers causal-LM class of a config (``AutoModelForCausalLM``'s own mapping)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError as exc:
        raise FormatError(f"transformers has no causal-LM class for {type(config).__name__}; k2quant runs no "
                          f"remote code") from exc


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
    """The checkpoint's own transformers causal-LM class holding its (dequantized) weights."""
    config = hf_config(path)
    check_fits(path, dtype)
    cls = model_class(config)
    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    sd = dequantized_state_dict(path)
    model, info = cls.from_pretrained(None, config=config, state_dict=sd, dtype=dtype, output_loading_info=True,
                                      **kwargs)
    missing = [k for k in info.get("missing_keys", ()) if k not in tied_names(model)]
    if missing or info.get("mismatched_keys"):
        raise FormatError(f"{path}: {cls.__name__} expects tensors the checkpoint does not hold: missing "
                          f"{sorted(missing)[:5]}, mismatched {list(info.get('mismatched_keys') or [])[:5]}; the "
                          f"weights would be random: check that config.json belongs to these weights")
    return model.to(device).eval()


def tied_names(model) -> set[str]:
    """Parameter names that share storage with another (tied embeddings): absent on disk by design."""
    out = set()
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight:
        out.add(next(n for n, m in model.named_modules() if m is out_emb) + ".weight")
    return out
