"""Plan a conversion: every output tensor's name, dtype and shape, and which shard holds it.

The plan is computed from headers alone, before any data is read, so bad input fails
before anything is written and output sizes are known exactly (``inspect`` uses them).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from k2quant.errors import SchemeError, collect
from k2quant.formats import arch as farch
from k2quant.formats import bf16, ct_int4, deepseek_fp8, selection, source
from k2quant.formats.checkpoint import CONFIG, Checkpoint
from k2quant.formats.shards import Entry, TensorInfo
from k2quant.quant.scheme import KIMI_INT4_IGNORE, QuantScheme

DEFAULT_MAX_SHARD = 5 * 10**9


@dataclasses.dataclass(frozen=True)
class Item:
    """One unit of work: a module (or loose tensor) read from ``sources``, written as ``entries``."""

    key: str
    src_rep: str  # plain / fp8 / int4 as stored
    dst_rep: str  # plain / fp8 / int4 as written
    sources: tuple[tuple[str, TensorInfo], ...]  # (role, info)
    entries: tuple[Entry, ...]
    shape: tuple[int, ...]

    @property
    def src_bytes(self) -> int:
        return sum(i.nbytes for _, i in self.sources)

    @property
    def dst_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def passthrough(self) -> bool:
        return self.src_rep == self.dst_rep

    @property
    def stored_rep(self) -> str:
        """How the source stores it (plain/fp8/int4), without the requantize mark ``*``."""
        return self.src_rep.rstrip("*")

    @property
    def tensor_name(self) -> str:
        """The weight's tensor name for a module (``<key>.weight``), the name itself for a loose tensor."""
        return self.key if self.sources[0][0] == "tensor" else self.key + ".weight"

    def part(self, role: str) -> TensorInfo:
        return dict(self.sources)[role]


@dataclasses.dataclass
class Plan:
    src: Path
    target: str
    source_format: source.SourceFormat
    scheme: QuantScheme | None
    items: list[Item]
    shards: list[list[int]]  # item indices per output shard
    config: dict

    @property
    def shard_names(self) -> list[str]:
        n = len(self.shards)
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    @property
    def dst_bytes(self) -> int:
        return sum(it.dst_bytes for it in self.items)

    @property
    def src_bytes(self) -> int:
        return sum(it.src_bytes for it in self.items)

    def settings(self) -> dict:
        """What determines the output bytes (for resume and reports)."""
        s = self.scheme
        return {"target": self.target, "source_format": self.source_format.name,
                "scheme": None if s is None else {"name": s.name, "block_size": list(s.block_size),
                                                  "scale_rule": s.scale_rule, "targets": list(s.targets),
                                                  "ignore": list(s.ignore)},
                "shards": self.shard_names}


def _dst_rep(mod: source.Module, target: str, scheme: QuantScheme | None, arch: farch.Arch) -> str:
    if target == "fp8" and arch.kind(mod.name) not in (None, farch.LM_HEAD):
        return source.FP8
    if target == "int4" and selection.selected(mod.name, scheme, arch):
        return source.INT4
    return source.PLAIN


def _entries(mod: source.Module, rep: str, scheme: QuantScheme | None, src: source.SourceFormat) -> list[Entry]:
    if rep == mod.rep != source.PLAIN and _same_scheme(src.scheme, scheme):
        # passthrough keeps the stored codes; FP8 scales are written as F32 weight_scale_inv (exact)
        names = {"scale": f"{mod.name}.{deepseek_fp8.SCALE}"} if rep == source.FP8 else {}
        return [Entry(names.get(role, info.name), "F32" if role == "scale" and rep == source.FP8 else info.dtype,
                      info.shape) for role, info in mod.parts.items()]
    if rep == source.FP8:
        return deepseek_fp8.entries(mod.name, mod.shape, scheme)
    if rep == source.INT4:
        return ct_int4.entries(mod.name, mod.shape, scheme)
    dtype = mod.parts["weight"].dtype if mod.rep == source.PLAIN else "BF16"  # dequantized weights are BF16
    return bf16.entries(mod.name, mod.shape, dtype)


def _same_scheme(a: QuantScheme | None, b: QuantScheme | None) -> bool:
    return a is not None and b is not None and a.dtype == b.dtype and a.block_size == b.block_size


