"""What a checkpoint holds: format, tensor classes, bytes, and its exact size in each target format."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from k2quant.errors import SchemeError
from k2quant.formats import arch, plan, selection, shards, source
from k2quant.formats.checkpoint import Checkpoint
from k2quant.quant import int4_group
from k2quant.quant.names import FORMATS, INT4_RULES
from k2quant.quant.scheme import QuantScheme, for_target


@dataclasses.dataclass
class InspectReport:
    path: str
    format: str
    quantization: dict | None
    model_type: str | None
    shards: int
    tensors: int
    stored_bytes: int
    classes: dict[str, dict]  # class -> {tensors, params, bytes, dtypes}
    sizes: dict[str, int]  # target format -> exact tensor bytes after conversion (default scheme)
    int4_rule: dict | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def inspect(path: str | Path, check_rule: int = 16) -> InspectReport:
    """Read headers (and, for INT4, ``check_rule`` modules' scales) and summarise the checkpoint."""
    ckpt = Checkpoint(path)
    src = source.detect(ckpt)
    a = arch.from_config(ckpt.config)
    mods, loose = source.modules(ckpt, src, a.is_linear)
    classes: dict[str, dict] = {}
    for name, m in [(m.name + ".weight", m) for m in mods.values()] + [(n, None) for n in loose]:
        infos = list(m.parts.values()) if m else [ckpt.tensors[name]]
        c = classes.setdefault(a.report_class(name), {"tensors": 0, "params": 0, "bytes": 0, "dtypes": []})
        c["tensors"] += len(infos)
        c["params"] += m.shape[0] * m.shape[1] if m else infos[0].numel
        c["bytes"] += sum(i.nbytes for i in infos)
        c["dtypes"] = sorted(set(c["dtypes"]) | {i.dtype for i in infos})
    sizes = {}
    for t in FORMATS:  # a format with nothing to quantize in this checkpoint is left out
        try:
            sizes[t] = plan.make_plan(ckpt, t, for_target(t)).dst_bytes
        except SchemeError:
            if t != "int4":
                continue
            try:  # the default INT4 selection (routed experts) is empty here: size every Linear instead
                targets, ignore = selection.with_recipe("linear", ckpt.path)
                sizes[f"{t} (--recipe linear)"] = plan.make_plan(ckpt, t, for_target(t, targets=targets,
                                                                                      ignore=ignore)).dst_bytes
            except SchemeError:
                continue
    rule = int4_rule(ckpt, src, [m for m in mods.values() if m.rep == source.INT4], check_rule) \
        if src.name == "int4" else None
    return InspectReport(str(ckpt.path), src.name, ckpt.quantization_config, ckpt.config.get("model_type"),
                         len(ckpt.files), len(ckpt.tensors), ckpt.total_bytes(), dict(sorted(classes.items())),
                         sizes, rule)


def requantized(src: source.SourceFormat, mods: list[source.Module]):
    """For each stored INT4 module: ``(codes, scales, {rule: (codes, scales)})``, the last what each scale rule
    computes from the dequantized weights (what a loader gives the model). One pass of both audits below."""
    for m in mods:
        q = int4_group.unpack(shards.read_tensor(m.parts["packed"]), m.shape[-1])
        scale = shards.read_tensor(m.parts["scale"])
        w = int4_group.dequantize(q, scale, src.scheme, torch.bfloat16)
        yield q, scale, {rule: int4_group.quantize_weight(w, src.scheme.with_(scale_rule=rule)) for rule in INT4_RULES}


def int4_rule(ckpt: Checkpoint, src: source.SourceFormat, mods: list[source.Module], limit: int) -> dict:
    """Which scale rule the stored INT4 scales follow: requantize the dequantized weights with each rule."""
    checked = mods[:limit] if limit > 0 else mods
    match = dict.fromkeys(INT4_RULES, 0)
    minus8 = 0
    for q, scale, by_rule in requantized(src, checked):
        minus8 += int(bool((q == int4_group.INT4_MIN).any()))
        for rule, (q2, s2) in by_rule.items():
            match[rule] += int(torch.equal(q2, q) and torch.equal(s2, scale.to(s2.dtype)))
    n = len(checked)
    fits = [r for r, k in match.items() if n and k == n]
    if fits == ["kimi"]:
        verdict = "kimi"
    elif minus8 and not fits:
        verdict = "library"  # the library rule is not idempotent: codes -8 and amax/7.5 scales are its signature
    else:
        verdict = "kimi" if "kimi" in fits else "unknown"
    return {"rule": verdict, "modules_checked": n, "modules_with_code_-8": minus8,
            "reproduced_by_kimi_rule": match["kimi"], "reproduced_by_library_rule": match["library"]}


def audit_int4(path: str | Path | Checkpoint, scheme: QuantScheme) -> dict:
    """For every INT4 tensor of ``path`` that ``scheme`` targets: the share of its codes and scales that each
    scale rule reproduces. ``{rule: {"codes": share, "scales": share}, "tensors": n}``."""
    ckpt = path if isinstance(path, Checkpoint) else Checkpoint(path)
    src = source.detect(ckpt)
    model = arch.from_config(ckpt.config)  # class names too: a selection such as --targets Linear matches by class
    mods = [m for m in source.modules(ckpt, src)[0].values()
            if m.rep == source.INT4 and scheme.matches(m.name, model.classes(m.name))]
    same = {r: [0, 0] for r in INT4_RULES}  # rule -> [codes equal, scales equal]
    n_codes = n_scales = 0
    for q, scale, by_rule in requantized(src, mods):
        for rule, (q2, s2) in by_rule.items():
            same[rule][0] += int((q2 == q).sum())
            same[rule][1] += int((s2 == scale).sum())
        n_codes, n_scales = n_codes + q.numel(), n_scales + scale.numel()
    out: dict = {r: {"codes": c / max(1, n_codes), "scales": s / max(1, n_scales)} for r, (c, s) in same.items()}
    out["tensors"] = len(mods)
    return out
