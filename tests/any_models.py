"""Tiny checkpoints of other families, built here with transformers itself (random weights, seeded)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers import words_text

#: a Qwen3-MoE with every dim a multiple of the INT4 group (32) and FP8 tiles partial (< 128)
QWEN3_MOE = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                 vocab_size=1024, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=2)
#: a Mixtral: on disk its experts are ``block_sparse_moe.experts.E.w1/w2/w3``, in memory ``mlp.experts``
MIXTRAL = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               num_local_experts=4, num_experts_per_tok=2, vocab_size=1024, initializer_range=0.1, bos_token_id=1,
               eos_token_id=2, pad_token_id=2)
#: a Llama (SmolLM2's family) with tied embeddings and no experts
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=1024, tie_word_embeddings=True, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
             pad_token_id=2)


def build(path: Path, family: str, seed: int = 0, tokenizer: bool = True) -> Path:
    """``save_pretrained`` of a tiny ``family`` ("qwen3_moe", "llama") model in BF16, with a 1024-token BPE."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen3MoeConfig

    from k2quant.eval import data

    cfg = {"qwen3_moe": lambda: Qwen3MoeConfig(**QWEN3_MOE), "llama": lambda: LlamaConfig(**LLAMA),
           "mixtral": lambda: MixtralConfig(**MIXTRAL)}[family]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(str(path))
    if tokenizer:
        data.train_tokenizer([words_text(9, 3000)], 1024, path)
    return path


def saved_names(path: Path) -> list[str]:
    """Tensor names as transformers wrote them (the safetensors index or the single file's header)."""
    idx = path / "model.safetensors.index.json"
    if idx.is_file():
        return sorted(json.loads(idx.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sorted(f.keys())
