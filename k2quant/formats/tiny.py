"""Tiny Kimi-K2-architecture checkpoints for demos and tests, in any of the three formats.

Same tensor names, dtypes and layout as Kimi-K2 (per-expert names, FP32 router bias), tiny ragged
dims so FP8 edge tiles are partial (``kv_a_proj_with_mqa`` has 160 rows like the real 576), several
shards, and (for FP8) one scale stored in a different shard than its weight.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from k2quant.formats import ct_int4, deepseek_fp8, layout, shards
from k2quant.formats.checkpoint import INDEX
from k2quant.quant import scheme as qscheme
from k2quant.quant.scheme import QuantScheme

TINY_CONFIG: dict = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "kimi_k2",
    "vocab_size": 1024, "hidden_size": 320, "intermediate_size": 416, "moe_intermediate_size": 96,
    "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "q_lora_rank": 192, "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 32,
    "max_position_embeddings": 4096, "rope_theta": 50000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
    "num_nextn_predict_layers": 0, "bos_token_id": 1, "eos_token_id": 2, "use_cache": True,
    "torch_dtype": "bfloat16",
}


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a DeepseekV3/Kimi-K2 checkpoint, in release order, with its shape."""
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for li in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{li}."
        shapes |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_a_proj.weight": (cfg["q_lora_rank"], h),
            p + "self_attn.q_a_layernorm.weight": (cfg["q_lora_rank"],),
            p + "self_attn.q_b_proj.weight": (nh * qk, cfg["q_lora_rank"]),
            p + "self_attn.kv_a_proj_with_mqa.weight": (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], h),
            p + "self_attn.kv_a_layernorm.weight": (cfg["kv_lora_rank"],),
            p + "self_attn.kv_b_proj.weight": (nh * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), cfg["kv_lora_rank"]),
            p + "self_attn.o_proj.weight": (h, nh * cfg["v_head_dim"]),
        }
        if li < cfg["first_k_dense_replace"]:
            mlps = {p + "mlp.": cfg["intermediate_size"]}
        else:
            e = cfg["n_routed_experts"]
            shapes |= {p + "mlp.gate.weight": (e, h), p + "mlp.gate.e_score_correction_bias": (e,)}
            mlps = {f"{p}mlp.experts.{j}.": cfg["moe_intermediate_size"] for j in range(e)}
            mlps[p + "mlp.shared_experts."] = cfg["moe_intermediate_size"] * cfg["n_shared_experts"]
        for q, inter in mlps.items():
            shapes |= {q + "gate_proj.weight": (inter, h), q + "up_proj.weight": (inter, h),
                       q + "down_proj.weight": (h, inter)}
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (cfg["vocab_size"], h)}
    return shapes


def random_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """BF16 weights (FP32 router bias) with a few outliers, deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in tensor_shapes(cfg).items():
        if name.endswith("e_score_correction_bias"):
            out[name] = (torch.randn(shape, generator=g) * 0.01).float()
        elif len(shape) == 1:
            out[name] = (1.0 + 0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        else:
            w = torch.randn(shape, generator=g) * (shape[1] ** -0.5)
            w.view(-1)[torch.randint(0, w.numel(), (max(1, w.numel() // 2000),), generator=g)] *= 8.0  # outliers
            out[name] = w.to(torch.bfloat16)
    return out


def encode(weights: dict[str, torch.Tensor], fmt: str, scheme: QuantScheme | None = None) -> dict[str, torch.Tensor]:
    """The state dict as stored in ``fmt``: bf16 as is; fp8 every Linear; int4 the scheme's targets."""
    if fmt == "bf16":
        return dict(weights)
    scheme = scheme or qscheme.get("fp8-block-128" if fmt == "fp8" else "int4-g32")
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        m = name.removesuffix(".weight")
        if fmt == "fp8" and name.endswith(".weight") and layout.is_linear(m):
            out |= deepseek_fp8.encode(m, w, scheme)
        elif fmt == "int4" and name.endswith(".weight") and layout.is_int4_candidate(m) and scheme.matches(m):
            out |= ct_int4.encode(m, w, scheme)
        else:
            out[name] = w
    return out


def config_for(fmt: str, scheme: QuantScheme | None = None, model_type: str = "kimi_k2", **overrides) -> dict:
    cfg = dict(TINY_CONFIG, model_type=model_type, **overrides)
    if fmt == "fp8":
        cfg["quantization_config"] = deepseek_fp8.quantization_config(scheme or qscheme.get("fp8-block-128"))
    elif fmt == "int4":
        cfg["quantization_config"] = ct_int4.quantization_config(scheme or qscheme.get("int4-g32"))
    return cfg


def write_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], config: dict,
                     num_shards: int = 3, move_scale: bool = True) -> Path:
    """Write ``tensors`` as a sharded checkpoint (layer-contiguous shards) with index and config."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = -(-len(names) // num_shards)
    groups = [names[i * per:(i + 1) * per] for i in range(num_shards)]
    groups = [g for g in groups if g]
    scale = next((n for n in names if n.endswith(".weight_scale_inv") and ".experts." in n), None)
    if move_scale and scale and len(groups) > 1:  # a scale in another shard than its weight, as DeepSeek found
        home = next(g for g in groups if scale in g)
        if home is not groups[-1]:
            home.remove(scale)
            groups[-1].append(scale)
        else:  # already last: move it to the first shard instead
            home.remove(scale)
            groups[0].append(scale)
    fnames = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for fname, group in zip(fnames, groups):
        entries = [shards.Entry(n, shards.TAGS[tensors[n].dtype], tuple(tensors[n].shape)) for n in group]
        w = shards.ShardWriter(path / fname, entries)
        for n in group:
            w.write(n, tensors[n])
        w.commit()
        weight_map |= {n: fname for n in group}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


def build(path: str | Path, fmt: str = "bf16", seed: int = 0, scheme: QuantScheme | None = None,
          num_shards: int = 3, model_type: str = "kimi_k2", **overrides) -> Path:
    """A tiny K2 checkpoint in ``fmt`` ("bf16", "fp8", "int4") at ``path``."""
    cfg = config_for(fmt, scheme, model_type, **overrides)
    return write_checkpoint(path, encode(random_weights(cfg, seed), fmt, scheme), cfg, num_shards)
