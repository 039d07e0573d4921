"""Capacity planning: will this checkpoint, in this format, serve this context on these GPUs?

Every number is an integer count of bytes derived from the tensor list, never a fitted constant:

- **Weights** come from the real shard headers through ``formats.plan.make_plan`` when a checkpoint
  directory with shards is given (so they equal ``inspect``'s sizes to the byte), else from
  ``config.json`` through ``tiny.tensor_shapes`` and each format's ``entries`` (the same entry
  functions the converter writes with). FP8 scales (``weight_scale_inv``) and INT4 scales and
  shapes (``weight_scale``, ``weight_shape``) are included and also reported separately.
- **KV cache**: MLA caches the compressed latent, ``kv_lora_rank + qk_rope_head_dim`` values per
  layer per token (576 for Kimi K2), not per-head keys and values.
- **Reserve**: a stated fraction of each GPU's memory for activations and workspace.

Placement on a ``tp × ep`` mesh (``ep`` groups of ``tp`` GPUs), as vLLM and SGLang place
DeepseekV3-architecture models:

- routed experts: whole experts spread over all ``tp × ep`` GPUs; the fullest GPU holds
  ``ceil(E / GPUs)`` experts of each MoE layer. (Without expert parallelism vLLM instead splits
  every expert's intermediate dim over TP: the same bytes whenever ``E`` divides evenly.)
- attention ``q_b_proj``/``kv_b_proj``/``o_proj``, the dense MLP and shared experts: split over the
  ``tp`` GPUs of a group (column/row parallel), replicated across the ``ep`` groups;
  ``embed_tokens`` and ``lm_head``: vocab-parallel over ``tp``.
- ``q_a_proj`` and ``kv_a_proj_with_mqa``: replicated on every GPU (vLLM builds them as
  ``ReplicatedLinear``: their low-rank outputs are needed whole on every rank); norms and the
  router weight and bias: replicated.
- MTP layers (layer index >= ``num_hidden_layers``): counted in the checkpoint size, not loaded
  (engines load them only for speculative decoding).
- KV cache: the latent is a single "KV head", so TP cannot split it; vLLM keeps the whole latent
  for every token on every TP rank (decode context parallel, ``dcp``, splits the tokens over
  ``dcp`` ranks instead). Each of the ``ep`` groups is a data-parallel attention replica that
  serves ``ceil(batch / ep)`` of the requests.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

from k2quant.errors import FormatError, K2QuantError, SchemeError, collect
from k2quant.formats import bf16, ct_int4, deepseek_fp8, layout, shards, tiny
from k2quant.formats import plan as fplan
from k2quant.formats.checkpoint import CONFIG, INDEX, Checkpoint
from k2quant.formats.shards import Entry
from k2quant.quant.scheme import QuantScheme

MIB = 2**20
GIB = 2**30
#: Default reserve: the 10 % of each GPU that vLLM leaves outside its weight + KV pool at its default
#: ``--gpu-memory-utilization 0.9`` (CUDA context, NCCL / cuBLAS workspaces, CUDA graphs, activations).
DEFAULT_RESERVE = 0.10
KV_DTYPES: dict[str, int] = {"bf16": 2, "fp8": 1}  # bytes per cached value
TP, EXPERT, REPLICATED, NOT_LOADED = "tp", "expert", "replicated", "not_loaded"
#: placement of each ``layout.tensor_class``; anything unknown is assumed replicated (the safe side)
PLACEMENT: dict[str, str] = {
    "routed_expert": EXPERT, "attention": TP, "dense_mlp": TP, "shared_expert": TP,
    "embedding": TP, "lm_head": TP, "norm": REPLICATED, "router": REPLICATED,
    "router_bias": REPLICATED, "mtp": NOT_LOADED,
}
_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")
_REPLICATED_ATTN = re.compile(r"\.self_attn\.(?:q_a_proj|kv_a_proj_with_mqa)\.")
_SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".weight_shape")
REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
                 "moe_intermediate_size", "first_k_dense_replace", "n_routed_experts", "n_shared_experts",
                 "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One GPU model: ``mem_bytes`` is the total the driver reports (what engines budget against)."""

    name: str
    mem_bytes: int
    label: str = ""  # as sold, e.g. "141GB"
    source: str = ""  # where mem_bytes comes from


