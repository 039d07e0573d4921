"""Calibrated INT4 (GPTQ), streaming one decoder layer at a time, written by the convert writer.

For each decoder layer, in order:

1. read the layer's weights from SRC in any format (dequantized exactly as ``convert --to bf16`` does) into
   the checkpoint's own transformers decoder layer (built on the meta device, then materialised alone);
2. run the calibration activations through it, accumulating ``sum x x^T`` of the inputs of every targeted
   Linear; fused MoE experts get the tokens the router sends them (``moe.py``);
3. quantize every targeted module with GPTQ (``quant.gptq``) under those statistics;
4. put the dequantized INT4 weights in the layer and recompute its outputs: the next layer calibrates on
   what the quantized model computes;
5. write the layer's shard through ``pipeline.run_shard`` (the same compressed-tensors pack-quantized INT4),
   and its output activations into the run state (safetensors), so ``resume`` restarts at the next layer.

Peak memory: one layer's weights (fp32), its statistics, and two copies of the activations.
Modules outside the decoder layers (embeddings, final norm, ``lm_head``) are converted as ``convert``
does (round to nearest when targeted): the issue's selection is every decoder Linear.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Callable

import torch

from k2quant.errors import FormatError, K2QuantError, collect
from k2quant.formats import arch, items, layout, load, moe, output, pipeline, shards, source, texts
from k2quant.formats.checkpoint import Checkpoint
from k2quant.formats.plan import DEFAULT_MAX_SHARD, Item, Plan, make_plan
from k2quant.quant import gptq, int4_group
from k2quant.quant.names import CALIB_SAMPLES, CALIB_SEQ_LEN
from k2quant.quant.scheme import QuantScheme

ACTS = "acts-after-layer-{:05d}.safetensors"
#: (stats key, module) callback: tests compare the statistics with independently captured inputs
StatsHook = Callable[[str, torch.Tensor, float], None]


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    """The calibration data and how the layers run it."""

    data: tuple[str, ...]
    samples: int = CALIB_SAMPLES
    seq_len: int = CALIB_SEQ_LEN
    batch_size: int = 8
    expert_prior: float = 32.0  # tokens' worth of every-token statistics added to each routed expert's
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def settings(self) -> dict:
        return {"samples": self.samples, "seq_len": self.seq_len, "expert_prior": self.expert_prior,
                "dtype": str(self.dtype).removeprefix("torch.")}


@dataclasses.dataclass
class CalibReport:
    src: str
    dst: str
    source_format: str
    method: str
    layers: int
    layers_kept: int
    modules_calibrated: int
    tokens: int
    seconds: float
    seconds_gptq: float
    expert_coverage: dict[str, dict]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# -- calibration tokens ---------------------------------------------------------------------------
def calibration_ids(paths: list[str] | tuple[str, ...], tokenizer, samples: int, seq_len: int) -> torch.Tensor:
    """``[samples, seq_len]`` token ids: the documents packed (each + eos), evenly spaced windows of the stream."""
    seqs = texts.pack(texts.load_texts(list(paths), tokenizer, "--calib-data"), tokenizer, seq_len)
    if len(seqs) < samples:
        raise K2QuantError(f"{', '.join(paths)}: {len(seqs)} sequences of --calib-seq-len {seq_len} tokens, fewer "
                           f"than --calib-samples {samples}; add calibration text or lower --calib-samples")
    pick = torch.linspace(0, len(seqs) - 1, samples).round().long()
    return seqs[pick]


def _fingerprint(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]


# -- the model skeleton and one layer's weights -----------------------------------------------------
def skeleton(config: dict):
    """The checkpoint's transformers causal LM on the meta device (sdpa attention, eager experts)."""
    # sdpa: causal without a mask tensor (every calibration sequence is full); arch maps kimi_k2, runs no
    # remote code and turns a bad config into one FormatError
    return arch.skeleton(config, attn_implementation="sdpa", experts_implementation="eager").eval()


def _decoder(model):
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return base, base.layers


def _read(wanted: list[Item], bf16_plan: Plan) -> dict[str, torch.Tensor]:
    """The BF16 form of ``wanted`` by tensor name (quantized sources dequantized exactly as convert does)."""
    by_key = {it.key: it for it in bf16_plan.items}
    out = {}
    for it in wanted:
        out |= items.run_item(by_key[it.key], bf16_plan.source_format, None)
    return out