def make_plan(ckpt: Checkpoint, target: str, scheme: QuantScheme | None,
              max_shard_size: int = DEFAULT_MAX_SHARD) -> Plan:
    """Every output tensor and its shard, checked against the scheme, from headers only.

    What each tensor is comes from the checkpoint's own architecture (``arch.from_config``)."""
    src = source.detect(ckpt)
    arch = farch.from_config(ckpt.config)
    mods, loose = source.modules(ckpt, src, arch.is_linear)
    problems: list[str] = []
    items: list[Item] = []
    for mod in mods.values():
        rep = _dst_rep(mod, target, scheme, arch)
        if rep == source.INT4 and mod.shape[1] % scheme.group_size:
            problems.append(
                f"{mod.first.file.name}: {mod.name}.weight has input dim {mod.shape[1]}, not divisible by group "
                f"size {scheme.group_size}; pick a --group-size that divides it or exclude it with "
                f"--ignore {mod.name}")
            continue
        # same format but another block/group size: not a passthrough, so mark the source side
        requant = rep == mod.rep != source.PLAIN and not _same_scheme(src.scheme, scheme)
        items.append(Item(mod.name, mod.rep + ("*" if requant else ""), rep, tuple(mod.parts.items()),
                          tuple(_entries(mod, rep, scheme, src)), mod.shape))
    for name in loose:
        info = ckpt.tensors[name]
        items.append(Item(name, source.PLAIN, source.PLAIN, (("tensor", info),),
                          (Entry(name, info.dtype, info.shape),), info.shape))
    if target in ("int4", "fp8"):
        _check_fused(items, problems)
    collect(problems, SchemeError)
    if target in ("int4", "fp8"):
        _check_selection(ckpt, target, scheme, arch, items)
    files = {f: i for i, f in enumerate(ckpt.files)}
    items.sort(key=lambda it: min((files[i.file], i.start) for _, i in it.sources))
    config = _new_config(ckpt, target, scheme, items, arch)
    if target == "int4":
        _check_config_matches(ckpt, config, items, arch)
    return Plan(ckpt.path, target, src, scheme, items, _pack(items, max_shard_size), config)


def _check_fused(items: list[Item], problems: list[str]) -> None:
    """Loaders fuse q/k/v, gate/up and q_a/kv_a into one matrix: every member must get the same format."""
    reps = {it.key: it.dst_rep for it in items}
    for key, rep in reps.items():
        group = [m for m in selection.fused_group(key) if m in reps]
        if len(group) < 2 or key != group[0] or len({reps[m] for m in group}) == 1:
            continue
        if len(group) == 2:
            other = group[1]
            problems.append(f"{key} would be {rep} but {other} {reps[other]}; serving engines fuse these two, so "
                            f"both must be quantized or both ignored: adjust --targets/--ignore")
        else:
            found = ", ".join(f"{m} {reps[m]}" for m in group)
            problems.append(f"{found}: serving engines fuse these {len(group)} into one matrix, so all must be "
                            f"quantized or all ignored: adjust --targets/--ignore")


def _check_selection(ckpt: Checkpoint, target: str, scheme: QuantScheme | None, arch: farch.Arch,
                     items: list[Item]) -> None:
    """A selection that quantizes nothing is an error that says what the model has and what to pass."""
    if any(it.dst_rep != source.PLAIN for it in items):
        return
    linears = [it.key for it in items if arch.is_linear(it.key)]
    kinds: dict[str, int] = {}
    for m in linears:
        kinds[arch.kind(m)] = kinds.get(arch.kind(m), 0) + 1
    has = f"{arch.model_class} has {len(linears)} Linear weights on disk ({_counts(kinds)})"
    recipes = "--recipe linear (every Linear but lm_head) or --recipe mlp (MLPs and experts only)"
    if target == "fp8":
        raise SchemeError(f"{ckpt.path}: --to fp8 quantizes every Linear but lm_head, and {has}: nothing to quantize")
    experts = [m for m in linears if arch.kind(m) == farch.EXPERT]
    if selection.is_default(scheme) and not experts:
        raise SchemeError(f"{ckpt.path / CONFIG}: --to int4 by default quantizes the routed experts only (the "
                          f"K2-Thinking layout), but {has} and no routed experts. Pass {recipes}, or --targets/--ignore")
    if selection.is_default(scheme):
        raise SchemeError(f"{ckpt.path / CONFIG}: --to int4 by default quantizes the routed experts by Kimi's names "
                          f"(mlp.experts.<e>.gate/up/down_proj), but {has}, named otherwise (e.g. {experts[0]}). "
                          f"Pass --recipe experts to select the routed experts from the model, or {recipes}")
    hit = [m for m in linears if selection.matches(m, scheme.targets, arch)]
    if hit:
        raise SchemeError(f"{ckpt.path}: --targets {list(scheme.targets)} select {len(hit)} Linear weights (e.g. "
                          f"{hit[0]}) but --ignore {list(scheme.ignore)} removes every one of them (without --ignore, "
                          f"Kimi's four-entry list applies); pass --ignore lm_head to quantize all of them but lm_head")
    raise SchemeError(f"{ckpt.path}: --targets {list(scheme.targets)} select none of the Linear weights: {has}, e.g. "
                      f"{linears[:3]}. Targets are 'Linear' (every Linear), a class name, exact module names or "
                      f"re:<regex> (re.match); or pass {recipes}")