#: Driver-reported totals (nvidia-smi ``memory.total``, rocm-smi ``VRAM Total Memory``), not the
#: label it is sold under: the labels mix units (H200 "141GB" is 140.4 GiB = 150.8 GB; B200
#: "192GB" is 192.3 GB = 179.1 GiB; MI300X "192GB" is 191.7 GiB = 205.8 GB).
GPUS: dict[str, Gpu] = {g.name: g for g in (
    Gpu("A100-40GB", 40960 * MIB, "40GB", "nvidia-smi 40960MiB"),
    Gpu("A100", 81920 * MIB, "80GB", "nvidia-smi 81920MiB"),
    Gpu("H100", 81559 * MIB, "80GB", "nvidia-smi 81559MiB"),
    Gpu("H800", 81559 * MIB, "80GB", "nvidia-smi 81559MiB"),
    Gpu("H20", 97871 * MIB, "96GB", "nvidia-smi 97871MiB"),
    Gpu("H200", 143771 * MIB, "141GB", "nvidia-smi 143771MiB"),
    Gpu("B200", 183359 * MIB, "192GB", "nvidia-smi 183359MiB"),
    Gpu("MI300X", 205822885888, "192GB", "rocm-smi 205822885888 B"),
)}
_ALIASES = {"A10080GB": "A100", "A10040GB": "A100-40GB", "H10080GB": "H100", "H80080GB": "H800",
            "H2096GB": "H20", "H200141GB": "H200", "B200192GB": "B200", "MI300X192GB": "MI300X"}
_UNITS = {"gb": 10**9, "gib": GIB, "mb": 10**6, "mib": MIB, "tb": 10**12, "tib": 2**40}


@dataclasses.dataclass(frozen=True)
class Cluster:
    """``count`` GPUs of one kind as ``ep`` groups of ``tp`` (``tp * ep == count``); ``dcp`` divides ``tp``."""

    gpu: Gpu
    count: int
    tp: int
    ep: int = 1
    dcp: int = 1


@dataclasses.dataclass(frozen=True)
class FormatPlan:
    """One format's bytes per GPU (all sizes in bytes) and whether they fit."""

    format: str
    weight_bytes: int  # whole checkpoint, tensor bytes; equals inspect's size for this format
    scale_bytes: int  # of which FP8 / INT4 scales and INT4 shapes
    weight_bytes_per_gpu: int  # on the fullest GPU
    kv_bytes_per_gpu: int  # requested context x batch
    reserve_bytes: int
    total_bytes_per_gpu: int  # weights + KV + reserve
    headroom_bytes: int  # GPU memory minus total (negative: does not fit)
    fits: bool
    max_context: int  # largest context (tokens) that fits at the requested batch; 0 if none
    max_batch: int  # largest batch that fits at the requested context; 0 if none


@dataclasses.dataclass(frozen=True)
class CapacityReport:
    """The plan for every requested format on one cluster, context and batch."""

    source: str
    sizes_from: str  # "headers" (real shards) or "config" (config.json only)
    params: int  # weight elements of the BF16 checkpoint
    num_hidden_layers: int
    kv_values_per_token_per_layer: int  # kv_lora_rank + qk_rope_head_dim
    kv_dtype: str
    kv_bytes_per_token: int  # one replica, all layers
    cluster: Cluster
    context: int
    batch: int
    reserve: float  # fraction of each GPU's memory
    formats: tuple[FormatPlan, ...]
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        """Plain JSON-ready dict (sizes in bytes), like ``InspectReport.to_json``."""
        return dataclasses.asdict(self)


# -- parsing user input ------------------------------------------------------------------------
def find_gpu(name: str) -> Gpu:
    """A known GPU by name, case- and punctuation-insensitive (``h200``, ``A100-80GB``)."""
    key = re.sub(r"[\s_-]", "", name).upper()
    key = _ALIASES.get(key, key)
    for canon, gpu in GPUS.items():
        if re.sub(r"[\s_-]", "", canon).upper() == key:
            return gpu
    raise K2QuantError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}. "
                       f"For another GPU give its memory with --gpu-mem (e.g. --gpu-mem 96GiB)")


