"""Execute a conversion plan: stream tensors shard by shard, write atomically, index last."""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import errno
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from k2quant.errors import FormatError, OutputError
from k2quant.formats import ct_int4, deepseek_fp8, layout, shards, source
from k2quant.formats.checkpoint import CONFIG, INDEX, Checkpoint
from k2quant.formats.plan import DEFAULT_MAX_SHARD, Item, Plan, make_plan
from k2quant.quant import fp8_block, int4_group
from k2quant.quant.scheme import QuantScheme

#: progress(items_done, source_bytes_done) increments
Progress = Callable[[int, int], None]


@dataclasses.dataclass
class ConvertReport:
    src: str
    dst: str
    source_format: str
    target: str
    tensors_in: int
    tensors_out: int
    bytes_in: int
    bytes_out: int
    shards: int
    seconds: float
    workers: int
    by_class: dict[str, dict[str, int]]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# -- one item ------------------------------------------------------------------------------------
def decode(item: Item, src: source.SourceFormat, device: str = "cpu") -> torch.Tensor:
    """The item's float weight: stored plain weights as they are, quantized ones dequantized to BF16."""
    rep = item.src_rep.rstrip("*")
    if rep == source.FP8:
        winfo = item.part("weight")
        q = shards.read_tensor(winfo).to(device)
        if bool(((q.view(torch.uint8) & 0x7F) == 0x7F).any()):
            raise FormatError(f"{winfo.file}: FP8 weight {winfo.name!r} holds NaN codes (0x7f/0xff); the "
                              f"checkpoint is corrupt: re-download this shard")
        scale = shards.read_tensor(item.part("scale")).to(device)
        return fp8_block.dequantize(q, scale, src.scheme, torch.bfloat16)
    if rep == source.INT4:
        pinfo = item.part("packed")
        shape = tuple(int(d) for d in shards.read_tensor(item.part("shape")).tolist())
        if shape != tuple(item.shape):
            raise FormatError(f"{item.part('shape').file}: {item.part('shape').name!r} says {list(shape)} but "
                              f"the packed codes and scales hold {list(item.shape)}; the checkpoint is inconsistent")
        q = int4_group.unpack(shards.read_tensor(pinfo).to(device), shape[-1])
        scale = shards.read_tensor(item.part("scale")).to(device)
        return int4_group.dequantize(q, scale, src.scheme, torch.bfloat16)
    return shards.read_tensor(item.sources[0][1]).to(device)


def _encode(item: Item, w: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    if not bool(torch.isfinite(w).all()):
        info = item.sources[0][1]
        bad = int((~torch.isfinite(w)).sum())
        raise FormatError(f"{info.file}: weight {item.key}.weight holds {bad} NaN/Inf values and cannot be "
                          f"quantized; fix the source weights or keep this module unquantized with --ignore {item.key}")
    enc = {source.FP8: deepseek_fp8.encode, source.INT4: ct_int4.encode}[item.dst_rep]
    return enc(item.key, w, scheme)


def run_item(item: Item, src: source.SourceFormat, scheme: QuantScheme | None,
             device: str = "cpu") -> dict[str, torch.Tensor]:
    """The output tensors of one item, by name (dtypes and shapes as ``item.entries`` says)."""
    if item.passthrough:
        out = {e.name: shards.read_tensor(info) for e, (_, info) in zip(item.entries, item.sources)}
        return {e.name: out[e.name].to(shards.DTYPES[e.dtype]) for e in item.entries}
    w = decode(item, src, device)
    if item.dst_rep == source.PLAIN:
        return {item.entries[0].name: w.to(shards.DTYPES[item.entries[0].dtype])}
    return _encode(item, w, scheme)


# -- one shard -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShardJob:
    path: Path
    items: tuple[Item, ...]
    src: source.SourceFormat
    scheme: QuantScheme | None
    device: str = "cpu"


def run_shard(job: ShardJob, progress: Progress | None = None) -> tuple[int, int]:
    """Write one output shard (temp name, then rename). Returns ``(items, source bytes)``."""
    entries = [e for it in job.items for e in it.entries]
    writer = shards.ShardWriter(job.path, entries)
    try:
        for it in job.items:
            out = run_item(it, job.src, job.scheme, job.device)
            for e in it.entries:
                writer.write(e.name, out[e.name].cpu())
            if progress:
                progress(1, it.src_bytes)
        writer.commit()
    except OSError as exc:
        writer.abort()
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"{job.path.parent}: disk full while writing {job.path.name}; the partial file was "
                              f"removed and no index was written. Free space (or use another disk) and run again")
        raise OutputError(f"{job.path}: cannot write ({exc.strerror})") from None
    except BaseException:
        writer.abort()
        raise
    return len(job.items), sum(it.src_bytes for it in job.items)


def _init_worker() -> None:
    torch.set_num_threads(1)