def _counts(kinds: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"


def _check_config_matches(ckpt: Checkpoint, config: dict, items: list[Item], arch: farch.Arch) -> None:
    """Loaders quantize every Linear their config does not ignore: the config must say exactly what is on disk."""
    holder = config.get("text_config", config) if "quantization_config" not in config else config
    ignore = tuple(holder["quantization_config"]["ignore"])
    wrong = sorted(f"{it.key} ({it.dst_rep})" for it in items if arch.is_linear(it.key)
                   and (it.dst_rep == source.INT4) != (not selection.matches(it.key, ignore, arch)))
    if wrong:
        raise SchemeError(f"{ckpt.path}: the written config (targets ['Linear'], ignore {list(ignore)}) would not "
                          f"match the tensors for {len(wrong)} Linear weights (loaders quantize every Linear not "
                          f"ignored), e.g. {wrong[:3]}; nothing was written. This is a k2quant bug: please report it "
                          f"with the command line")


def _pack(items: list[Item], max_shard_size: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for i, it in enumerate(items):
        if shards[-1] and size + it.dst_bytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += it.dst_bytes
    return shards


def _new_config(ckpt: Checkpoint, target: str, scheme: QuantScheme | None, items: list[Item],
                arch: farch.Arch) -> dict:
    cfg = json.loads(json.dumps(ckpt.config))
    holder = cfg["text_config"] if "quantization_config" not in cfg and isinstance(cfg.get("text_config"), dict) \
        and "quantization_config" in cfg["text_config"] else cfg
    holder.pop("quantization_config", None)
    holder.pop("compression_config", None)
    if target == "fp8":
        holder["quantization_config"] = deepseek_fp8.quantization_config(scheme, ckpt.quantization_config)
    elif target == "int4":
        holder["quantization_config"] = ct_int4.quantization_config(scheme, _int4_ignore(scheme, items, arch))
    holder["torch_dtype"] = "bfloat16"
    if "dtype" in holder:
        holder["dtype"] = "bfloat16"
    return cfg


def _int4_ignore(scheme: QuantScheme, items: list[Item], arch: farch.Arch) -> list[str]:
    """The ignore list loaders need to expect exactly what was written.

    Loaders quantize every ``Linear`` not ignored, so each Linear left unquantized must be
    ignored: Kimi's four entries for the default selection (verbatim for Kimi-K2), else the
    user's list, plus the exact name of any other unquantized Linear of the model (a tied
    ``lm_head`` that has no tensor of its own included) or ``*_proj`` weight outside it (an MTP ``eh_proj``).
    """
    ignore = list(KIMI_INT4_IGNORE if selection.is_default(scheme) else scheme.ignore)
    added: dict[str, None] = {}  # exact names: a set lookup, not a scan of the growing list (linear, not n^2)
    on_disk = set()
    for it in items:
        mod = it.key.removesuffix(".weight")  # loose tensors are keyed by tensor name
        on_disk.add(mod)
        looks_linear = arch.is_linear(mod) or (mod.endswith("_proj") and len(it.shape) == 2)
        if it.dst_rep == source.PLAIN and looks_linear and mod not in added and not selection.matches(mod, ignore, arch):
            added[mod] = None
    for mod in arch.linears:  # Linears with no weight of their own on disk (tied lm_head)
        if mod not in on_disk and mod not in added and not selection.matches(mod, ignore, arch):
            added[mod] = None
    return ignore + list(added)
