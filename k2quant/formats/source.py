"""Detect a checkpoint's format from config.json and its tensors, and group tensors into modules."""
from __future__ import annotations

import dataclasses
from typing import Callable

from k2quant.errors import FormatError, collect
from k2quant.formats import deepseek_fp8, layout
from k2quant.formats.checkpoint import CONFIG, Checkpoint
from k2quant.formats.shards import TensorInfo
from k2quant.quant import fp8_block
from k2quant.quant import scheme as qscheme
from k2quant.quant.scheme import QuantScheme

PLAIN, FP8, INT4 = "plain", "fp8", "int4"
FP8_CONFIG_HINT = ('"quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", '
                   '"quant_method": "fp8", "weight_block_size": [128, 128]}')


@dataclasses.dataclass(frozen=True)
class SourceFormat:
    """The format a checkpoint is in: ``bf16``, ``fp8`` or ``int4``, with the scheme to decode it."""

    name: str
    scheme: QuantScheme | None = None
    fp8_scale: str = deepseek_fp8.SCALE  # or "weight_scale" for compressed-tensors FP8 block


@dataclasses.dataclass(frozen=True)
class Module:
    """A weight-bearing module as stored: ``rep`` plain/fp8/int4, logical ``[N, K]`` shape, its tensors."""

    name: str
    rep: str
    shape: tuple[int, ...]
    parts: dict[str, TensorInfo]

    @property
    def first(self) -> TensorInfo:
        return min(self.parts.values(), key=lambda i: (i.file.name, i.start))


def detect(ckpt: Checkpoint) -> SourceFormat:
    """Read the format from ``quantization_config``; unsupported schemes are an error."""
    qc = ckpt.quantization_config
    where = ckpt.path / CONFIG
    if qc is None:
        return SourceFormat("bf16")
    if not isinstance(qc, dict):
        raise FormatError(f"{where}: quantization_config is {qc!r}, expected an object; restore config.json from "
                          f"the model's release (BF16 checkpoints have no quantization_config)")
    method = qc.get("quant_method")
    if method == "fp8":
        block = qc.get("weight_block_size")
        if not block:
            raise FormatError(f"{where}: quantization_config is per-tensor FP8 (no weight_block_size); k2quant "
                              f"reads block FP8 only. Expected {FP8_CONFIG_HINT}")
        block = _ints(block, 2, where, "quantization_config.weight_block_size")
        return SourceFormat("fp8", qscheme.get("fp8-block-128", block_size=block))
    if method == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
            raise FormatError(f"{where}: quantization_config.config_groups must be an object of objects, found "
                              f"{groups!r:.80}; restore config.json from the model's release")
        for gname, group in groups.items():
            w = group.get("weights") or {}
            if not isinstance(w, dict):
                raise FormatError(f"{where}: config_groups.{gname}.weights is {w!r:.80}, expected an object")
            fmt = group.get("format") or qc.get("format")
            if w.get("type") == "int" and w.get("num_bits") == 4 and w.get("strategy") == "group":
                if fmt != "pack-quantized" or not w.get("symmetric", True):
                    raise FormatError(f"{where}: config_groups.{gname} is INT4 but format {fmt!r} / symmetric="
                                      f"{w.get('symmetric')}; k2quant reads symmetric pack-quantized INT4 only")
                (gs,) = _ints([w.get("group_size")], 1, where, f"config_groups.{gname}.weights.group_size")
                return SourceFormat("int4", qscheme.get("int4-g32", group_size=gs))
            if w.get("type") == "float" and w.get("num_bits") == 8 and w.get("strategy") == "block":
                block = _ints(w.get("block_structure") or [128, 128], 2, where,
                              f"config_groups.{gname}.weights.block_structure")
                return SourceFormat("fp8", qscheme.get("fp8-block-128", block_size=block), fp8_scale="weight_scale")
        raise FormatError(f"{where}: compressed-tensors scheme {list(groups)} is neither INT4 pack-quantized "
                          f"(group) nor FP8 block; k2quant cannot read it")
    raise FormatError(f"{where}: quant_method {method!r} is not supported; k2quant reads BF16, block FP8 "
                      f"(quant_method fp8) and compressed-tensors INT4 / FP8-block checkpoints")


def _ints(value: object, n: int, where: object, key: str) -> tuple[int, ...]:
    """``n`` positive integers from a config value, or a ``FormatError`` naming the key."""
    if (not isinstance(value, (list, tuple)) or len(value) != n
            or not all(type(v) is int and 0 < v <= 1 << 20 for v in value)):
        raise FormatError(f"{where}: {key} is {value!r:.80}, expected {n} positive integer(s); restore config.json "
                          f"from the model's release")
    return tuple(value)