def _fit_problem(module: torch.nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> str | None:
    """Why ``tensors`` (real or meta) cannot load into ``module`` under ``prefix``; None when they fit."""
    local = moe.fuse_experts(module, {k[len(prefix) + 1:]: v for k, v in tensors.items()
                                      if k.startswith(prefix + ".")})
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in want if k not in local]
    unexpected = [k for k in local if k not in want]
    shapes = [f"{k} {list(local[k].shape)} (expected {list(want[k])})" for k in want
              if k in local and tuple(local[k].shape) != want[k]]
    if not (missing or unexpected or shapes):
        return None
    return (f"{prefix}: the checkpoint's tensors do not fit transformers' {type(module).__name__} built from "
            f"config.json: missing {missing[:4]}, unexpected {unexpected[:4]}, shapes {shapes[:4]}; the config and "
            f"the weights disagree: fix config.json or the checkpoint")


def _materialise(module: torch.nn.Module, prefix: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: str) -> torch.nn.Module:
    """``module`` (meta) with the weights named ``prefix.*`` in ``tensors``; per-expert tensors are stacked."""
    if (problem := _fit_problem(module, prefix, tensors)) is not None:
        raise FormatError(problem)
    module = module.to_empty(device=device)
    local = moe.fuse_experts(module, {k[len(prefix) + 1:]: v for k, v in tensors.items()
                                      if k.startswith(prefix + ".")})
    module.load_state_dict({k: v.to(dtype) for k, v in local.items()})
    return module.to(dtype)


# -- statistics -------------------------------------------------------------------------------------
class _LinearStats:
    """``sum x x^T`` of each targeted nn.Linear's inputs, gathered by forward pre-hooks."""

    def __init__(self, layer: torch.nn.Module, names: list[str]):
        self.h: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}
        self._last: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        mods = dict(layer.named_modules())
        self.handles = [mods[n].register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(_mod, args):
            x = args[0]
            if x is not self._last[0]:  # q/k/v (gate/up) read the same tensor: one product serves them all
                self._last = (x, gptq.hessian(x))
            h = self._last[1]
            self.h[name] = h.clone() if name not in self.h else self.h[name].add_(h)
            self.n[name] = self.n.get(name, 0) + x.numel() // x.shape[-1]
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _layer_forward(layer, hidden: torch.Tensor, pos: tuple[torch.Tensor, torch.Tensor],
                   position_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    outs = []
    for b0 in range(0, hidden.shape[0], batch_size):
        h = hidden[b0:b0 + batch_size]
        n = h.shape[0]
        out = layer(h, attention_mask=None, position_ids=position_ids.expand(n, -1),
                    position_embeddings=(pos[0].expand(n, -1, -1), pos[1].expand(n, -1, -1)))
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)


# -- one layer --------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Layer:
    index: int
    prefix: str
    items: list[Item]  # every item of the layer, in write order
    targets: list[Item]  # the INT4 ones


def _targets_by_module(layer_mod, lay: _Layer) -> tuple[list[str], dict[str, tuple[str, int | None, str]]]:
    """Which hooks serve which item: plain Linears by module name, experts by (container, expert, proj)."""
    linear_names, where = [], {}
    mods = dict(layer_mod.named_modules())
    for it in lay.targets:
        rel = it.key[len(lay.prefix) + 1:]
        if rel in mods and isinstance(mods[rel], torch.nn.Linear):
            linear_names.append(rel)
            where[it.key] = (rel, None, "linear")
            continue
        hit = moe.expert_target(mods, rel)
        if hit is None:
            raise FormatError(f"{it.tensor_name}: no transformers module computes with this weight in "
                              f"{type(layer_mod).__name__}; it cannot be calibrated (exclude it with --ignore "
                              f"{it.key}, or use --method rtn)")
        where[it.key] = hit
    return linear_names, where


def calibrate_layer(layer_mod, lay: _Layer, weights: dict[str, torch.Tensor], hidden: torch.Tensor, pos, pos_ids,
                    scheme: QuantScheme, cfg: gptq.GPTQConfig, calib: CalibConfig,
                    on_stats: StatsHook | None = None) -> tuple[dict, torch.Tensor, dict, float]:
    """GPTQ every target of one layer; returns ``(codes by key, outputs, expert coverage, gptq seconds)``."""
    linear_names, where = _targets_by_module(layer_mod, lay)
    lin = _LinearStats(layer_mod, linear_names)
    experts = moe.ExpertStats(layer_mod, {c for c, e, _ in where.values() if e is not None}, calib.expert_prior)
    with torch.no_grad():
        _layer_forward(layer_mod, hidden, pos, pos_ids, calib.batch_size)
    lin.close()
    experts.close()
    t0 = time.perf_counter()
    codes = {}
    for it in lay.targets:
        mod, e, proj = where[it.key]
        h = lin.h[mod] if e is None else experts.hessian(mod, e, proj)
        if on_stats:
            on_stats(it.key, h, lin.n.get(mod, 0) if e is None else experts.routed(mod, e))
        w = weights[it.tensor_name]
        q, s = gptq.quantize(w, h.to(calib.device), scheme, cfg)
        codes[it.key] = (q, s)
        _set_weight(layer_mod, mod, e, proj, int4_group.dequantize(q, s, scheme, torch.bfloat16))
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        out = _layer_forward(layer_mod, hidden, pos, pos_ids, calib.batch_size)
    return codes, out, experts.coverage(), seconds


def _set_weight(layer_mod, mod: str, e: int | None, proj: str, deq: torch.Tensor) -> None:
    m = dict(layer_mod.named_modules())[mod]
    with torch.no_grad():
        if e is None:
            m.weight.copy_(deq.to(m.weight.dtype))
        else:
            moe.set_expert_weight(m, e, proj, deq)


# -- the whole run ----------------------------------------------------------------------------------
def _layers(plan: Plan, num_layers: int) -> tuple[list[Item], list[_Layer]]:
    """Items outside the decoder layers, and each decoder layer's items (MTP layers count as outside)."""
    outside, by_layer = [], {}
    for it in plan.items:
        li = layout.layer_index(it.key)
        if li is None or li >= num_layers:
            outside.append(it)
        else:
            by_layer.setdefault(li, []).append(it)
    layers = []
    for li in sorted(by_layer):
        prefix = by_layer[li][0].key[: by_layer[li][0].key.index(f"layers.{li}.") + len(f"layers.{li}")]
        layers.append(_Layer(li, prefix, by_layer[li], [it for it in by_layer[li] if it.dst_rep == source.INT4]))
    return outside, layers


def _check_layers(model, layers: list[_Layer], bf16_plan: Plan) -> None:
    """Before anything is written: every layer's tensors fit its transformers layer, every target has a module."""
    entries = {it.key: it.entries for it in bf16_plan.items}
    decoder_layers = _decoder(model)[1]
    problems = []
    for lay in layers:
        meta = {e.name: torch.empty(e.shape, device="meta") for it in lay.items for e in entries[it.key]}
        if (p := _fit_problem(decoder_layers[lay.index], lay.prefix, meta)) is not None:
            problems.append(p)
            continue
        try:
            _targets_by_module(decoder_layers[lay.index], lay)
        except FormatError as exc:
            problems.append(str(exc))
    collect(problems)


def _layer_plan(plan: Plan, outside: list[Item], layers: list[_Layer], max_shard_size: int) -> Plan:
    """The same items, ordered outside-first then layer by layer, in shards that never span two layers."""
    items, shards_ = [], []
    for group in [outside] + [lay.items for lay in layers]:
        size = None
        for it in group:
            if size is None or size + it.dst_bytes > max_shard_size:
                shards_.append([])
                size = 0
            shards_[-1].append(len(items))
            items.append(it)
            size += it.dst_bytes
    return dataclasses.replace(plan, items=items, shards=shards_)


def _embed(model, tensors: dict[str, torch.Tensor], ids: torch.Tensor, dtype: torch.dtype, device: str):
    emb = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is emb)
    emb = _materialise(emb, name, tensors, dtype, device)
    with torch.no_grad():
        return emb(ids.to(device))