def parse_bytes(text: str) -> int:
    """``"141GiB"`` -> bytes; the unit is required (GB = 10**9, GiB = 2**30)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise K2QuantError(f"--gpu-mem {text!r}: expected a positive size with a unit, e.g. 141GiB "
                           f"(2**30 bytes) or 150GB (10**9 bytes); units: GB, GiB, MB, MiB, TB, TiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


MAX_GPUS = 1 << 20


def parse_gpus(spec: str, gpu_mem: str | None = None) -> tuple[int, Gpu]:
    """``"8xH200"`` -> ``(8, H200)``; ``--gpu-mem`` overrides the memory (``"8"`` alone needs it)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x×*]\s*([A-Za-z0-9][\w.-]*))?\s*", spec)
    if not m or int(m.group(1)) < 1:
        raise K2QuantError(f"--gpus {spec!r}: expected COUNTxNAME, e.g. 8xH200 or 16xH100 "
                           f"(or a count with --gpu-mem, e.g. --gpus 8 --gpu-mem 96GiB)")
    count, name = int(m.group(1)), m.group(2)
    if count > MAX_GPUS:
        raise K2QuantError(f"--gpus {spec!r}: {count} GPUs is more than the {MAX_GPUS:,} k2quant plans for; "
                           f"give the GPU count of one serving instance, e.g. 8xH200")
    if gpu_mem is not None:
        mem = parse_bytes(gpu_mem)
        return count, Gpu(name or "custom", mem, gpu_mem, "--gpu-mem")
    if name is None:
        raise K2QuantError(f"--gpus {spec!r} names no GPU; write COUNTxNAME (e.g. 8xH200) or add --gpu-mem")
    return count, find_gpu(name)


def parse_tokens(text: str | int) -> int:
    """``"256k"`` -> 262144 tokens (k = 1024, m = 1024**2, as model cards count context)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", str(text))
    if not m or int(m.group(1)) < 1:
        raise K2QuantError(f"--context {text!r}: expected a positive token count such as 131072, 128k or 1m "
                           f"(k = 1024 tokens)")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]


def make_cluster(count: int, gpu: Gpu, tp: int | None = None, ep: int | None = None, dcp: int = 1) -> Cluster:
    """Fill in ``tp``/``ep`` (default: TP over all GPUs) and check ``tp * ep == count``, ``tp % dcp == 0``."""
    if ep is None:
        ep = count // tp if tp and count % tp == 0 else 1
    if tp is None:
        tp = count // ep if count % ep == 0 else count
    problems = []
    if min(tp, ep, dcp) < 1:
        problems.append(f"--tp {tp}, --ep {ep}, --dcp {dcp}: each must be at least 1")
    elif tp * ep != count:
        problems.append(f"--tp {tp} x --ep {ep} = {tp * ep} GPUs but --gpus says {count}; "
                        f"choose --tp and --ep whose product is {count}")
    elif tp % dcp:
        problems.append(f"--dcp {dcp} must divide --tp {tp} (decode context parallel splits each TP group)")
    collect(problems, K2QuantError)
    return Cluster(gpu, count, tp, ep, dcp)


# -- reading the model -------------------------------------------------------------------------
def open_source(path: str | Path) -> tuple[dict, Checkpoint | None, Path]:
    """``(config, checkpoint or None, config file)``: headers are used when the directory has shards."""
    p = Path(path)
    if p.is_dir():
        cfg_file = p / CONFIG
        if not cfg_file.is_file():
            raise FormatError(f"{p}: no {CONFIG}; pass a checkpoint directory that holds {CONFIG}, "
                              f"or the {CONFIG} file itself")
        if (p / INDEX).exists() or any(p.glob("*.safetensors")):
            ckpt = Checkpoint(p)
            return ckpt.config, ckpt, cfg_file
        return _read_json(cfg_file), None, cfg_file
    if p.is_file():
        return _read_json(p), None, p
    raise FormatError(f"{p}: no such file or directory; pass a checkpoint directory or its {CONFIG}")


def _read_json(p: Path) -> dict:
    try:
        cfg = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{p}: not valid JSON ({exc}); pass the model's {CONFIG}") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{p}: expected a JSON object (a model {CONFIG}), found {type(cfg).__name__}")
    return cfg


def model_config(cfg: dict, where: Path) -> dict:
    """The text model's config (``text_config`` for multimodal K2.5), checked for every MLA/MoE dim."""
    if "kv_lora_rank" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    missing = [k for k in REQUIRED_KEYS if not isinstance(cfg.get(k), int)]
    if missing:
        raise FormatError(f"{where}: missing or non-integer {missing}; k2quant plan needs a DeepseekV3/Kimi-K2 "
                          f"(MLA + MoE) config with all of {list(REQUIRED_KEYS)}")
    return cfg