# -- output directory ----------------------------------------------------------------------------
def prepare_output(src: Path, dst: Path, need_bytes: int, force: bool) -> None:
    """Refuse unsafe outputs before anything is written; with ``force`` clear old k2quant outputs."""
    s, d = src.resolve(), dst.resolve()
    if d == s or d.is_relative_to(s):
        raise OutputError(f"{dst}: the output directory is the source directory or inside it; the source must "
                          f"never be modified: choose a directory outside {src}")
    if d.exists() and not d.is_dir():
        raise OutputError(f"{dst}: exists and is not a directory; choose a directory path")
    if d.exists() and any(d.iterdir()):
        if not force:
            n = sum(1 for _ in d.iterdir())
            raise OutputError(f"{dst}: output directory is not empty ({n} entries); choose an empty directory "
                              f"or pass --force to replace k2quant outputs in it")
        for p in list(d.glob("*.safetensors")) + list(d.glob("*" + shards.TMP_SUFFIX)) + [d / INDEX]:
            p.unlink(missing_ok=True)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / (".k2q-probe" + shards.TMP_SUFFIX)
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o644))
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{dst}: cannot write to the output directory ({exc.strerror}); choose a writable "
                          f"directory") from None
    free = shutil.disk_usage(d).free
    if free < need_bytes:
        raise OutputError(f"{dst}: not enough free disk: the output needs {need_bytes / 1e9:.2f} GB but "
                          f"{free / 1e9:.2f} GB are free; free space or choose another disk")


def _verify_headers(plan: Plan, dst: Path) -> None:
    """Read every written header back and compare it with the plan (names, dtypes, shapes)."""
    for name, idx in zip(plan.shard_names, plan.shards):
        infos, _ = shards.read_header(dst / name)
        want = [e for i in idx for e in plan.items[i].entries]
        got = [(i.name, i.dtype, i.shape) for i in sorted(infos.values(), key=lambda i: i.start)]
        if got != [(e.name, e.dtype, e.shape) for e in want]:
            raise OutputError(f"{dst / name}: written header does not match the plan; the file is corrupt "
                              f"(disk or filesystem error): run again")


def _copy_other_files(ckpt: Checkpoint, dst: Path) -> None:
    for p in ckpt.other_files():
        out = dst / p.relative_to(ckpt.path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + shards.TMP_SUFFIX)
        shutil.copy2(p, tmp)
        os.replace(tmp, out)


def write_index(plan: Plan, dst: Path) -> None:
    weight_map = {e.name: name for name, idx in zip(plan.shard_names, plan.shards)
                  for i in idx for e in plan.items[i].entries}
    shards.write_json(dst / INDEX, {"metadata": {"total_size": plan.dst_bytes},
                                    "weight_map": dict(sorted(weight_map.items()))})


# -- whole checkpoint ----------------------------------------------------------------------------
def convert(src: str | Path, dst: str | Path, target: str, scheme: QuantScheme | None, *,
            max_shard_size: int = DEFAULT_MAX_SHARD, workers: int = 1, force: bool = False,
            device: str = "cpu", progress: Progress | None = None,
            on_plan: Callable[[Plan], None] | None = None) -> ConvertReport:
    """Convert checkpoint ``src`` into ``dst`` in ``target`` format ("bf16", "fp8", "int4")."""
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    ckpt = Checkpoint(src)
    plan = make_plan(ckpt, target, scheme, max_shard_size)
    prepare_output(src, dst, plan.dst_bytes, force)
    if on_plan:
        on_plan(plan)
    jobs = [ShardJob(dst / name, tuple(plan.items[i] for i in idx), plan.source_format, scheme, device)
            for name, idx in zip(plan.shard_names, plan.shards)]
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            run_shard(job, progress)
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
            futures = {pool.submit(run_shard, job): job for job in jobs}
            for fut in cf.as_completed(futures):
                n, b = fut.result()
                if progress:
                    progress(n, b)
    _verify_headers(plan, dst)
    _copy_other_files(ckpt, dst)
    shards.write_json(dst / CONFIG, plan.config)
    write_index(plan, dst)  # last: its presence marks a complete checkpoint
    return _report(ckpt, plan, dst, time.perf_counter() - t0, workers)


def _report(ckpt: Checkpoint, plan: Plan, dst: Path, seconds: float, workers: int) -> ConvertReport:
    nl = ckpt.config.get("num_hidden_layers")
    by_class: dict[str, dict[str, int]] = {}
    for it in plan.items:
        name = it.key if it.sources[0][0] == "tensor" else it.key + ".weight"
        c = by_class.setdefault(layout.tensor_class(name, nl), {"count": 0, "bytes_in": 0, "bytes_out": 0})
        c["count"] += 1
        c["bytes_in"] += it.src_bytes
        c["bytes_out"] += it.dst_bytes
    return ConvertReport(str(plan.src), str(dst), plan.source_format.name, plan.target,
                         sum(len(it.sources) for it in plan.items), sum(len(it.entries) for it in plan.items),
                         plan.src_bytes, plan.dst_bytes, len(plan.shards), round(seconds, 3), workers,
                         dict(sorted(by_class.items())))