def _rotary(model, hidden: torch.Tensor, seq_len: int, device: str):
    base, _ = _decoder(model)
    rot = type(base.rotary_emb)(config=model.config).to(device)
    pos_ids = torch.arange(seq_len, device=device)[None]
    with torch.no_grad():
        cos, sin = rot(hidden[:1], pos_ids)
    return (cos.to(hidden.dtype), sin.to(hidden.dtype)), pos_ids


def run(src: str | Path, dst: str | Path, scheme: QuantScheme, calib: CalibConfig,
        cfg: gptq.GPTQConfig = gptq.GPTQConfig(), *, max_shard_size: int = DEFAULT_MAX_SHARD, force: bool = False,
        resume: bool = False, progress: Callable[[int, int, str], None] | None = None,
        on_plan: Callable[[Plan], None] | None = None, on_stats: StatsHook | None = None) -> CalibReport:
    """Calibrated INT4 conversion of ``src`` into ``dst`` (see the module docstring)."""
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    ckpt = Checkpoint(src)
    tokenizer = load.load_tokenizer(src, "(calibration tokenizes --calib-data with it)")
    ids = calibration_ids(calib.data, tokenizer, calib.samples, calib.seq_len)
    model = skeleton(ckpt.config)
    num_layers = len(_decoder(model)[1])
    base_plan = make_plan(ckpt, "int4", scheme, max_shard_size)
    bf16_plan = make_plan(ckpt, "bf16", None, 1 << 62)  # how to read every item as BF16
    outside, layers = _layers(base_plan, num_layers)
    plan = _layer_plan(base_plan, outside, layers, max_shard_size)
    _check_layers(model, layers, bf16_plan)
    settings = output.run_settings(plan, ckpt) | {"method": "gptq", "gptq": dataclasses.asdict(cfg),
                                                  "calibration": calib.settings() | {"tokens": _fingerprint(ids)}}
    carried = ckpt.other_files(remote_code=False)  # tokenizer, generation config, ...: checked before writing
    lock = output.Lock(dst, 0)
    if dst.is_dir():
        lock.acquire()
    output.prepare_output(src, dst, plan.dst_bytes, force, resume, output.written_files(plan, ckpt, carried))
    if not lock.held:
        lock.acquire()
    try:
        return _calibrate(ckpt, src, dst, scheme, calib, cfg, ids, model, plan, bf16_plan, outside, layers,
                          settings, carried, resume, progress, on_plan, on_stats, t0)
    finally:
        lock.release()


