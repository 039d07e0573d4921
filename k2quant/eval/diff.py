"""``k2quant diff``: streaming per-tensor comparison of two checkpoints in any formats.

Both sides are dequantized module by module with the convert path's own kernels (exactly what
``k2quant.formats.load`` feeds the model), so a 1T checkpoint needs one module in memory at a time
and no forward pass. ``A`` is the reference: SQNR = 10 log10(sum a^2 / sum (a - b)^2).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Iterator

import torch

from k2quant.eval.report import json_number
from k2quant.errors import FormatError, collect
from k2quant.formats import items, layout, plan
from k2quant.formats.checkpoint import Checkpoint

#: progress(tensors done, tensors total)
Progress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class Stats:
    """Error of B against A over some tensors: sums kept so groups aggregate exactly."""

    numel: int
    signal: float  # sum a^2
    noise: float  # sum (a - b)^2
    max_abs: float

    @property
    def rel_error(self) -> float:
        if self.noise == 0:
            return 0.0
        return math.sqrt(self.noise / self.signal) if self.signal > 0 else math.inf

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        return 10 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf

    def __add__(self, other: Stats) -> Stats:
        return Stats(self.numel + other.numel, self.signal + other.signal, self.noise + other.noise,
                     max(self.max_abs, other.max_abs))

    def to_json(self) -> dict:
        return {k: json_number(v) for k, v in (("numel", self.numel), ("rel_error", self.rel_error),
                                           ("sqnr_db", self.sqnr_db), ("max_abs_error", self.max_abs))}


@dataclasses.dataclass(frozen=True)
class TensorDiff:
    name: str
    layer: int | None
    tensor_class: str
    shape: tuple[int, ...]
    stats: Stats


@dataclasses.dataclass
class DiffReport:
    a: str
    b: str
    tensors: list[TensorDiff]

    def groups(self) -> dict[tuple[int | None, str], Stats]:
        """``(layer, tensor class) -> Stats``; layer None for embeddings, final norm and lm_head."""
        out: dict[tuple[int | None, str], Stats] = {}
        for t in self.tensors:
            key = (t.layer, t.tensor_class)
            out[key] = out[key] + t.stats if key in out else t.stats
        return out

    def by_class(self) -> dict[str, Stats]:
        out: dict[str, Stats] = {}
        for t in self.tensors:
            out[t.tensor_class] = out[t.tensor_class] + t.stats if t.tensor_class in out else t.stats
        return dict(sorted(out.items()))

    def total(self) -> Stats:
        return sum((t.stats for t in self.tensors[1:]), self.tensors[0].stats)

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "total": self.total().to_json(),
                "by_class": {c: s.to_json() for c, s in self.by_class().items()},
                "groups": [{"layer": layer, "class": cls} | s.to_json()
                           for (layer, cls), s in sorted(self.groups().items(), key=_group_order)],
                "tensors": [{"name": t.name, "layer": t.layer, "class": t.tensor_class, "shape": list(t.shape)}
                            | t.stats.to_json() for t in self.tensors]}


def _group_order(item: tuple[tuple[int | None, str], Stats]) -> tuple[int, str]:
    (layer, cls), _ = item
    return (-1 if layer is None else layer, cls)


def tensor_stats(a: torch.Tensor, b: torch.Tensor) -> Stats:
    """Sums in float64: the same numbers whatever the stored dtypes."""
    a64, b64 = a.double(), b.double()
    err = a64 - b64
    return Stats(a.numel(), float(a64.square().sum()), float(err.square().sum()),
                 float(err.abs().max()) if err.numel() else 0.0)


def _bf16_items(ckpt: Checkpoint) -> list[plan.Item]:
    return plan.make_plan(ckpt, "bf16", None, max_shard_size=1 << 62).items


def iter_pairs(a: str | Path, b: str | Path) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, a tensor, b tensor)`` in A's file order, both dequantized; B read on demand by name."""
    ca, cb = Checkpoint(a), Checkpoint(b)
    pa, pb = plan.make_plan(ca, "bf16", None, 1 << 62), plan.make_plan(cb, "bf16", None, 1 << 62)
    where = {e.name: it for it in pb.items for e in it.entries}
    _check_names(ca, cb, [e for it in pa.items for e in it.entries], where)
    pending: dict[str, torch.Tensor] = {}
    for it in pa.items:
        for name, ta in items.run_item(it, pa.source_format, None).items():
            if name not in pending:
                pending |= items.run_item(where[name], pb.source_format, None)
            yield name, ta, pending.pop(name)


def _check_names(ca: Checkpoint, cb: Checkpoint, entries: list, where: dict[str, plan.Item]) -> None:
    problems = []
    names = {e.name for e in entries}
    for e in entries:
        other = where.get(e.name)
        if other is None:
            problems.append(f"{cb.path}: has no tensor {e.name!r} (present in {ca.path}); diff needs two "
                            f"checkpoints of the same model")
            continue
        shape = next(x.shape for x in other.entries if x.name == e.name)
        if tuple(shape) != tuple(e.shape):
            problems.append(f"{e.name}: shape {list(e.shape)} in {ca.path} but {list(shape)} in {cb.path}; "
                            f"diff needs two checkpoints of the same model")
    extra = sorted(set(where) - names)
    if extra:
        problems.append(f"{cb.path}: has {len(extra)} tensor(s) that {ca.path} lacks, e.g. {extra[:3]}; diff needs "
                        f"two checkpoints of the same model")
    collect(problems, FormatError)


def diff(a: str | Path, b: str | Path, progress: Progress | None = None) -> DiffReport:
    """Per-tensor error of checkpoint ``b`` against ``a`` (any formats), one module in memory at a time."""
    nl = Checkpoint(a).config.get("num_hidden_layers")
    total = len(_bf16_items(Checkpoint(a)))
    out = []
    for i, (name, ta, tb) in enumerate(iter_pairs(a, b)):
        out.append(TensorDiff(name, layout.layer_index(name), layout.tensor_class(name, nl), tuple(ta.shape),
                              tensor_stats(ta, tb)))
        if progress:
            progress(i + 1, total)
    return DiffReport(str(a), str(b), out)