def config_entries(cfg: dict, target: str) -> list[Entry]:
    """Every tensor a ``target`` checkpoint holds, from the config alone (no MTP layers).

    Plain tensors are BF16, the router bias FP32, as Kimi-K2 / DeepSeek-V3 ship them; FP8 covers
    every ``layout.is_linear`` module, INT4 the default scheme's targets (routed experts).
    """
    scheme = fplan.target_scheme(target)
    reps: dict[str, str] = {}  # one decision per name up to its expert index (Kimi K2: 69k tensors)
    out: list[Entry] = []
    ragged: list[tuple[str, int]] = []
    for name, shape in tiny.tensor_shapes(cfg).items():
        m = name.removesuffix(".weight")
        key = _EXPERT_INDEX.sub(".experts.0.", name)
        rep = reps.get(key) or reps.setdefault(key, _config_rep(name, target, scheme))
        if rep == "fp8":
            out += deepseek_fp8.entries(m, shape, scheme)
        elif rep == "int4":
            ragged += [(name, shape[1])] if shape[1] % scheme.group_size else []
            out += ct_int4.entries(m, shape, scheme)
        else:
            out += bf16.entries(m, shape, rep) if name.endswith(".weight") else [Entry(name, rep, shape)]
    if ragged:
        more = f" (and {len(ragged) - 1} more like it)" if len(ragged) > 1 else ""
        raise SchemeError(f"{ragged[0][0]}{more} has input dim {ragged[0][1]}, not divisible by the INT4 group "
                          f"size {scheme.group_size}; this model cannot be planned in int4-g{scheme.group_size}")
    return out


def _config_rep(name: str, target: str, scheme: QuantScheme | None) -> str:
    """``fp8``/``int4`` for a quantized module, else the dtype tag the plain tensor is stored in."""
    m = name.removesuffix(".weight")
    if name.endswith(".weight") and target == "fp8" and layout.is_linear(m):
        return "fp8"
    if name.endswith(".weight") and target == "int4" and layout.is_int4_candidate(m) and scheme.matches(m):
        return "int4"
    return "F32" if name.endswith("e_score_correction_bias") else "BF16"


def header_entries(ckpt: Checkpoint, target: str) -> list[Entry]:
    """Every tensor a ``target`` conversion of ``ckpt`` writes: exactly what ``inspect`` sums."""
    p = fplan.make_plan(ckpt, target, fplan.target_scheme(target))
    return [e for it in p.items for e in it.entries]


# -- bytes ---------------------------------------------------------------------------------------
def placement(name: str, num_hidden_layers: int) -> str:
    """Where a tensor lives on the mesh: ``tp``, ``expert``, ``replicated`` or ``not_loaded``."""
    cls = layout.tensor_class(name, num_hidden_layers)
    if cls == "attention" and _REPLICATED_ATTN.search(name):
        return REPLICATED
    return PLACEMENT.get(cls, REPLICATED)


@dataclasses.dataclass(frozen=True)
class WeightBytes:
    """A checkpoint's tensor bytes: ``total``, of which ``scales``, and per placement."""

    total: int
    scales: int
    by_place: dict[str, int]  # keys tp, expert, replicated, not_loaded


def weight_bytes(entries: list[Entry], num_hidden_layers: int) -> WeightBytes:
    """Sum ``entries`` (bytes = itemsize x numel, as ``Entry.nbytes``) by placement and scale-ness."""
    itemsizes: dict[str, int] = {}
    places: dict[str, str] = {}  # placement per name up to its expert index
    by_place = dict.fromkeys((TP, EXPERT, REPLICATED, NOT_LOADED), 0)
    scales = 0
    for e in entries:
        size = itemsizes.get(e.dtype) or itemsizes.setdefault(e.dtype, shards.itemsize(e.dtype))
        n = size * math.prod(e.shape)
        key = _EXPERT_INDEX.sub(".experts.0.", e.name)
        by_place[places.get(key) or places.setdefault(key, placement(e.name, num_hidden_layers))] += n
        scales += n if e.name.endswith(_SCALE_SUFFIXES) else 0
    return WeightBytes(sum(by_place.values()), scales, by_place)