def _calibrate(ckpt, src, dst, scheme, calib, cfg, ids, model, plan, bf16_plan, outside, layers, settings, carried,
               resume, progress, on_plan, on_stats, t0) -> CalibReport:
    """The layers in order, once DST is prepared and locked (see ``run``)."""
    state = dst / output.STATE_DIR
    kept = output.resume_state(dst, settings, plan) if resume else {}
    output.clean_partial(dst, kept, plan, 0, 1)
    state.mkdir(exist_ok=True)
    shards.write_json(state / "settings.json", settings)
    if on_plan:
        on_plan(plan)
    shard_of = {i: j for j, idx in enumerate(plan.shards) for i in idx}
    names = plan.shard_names
    pos_in_plan = {id(it): i for i, it in enumerate(plan.items)}

    def layer_shards(layer_items: list[Item]) -> list[int]:
        return sorted({shard_of[pos_in_plan[id(it)]] for it in layer_items})

    def write(js: list[int], calibrated: dict | None) -> None:
        for j in js:
            if names[j] in kept:
                continue
            job = pipeline.ShardJob(dst / names[j], tuple(plan.items[i] for i in plan.shards[j]),
                                   plan.source_format, scheme, calib.device, "reference", calibrated=calibrated)
            rec = pipeline.run_shard(job)
            rec.pop(pipeline.KERNELS_KEY)  # for a report; not part of the record on disk
            shards.write_json(state / f"{names[j]}.json", rec)
            output.verify_headers(plan, dst, [names[j]])

    write(layer_shards(outside), None)
    start, hidden = _resume_point(state, layers, kept, names, layer_shards)
    if hidden is None:
        hidden = _embed(model, _read(outside, bf16_plan), ids, calib.dtype, calib.device)
    pos, pos_ids = _rotary(model, hidden, calib.seq_len, calib.device)
    _, decoder_layers = _decoder(model)
    coverage, n_cal, t_gptq = {}, 0, 0.0
    for k, lay in enumerate(layers):
        if k < start:
            continue
        weights = _read(lay.items, bf16_plan)
        layer_mod = _materialise(decoder_layers[lay.index], lay.prefix, weights, calib.dtype, calib.device)
        codes, hidden, cov, secs = calibrate_layer(layer_mod, lay, weights, hidden, pos, pos_ids, scheme, cfg,
                                                   calib, on_stats)
        decoder_layers[lay.index] = layer_mod.to("meta")  # free the layer
        write(layer_shards(lay.items), codes)
        _save_acts(state / ACTS.format(lay.index), hidden)
        _drop_older_acts(state, lay.index)
        if cov:
            coverage[lay.prefix] = cov
        n_cal += len(codes)
        t_gptq += secs
        if progress:
            progress(k + 1, len(layers), lay.prefix)
    output.finish(ckpt, plan, dst, settings, kept, carried)
    return CalibReport(str(src), str(dst), plan.source_format.name, "gptq", len(layers), start, n_cal,
                       int(ids.numel()), round(time.perf_counter() - t0, 3), round(t_gptq, 3), coverage)


def _resume_point(state: Path, layers: list[_Layer], kept: dict, names: list[str],
                  layer_shards) -> tuple[int, torch.Tensor | None]:
    """The first layer to calibrate, and the activations it takes (None: start from the embeddings)."""
    start = 0  # the layers before ``start`` are written and the activations after the last of them are saved
    for k, lay in enumerate(layers):
        if not all(names[j] in kept for j in layer_shards(lay.items)):
            break
        if (state / ACTS.format(lay.index)).exists():
            start = k + 1
    if start == 0:
        return 0, None
    return start, _load_acts(state / ACTS.format(layers[start - 1].index))


def _save_acts(path: Path, hidden: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + shards.TMP_SUFFIX)
    save_file({"hidden": hidden.contiguous()}, str(tmp))
    tmp.replace(path)


def _load_acts(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["hidden"]


def _drop_older_acts(state: Path, index: int) -> None:
    for p in state.glob("acts-after-layer-*.safetensors"):
        if p.name != ACTS.format(index):
            p.unlink(missing_ok=True)