def modules(ckpt: Checkpoint, src: SourceFormat,
            is_linear: Callable[[str], bool] = layout.is_int4_candidate) -> tuple[dict[str, Module], list[str]]:
    """Group tensors into quantized/plain modules; return ``(modules, loose tensor names)``.

    ``is_linear`` says which plain 2-D weights are Linear layers (``arch.Arch.is_linear`` of the model);
    the default knows Kimi/DeepSeek names only."""
    t = ckpt.tensors
    problems: list[str] = []
    mods: dict[str, Module] = {}
    used: set[str] = set()
    f8 = [n for n, i in t.items() if i.dtype == "F8_E4M3" and n.endswith(".weight")]
    packed = [n for n in t if n.endswith(".weight_packed")]
    _check_config_agrees(ckpt, src, f8, packed, problems)
    collect(problems)  # a config that disagrees with the tensors explains everything else: say only that
    for name in f8 if src.name == "fp8" else []:
        m = name[: -len(".weight")]
        sname = f"{m}.{src.fp8_scale}"
        info, scale = t[name], t.get(sname)
        grid = fp8_block.grid_shape(info.shape, src.scheme.block_size)
        if scale is None:
            problems.append(f"{info.file.name}: FP8 weight {name!r} has no scale {sname!r} in any shard; every FP8 "
                            f"weight needs its scale (expected F32{list(grid)}); restore the missing tensor")
            continue
        if scale.shape != grid or scale.dtype not in ("F32", "BF16", "F16"):
            problems.append(f"{scale.file.name}: scale {sname!r} is {scale.dtype}{list(scale.shape)} but weight "
                            f"{list(info.shape)} with block {list(src.scheme.block_size)} needs F32{list(grid)}")
            continue
        mods[m] = Module(m, FP8, info.shape, {"weight": info, "scale": scale})
        used |= {name, sname}
    for name in packed if src.name == "int4" else []:
        m = name[: -len(".weight_packed")]
        parts = {"packed": t[name], "scale": t.get(f"{m}.weight_scale"), "shape": t.get(f"{m}.weight_shape")}
        missing = [f"{m}.weight_{r}" for r in ("scale", "shape") if parts[r] is None]
        if missing:
            problems.append(f"{t[name].file.name}: INT4 weight {name!r} lacks {missing}; restore the missing tensors")
            continue
        n, k = parts["packed"].shape[0], parts["scale"].shape[-1] * src.scheme.group_size
        if (parts["packed"].dtype != "I32" or parts["packed"].shape != (n, -(-k // 8))
                or parts["scale"].shape[0] != n or parts["shape"].shape != (2,)):
            problems.append(f"{t[name].file.name}: INT4 module {m!r} has inconsistent parts: packed "
                            f"{parts['packed'].dtype}{list(parts['packed'].shape)}, scale {list(parts['scale'].shape)}, "
                            f"shape {list(parts['shape'].shape)}; expected I32[{n}, {-(-k // 8)}], [{n}, {k // src.scheme.group_size}], [2]")
            continue
        mods[m] = Module(m, INT4, (n, k), parts)
        used |= {i.name for i in parts.values()}
    orphan_suffixes = (".weight_scale_inv", ".weight_scale", ".weight_shape")
    for name, info in t.items():
        if name not in used and name.endswith(orphan_suffixes) and f"{layout.module_of(name)[0]}.weight" in t:
            problems.append(f"{info.file.name}: {name!r} is a scale/shape tensor but its weight "
                            f"{layout.module_of(name)[0] + '.weight'!r} is {t[layout.module_of(name)[0] + '.weight'].dtype}, "
                            f"not quantized; the checkpoint is inconsistent")
    collect(problems)
    for name, info in t.items():
        if name in used:
            continue
        m = name[: -len(".weight")] if name.endswith(".weight") else None
        if m and len(info.shape) == 2 and info.dtype in ("BF16", "F16", "F32") and is_linear(m):
            mods[m] = Module(m, PLAIN, info.shape, {"weight": info})
            used.add(name)
    loose = [n for n in t if n not in used]
    return mods, loose


def _check_config_agrees(ckpt: Checkpoint, src: SourceFormat, f8: list[str], packed: list[str],
                         problems: list[str]) -> None:
    where = ckpt.path / CONFIG
    if src.name != "fp8" and f8:
        problems.append(f"{where}: says {src.name.upper()} but {len(f8)} weights are F8_E4M3 (e.g. {f8[0]!r} in "
                        f"{ckpt.tensors[f8[0]].file.name}); if the checkpoint is block FP8, set {FP8_CONFIG_HINT}")
    if src.name != "int4" and packed:
        problems.append(f"{where}: says {src.name.upper()} but {len(packed)} weights are INT4 packed (e.g. "
                        f"{packed[0]!r}); restore the compressed-tensors quantization_config")
    if src.name == "fp8" and not f8:
        ex = next((n for n in ckpt.tensors if n.endswith("proj.weight")), "")
        problems.append(f"{where}: quantization_config says FP8 but no weight is F8_E4M3"
                        + (f" ({ex!r} is {ckpt.tensors[ex].dtype})" if ex else "")
                        + "; if the weights are BF16, delete quantization_config from config.json")
    if src.name == "int4" and not packed:
        problems.append(f"{where}: quantization_config says INT4 (pack-quantized) but no tensor is "
                        f"'*.weight_packed'; if the weights are BF16, delete quantization_config from config.json")