def weights_per_gpu(by_place: dict[str, int], cluster: Cluster, num_experts: int) -> int:
    """Weight bytes on the fullest GPU: replicated + TP share + ``ceil(E / GPUs)`` experts per MoE layer."""
    experts_here = -(-num_experts // cluster.count)
    expert_share = -(-by_place[EXPERT] * experts_here // num_experts)  # exact: every expert has the same bytes
    return by_place[REPLICATED] + -(-by_place[TP] // cluster.tp) + expert_share


def kv_bytes_per_token(cfg: dict, kv_dtype: str) -> int:
    """MLA latent cache for one token, all layers: ``layers * (kv_lora_rank + qk_rope_head_dim) * bytes``."""
    if kv_dtype not in KV_DTYPES:
        raise K2QuantError(f"--kv-dtype {kv_dtype!r}: expected one of {list(KV_DTYPES)}")
    return cfg["num_hidden_layers"] * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * KV_DTYPES[kv_dtype]


def kv_bytes_per_gpu(per_token: int, context: int, batch: int, cluster: Cluster) -> int:
    """KV bytes on one GPU: every TP rank holds its group's whole latent (``ceil(context / dcp)`` tokens)
    for the ``ceil(batch / ep)`` requests its attention replica serves."""
    return per_token * -(-context // cluster.dcp) * -(-batch // cluster.ep)


def fit_format(fmt: str, wb: WeightBytes, cfg: dict, cluster: Cluster, per_token: int,
               context: int, batch: int, reserve: float) -> FormatPlan:
    """Weights + KV + reserve on the fullest GPU against its memory; largest context and batch that fit."""
    weights = weights_per_gpu(wb.by_place, cluster, cfg["n_routed_experts"])
    kv = kv_bytes_per_gpu(per_token, context, batch, cluster)
    mem = cluster.gpu.mem_bytes
    reserve_bytes = math.ceil(mem * reserve)
    total = weights + kv + reserve_bytes
    free = mem - reserve_bytes - weights  # what the KV cache may use
    per_request = kv_bytes_per_gpu(per_token, context, 1, cluster)  # one request at the requested context
    per_token_here = per_token * -(-batch // cluster.ep)  # one more token of context for each request here
    return FormatPlan(
        format=fmt, weight_bytes=wb.total, scale_bytes=wb.scales, weight_bytes_per_gpu=weights,
        kv_bytes_per_gpu=kv, reserve_bytes=reserve_bytes, total_bytes_per_gpu=total,
        headroom_bytes=mem - total, fits=total <= mem,
        max_context=max(0, free // per_token_here) * cluster.dcp,
        max_batch=max(0, free // per_request) * cluster.ep)


@dataclasses.dataclass(frozen=True)
class Model:
    """What a checkpoint weighs, independent of the GPUs: its config and bytes in each format."""

    source: str
    sizes_from: str  # "headers" (real shards) or "config" (config.json only)
    config: dict  # the text model's config
    params: int  # weight elements of the BF16 checkpoint
    weights: dict[str, WeightBytes]  # format -> bytes
    notes: tuple[str, ...]


def load_model(path: str | Path, formats: tuple[str, ...] = fplan.TARGETS) -> Model:
    """Read ``path`` (checkpoint dir or config.json) and size it in ``formats`` (and BF16, for ``params``)."""
    collect([f"unknown format {f!r}; use one of {list(fplan.TARGETS)}" for f in formats if f not in fplan.TARGETS],
            K2QuantError)
    raw, ckpt, where = open_source(path)
    cfg = model_config(raw, where)
    nl = cfg["num_hidden_layers"]
    bf16_entries = header_entries(ckpt, "bf16") if ckpt else config_entries(cfg, "bf16")
    wbs = {"bf16": weight_bytes(bf16_entries, nl)}
    for f in formats:
        if f not in wbs:
            wbs[f] = weight_bytes(header_entries(ckpt, f) if ckpt else config_entries(cfg, f), nl)
    return Model(str(path), "headers" if ckpt else "config", cfg, sum(math.prod(e.shape) for e in bf16_entries),
                 wbs, tuple(_model_notes(cfg, ckpt is not None, wbs["bf16"])))


def plan(model: Model, cluster: Cluster, context: int | None = None, batch: int = 1,
         formats: tuple[str, ...] = fplan.TARGETS, kv_dtype: str = "bf16",
         reserve: float = DEFAULT_RESERVE) -> CapacityReport:
    """Fit each of ``formats`` of ``model`` on ``cluster`` at ``context`` tokens (default: the model's
    ``max_position_embeddings``) x ``batch`` requests."""
    cfg = model.config
    if context is None:
        context = cfg.get("max_position_embeddings")
        if not isinstance(context, int):
            raise K2QuantError(f"{model.source}: no --context given and the config has no max_position_embeddings; "
                               f"pass --context, e.g. --context 128k")
    problems = [f"format {f!r} was not sized; load the model with it" for f in formats if f not in model.weights]
    if not 0 <= reserve < 1:
        problems.append(f"--reserve {reserve}: expected a fraction of GPU memory in [0, 1), e.g. 0.1")
    if batch < 1 or context < 1:
        problems.append(f"--batch {batch} / --context {context}: both must be at least 1")
    collect(problems, K2QuantError)
    per_token = kv_bytes_per_token(cfg, kv_dtype)
    plans = tuple(fit_format(f, model.weights[f], cfg, cluster, per_token, context, batch, reserve) for f in formats)
    return CapacityReport(
        source=model.source, sizes_from=model.sizes_from, params=model.params,
        num_hidden_layers=cfg["num_hidden_layers"],
        kv_values_per_token_per_layer=cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], kv_dtype=kv_dtype,
        kv_bytes_per_token=per_token, cluster=cluster, context=context, batch=batch, reserve=reserve,
        formats=plans, notes=model.notes + tuple(_fit_notes(cfg, cluster, context, kv_dtype, plans)))


def estimate(path: str | Path, cluster: Cluster, context: int | None = None, batch: int = 1,
             formats: tuple[str, ...] = fplan.TARGETS, kv_dtype: str = "bf16",
             reserve: float = DEFAULT_RESERVE) -> CapacityReport:
    """``plan(load_model(path))``: the one call the CLI makes."""
    return plan(load_model(path, formats), cluster, context, batch, formats, kv_dtype, reserve)


def _model_notes(cfg: dict, from_headers: bool, bf16_bytes: WeightBytes) -> list[str]:
    """Caveats about the sizes themselves."""
    notes = []
    mtp = cfg.get("num_nextn_predict_layers") or 0
    if not from_headers and mtp:
        notes.append(f"config declares {mtp} MTP layer(s); sizes from config.json leave them out (pass the "
                     f"checkpoint directory for header-exact sizes); engines load them only for speculative decoding")
    if bf16_bytes.by_place[NOT_LOADED]:
        notes.append(f"MTP layer tensors ({bf16_bytes.by_place[NOT_LOADED]:,} B in BF16) count in the checkpoint "
                     f"size but not per GPU: engines load them only for speculative decoding")
    return notes


def _fit_notes(cfg: dict, cluster: Cluster, context: int, kv_dtype: str, plans: tuple[FormatPlan, ...]) -> list[str]:
    """Caveats about this cluster and context."""
    notes = []
    e = cfg["n_routed_experts"]
    if e % cluster.count:
        notes.append(f"{e} routed experts do not split evenly over {cluster.count} GPUs; "
                     f"the fullest GPU holds {-(-e // cluster.count)} per MoE layer")
    max_pos = cfg.get("max_position_embeddings")
    if isinstance(max_pos, int) and context > max_pos:
        notes.append(f"context {context:,} exceeds the model's max_position_embeddings {max_pos:,}; "
                     f"engines refuse it whatever the memory")
    if isinstance(max_pos, int) and any(p.max_context > max_pos for p in plans):
        notes.append(f"max context is what memory allows; the model itself stops at max_position_embeddings "
                     f"{max_pos:,}")
    if kv_dtype != "bf16":
        notes.append(f"KV cache in {kv_dtype} ({KV_DTYPES[kv_dtype]} B per value); published deployment sizes "
                     f"assume the BF16 default (2 B)")
    if cluster.tp > cluster.dcp:
        notes.append(f"MLA's latent KV has no heads to split: each of the {cluster.tp} TP ranks holds the whole "
                     f"cache of its requests (--dcp splits tokens over ranks; --tp 1 --ep N serves each request "
                     f"on one GPU)")
    return notes
