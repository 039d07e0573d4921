"""Execute a conversion plan: stream tensors shard by shard in row chunks, write atomically, index last.

Memory stays bounded whatever the model size: big tensors are read, converted and written in row
chunks of about ``CHUNK_ELEMS`` elements; small ones are read one item ahead by a prefetch thread
while the current one computes, and a writer thread hashes and writes the output.

Interrupted runs resume (``resume=True``): each finished shard leaves a record (its inputs, sha256,
size) under ``.k2q-state/``; a resumed run keeps shards whose record and hash match and redoes the
rest. Scale-out: rank ``r`` of ``world`` converts shards ``i % world == r``; rank 0 writes the
manifest, config and index once every shard has its record.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import errno
import multiprocessing
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from k2quant.errors import FormatError, OutputError
from k2quant.formats import layout, output, shards, source
from k2quant.formats.checkpoint import Checkpoint
from k2quant.formats.plan import DEFAULT_MAX_SHARD, Item, Plan, make_plan
from k2quant.quant import dispatch, int4_group
from k2quant.quant.scheme import QuantScheme

#: progress(items_done, source_bytes_done) increments
Progress = Callable[[int, int], None]
CHUNK_ELEMS = 1 << 24  # elements per row chunk of a big tensor
PREFETCH_BYTES = 256 << 20  # items up to this size are read whole, one item ahead
RAW_CHUNK = 64 << 20  # passthrough copies move this many bytes at a time


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
    shards_kept: int
    seconds: float
    workers: int
    kernel: str
    rank: int
    world_size: int
    by_class: dict[str, dict[str, int]]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# -- one item ------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Ctx:
    src: source.SourceFormat
    scheme: QuantScheme | None
    ops: dispatch.Ops
    device: str
    calibrated: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # key -> (codes, scale) of GPTQ



class _Reader:
    """Rows of an item's source tensors: from a prefetched copy, or read from disk on demand."""

    def __init__(self, item: Item, data: dict[str, torch.Tensor] | None):
        self.item, self.data = item, data

    def rows(self, role: str, r0: int, r1: int) -> torch.Tensor:
        if self.data is not None:
            return self.data[role][r0:r1]
        return shards.read_rows(self.item.part(role), r0, r1)

    def whole(self, role: str) -> torch.Tensor:
        return self.data[role] if self.data is not None else shards.read_tensor(self.item.part(role))


def prefetch(item: Item) -> dict[str, torch.Tensor] | None:
    """The item's source tensors, whole, when the item is small enough to hold one ahead."""
    if item.src_bytes > PREFETCH_BYTES:
        return None
    return {role: shards.read_tensor(info) for role, info in item.sources}


def _chunks(item: Item, ctx: _Ctx) -> list[tuple[int, int]]:
    n, k = item.shape
    align = 1
    for sch, rep in ((ctx.src.scheme, item.stored_rep), (ctx.scheme, item.dst_rep)):
        if rep == source.FP8:
            align = max(align, sch.block_size[0])  # tiles never split across chunks
    rows = max(align, (CHUNK_ELEMS // max(k, 1)) // align * align)
    return [(r, min(r + rows, n)) for r in range(0, n, rows)]


def _fp8_rows(item: Item, rd: _Reader, ctx: _Ctx, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
    bn = ctx.src.scheme.block_size[0]
    q = rd.rows("weight", r0, r1).to(ctx.device)
    if ctx.ops.count_nonfinite(q):
        w = item.part("weight")
        raise FormatError(f"{w.file}: FP8 weight {w.name!r} holds NaN codes (0x7f/0xff); the checkpoint is "
                          f"corrupt: re-download this shard")
    return q, rd.rows("scale", r0 // bn, -(-r1 // bn)).to(ctx.device).to(torch.float32)


def _decode_rows(item: Item, rd: _Reader, ctx: _Ctx, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of the item's float weight (stored plain as is, quantized ones dequantized to BF16)."""
    rep = item.stored_rep
    if rep == source.FP8:
        return ctx.ops.fp8_decode(*_fp8_rows(item, rd, ctx, r0, r1), ctx.src.scheme)
    if rep == source.INT4:
        packed, scale = rd.rows("packed", r0, r1).to(ctx.device), rd.rows("scale", r0, r1).to(ctx.device)
        return ctx.ops.int4_decode(packed, scale, item.shape[1], ctx.src.scheme)
    role = item.sources[0][0]
    return rd.rows(role, r0, r1).to(ctx.device)


def _check_int4_shape(item: Item, rd: _Reader) -> None:
    shape = tuple(int(d) for d in rd.whole("shape").tolist())
    if shape != tuple(item.shape):
        info = item.part("shape")
        raise FormatError(f"{info.file}: {info.name!r} says {list(shape)} but the packed codes and scales hold "
                          f"{list(item.shape)}; the checkpoint is inconsistent")


def _check_finite(item: Item, w: torch.Tensor, ops: dispatch.Ops) -> None:
    bad = ops.count_nonfinite(w)
    if bad:
        info = item.sources[0][1]
        raise FormatError(f"{info.file}: weight {item.key}.weight holds {bad} NaN/Inf values and cannot be "
                          f"quantized; fix the source weights or keep this module unquantized with --ignore {item.key}")


def _passthrough(item: Item, rd: _Reader) -> Iterator[tuple[str, object]]:
    for entry, (role, info) in zip(item.entries, item.sources):
        if entry.dtype != info.dtype:  # e.g. a BF16 compressed-tensors FP8 scale written as F32 (exact)
            yield entry.name, rd.whole(role).to(shards.DTYPES[entry.dtype])
        elif rd.data is not None:
            yield entry.name, rd.data[role]
        else:
            for off in range(0, info.nbytes, RAW_CHUNK):
                yield entry.name, shards.read_bytes(info, off, min(RAW_CHUNK, info.nbytes - off))


def pieces(item: Item, ctx: _Ctx, data: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, object]]:
    """The item's output as ``(entry name, tensor chunk or raw bytes)`` in write order."""
    rd = _Reader(item, data)
    if item.passthrough:
        yield from _passthrough(item, rd)
        return
    if item.stored_rep == source.INT4:
        _check_int4_shape(item, rd)
    names = [e.name for e in item.entries]
    if item.dst_rep == source.INT4 and ctx.calibrated and item.key in ctx.calibrated:
        q, scale = ctx.calibrated[item.key]  # codes chosen by calibration (GPTQ), not by rounding here
        yield names[0], int4_group.pack(q)
        yield names[1], scale.to(torch.bfloat16)
        yield names[2], torch.tensor(list(item.shape), dtype=torch.int64)
        return
    scales = []
    fused = item.stored_rep == source.FP8 and item.dst_rep == source.INT4
    for r0, r1 in _chunks(item, ctx):
        if fused:
            packed, scale = ctx.ops.fp8_to_int4(*_fp8_rows(item, rd, ctx, r0, r1), ctx.src.scheme, ctx.scheme)
            yield names[0], packed.cpu()
            scales.append(scale.cpu())
            continue
        w = _decode_rows(item, rd, ctx, r0, r1)
        if item.dst_rep == source.PLAIN:
            yield names[0], w.to(shards.DTYPES[item.entries[0].dtype]).cpu()
            continue
        _check_finite(item, w, ctx.ops)
        encode = ctx.ops.fp8_encode if item.dst_rep == source.FP8 else ctx.ops.int4_encode
        q, scale = encode(w, ctx.scheme)
        yield names[0], q.cpu()
        scales.append(scale.cpu())
    if item.dst_rep == source.FP8:
        yield names[1], torch.cat(scales).to(torch.float32)
    elif item.dst_rep == source.INT4:
        yield names[1], torch.cat(scales).to(torch.bfloat16)
        yield names[2], torch.tensor(list(item.shape), dtype=torch.int64)


def run_item(item: Item, src: source.SourceFormat, scheme: QuantScheme | None, device: str = "cpu",
             kernel: str = "reference") -> dict[str, torch.Tensor]:
    """The output tensors of one item, whole, by name (for loaders and tests; convert streams ``pieces``)."""
    ctx = _Ctx(src, scheme, dispatch.ops(kernel, device), device)
    parts: dict[str, list] = {}
    for name, chunk in pieces(item, ctx, prefetch(item)):
        parts.setdefault(name, []).append(chunk)
    return {e.name: _assemble(e, parts.get(e.name, [])) for e in item.entries}


def _assemble(e: shards.Entry, chunks: list) -> torch.Tensor:
    """One entry from its pieces: row chunks of a tensor, or raw byte chunks of a passthrough copy."""
    if chunks and isinstance(chunks[0], torch.Tensor):
        return (chunks[0] if len(chunks) == 1 else torch.cat(chunks)).reshape(e.shape)
    raw = b"".join(chunks)
    if not raw:
        return torch.empty(e.shape, dtype=shards.DTYPES[e.dtype])
    return torch.frombuffer(bytearray(raw), dtype=shards.DTYPES[e.dtype]).reshape(e.shape)


# -- one shard -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShardJob:
    path: Path
    items: tuple[Item, ...]
    src: source.SourceFormat
    scheme: QuantScheme | None
    device: str = "cpu"
    kernel: str = "auto"
    threads: int = 0  # torch/numba threads in a worker process (0: leave as is)
    calibrated: dict | None = None  # key -> (codes, scale) chosen by calibration (in-process runs only)


class _AsyncWriter:
    """A ShardWriter fed from a bounded queue by a thread, so writing overlaps reading and compute."""

    def __init__(self, writer: shards.ShardWriter, depth: int = 4):
        self.writer, self.q = writer, queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.q.get()) is not None:
            if self.error is None:
                try:
                    name, data = job
                    if isinstance(data, torch.Tensor):
                        self.writer.write(name, data)
                    else:
                        self.writer.write_raw(name, data)
                except BaseException as exc:  # re-raised in the producer thread
                    self.error = exc

    def put(self, name: str, data: object) -> None:
        if self.error:
            raise self.error
        self.q.put((name, data))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def run_shard(job: ShardJob, progress: Progress | None = None) -> dict:
    """Write one output shard (temp name, then rename). Returns its record (inputs, sha256, bytes)."""
    if job.threads:
        torch.set_num_threads(job.threads)
    ctx = _Ctx(job.src, job.scheme, dispatch.ops(job.kernel, job.device), job.device, job.calibrated)
    writer = shards.ShardWriter(job.path, [e for it in job.items for e in it.entries])
    out = _AsyncWriter(writer)
    try:
        with cf.ThreadPoolExecutor(1) as reader:
            ahead = reader.submit(prefetch, job.items[0]) if job.items else None
            for i, it in enumerate(job.items):
                data = ahead.result()
                ahead = reader.submit(prefetch, job.items[i + 1]) if i + 1 < len(job.items) else None
                for name, chunk in pieces(it, ctx, data):
                    out.put(name, chunk)
                if progress:
                    progress(1, it.src_bytes)
        out.close()
        sha = writer.commit()
    except OSError as exc:
        _drain(out)
        writer.abort()
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"{job.path.parent}: disk full while writing {job.path.name}; the partial file was "
                              f"removed and no index was written. Free space (or use another disk) and run again")
        raise OutputError(f"{job.path}: cannot write ({exc.strerror})") from None
    except BaseException:
        _drain(out)
        writer.abort()
        raise
    inputs = sorted({info.file.name for it in job.items for _, info in it.sources})
    return {"shard": job.path.name, "inputs": inputs, "sha256": sha, "bytes": job.path.stat().st_size,
            "tensors": sum(len(it.entries) for it in job.items), "items": len(job.items),
            "source_bytes": sum(it.src_bytes for it in job.items)}


def _drain(out: _AsyncWriter) -> None:
    try:
        out.close()
    except BaseException:
        pass


# -- whole checkpoint ----------------------------------------------------------------------------
def convert(src: str | Path, dst: str | Path, target: str, scheme: QuantScheme | None, *,
            max_shard_size: int = DEFAULT_MAX_SHARD, workers: int = 1, force: bool = False,
            resume: bool = False, device: str = "cpu", kernel: str = "auto", rank: int | None = None,
            world_size: int | None = None, wait_timeout: float = 24 * 3600.0,
            progress: Progress | None = None, on_plan: Callable[[Plan], None] | None = None) -> ConvertReport:
    """Convert checkpoint ``src`` into ``dst`` in ``target`` format ("bf16", "fp8", "int4")."""
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    ckpt = Checkpoint(src)
    plan = make_plan(ckpt, target, scheme, max_shard_size)
    ops = dispatch.ops(kernel, device)  # fail early on a bad kernel/device choice
    group = output.Group(rank, world_size, dst, wait_timeout)
    settings = output.run_settings(plan, ckpt)
    state = dst / output.STATE_DIR
    if group.rank == 0:
        output.prepare_output(src, dst, plan.dst_bytes, force, resume)
        kept = output.resume_state(dst, settings, plan) if resume else {}
        output.clean_partial(dst, kept, plan, 0, group.world)
        state.mkdir(exist_ok=True)
        shards.write_json(state / "settings.json", settings)
    # without torchrun, the other ranks wait for rank 0's settings (start rank 0 first when using --force)
    group.barrier(lambda: (state / "settings.json").exists())
    if group.rank != 0:
        kept = output.resume_state(dst, settings, plan) if resume else {}
        output.clean_partial(dst, kept, plan, group.rank, group.world)
    if on_plan:
        on_plan(plan)
    jobs = [ShardJob(dst / name, tuple(plan.items[i] for i in idx), plan.source_format, scheme, device, kernel)
            for j, (name, idx) in enumerate(zip(plan.shard_names, plan.shards))
            if j % group.world == group.rank and name not in kept]
    for rec in _run_jobs(jobs, workers, progress):
        shards.write_json(state / f"{rec['shard']}.json", rec)
    output.verify_headers(plan, dst, [j.path.name for j in jobs])
    group.barrier(lambda: all((state / f"{n}.json").exists() or n in kept for n in plan.shard_names))
    if group.rank == 0:
        output.finish(ckpt, plan, dst, settings, kept)
    return _report(ckpt, plan, dst, time.perf_counter() - t0, workers, ops.name, len(kept), group)


def _run_jobs(jobs: list[ShardJob], workers: int, progress: Progress | None) -> Iterator[dict]:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield run_shard(job, progress)
        return
    threads = max(1, torch.get_num_threads() // workers)
    jobs = [dataclasses.replace(j, threads=threads) for j in jobs]
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(run_shard, job) for job in jobs]
        try:
            for fut in cf.as_completed(futures):
                rec = fut.result()
                if progress:
                    progress(rec["items"], rec["source_bytes"])
                yield rec
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _report(ckpt: Checkpoint, plan: Plan, dst: Path, seconds: float, workers: int, kernel: str, kept: int,
            group: output.Group) -> ConvertReport:
    nl = ckpt.config.get("num_hidden_layers")
    by_class: dict[str, dict[str, int]] = {}
    for it in plan.items:
        c = by_class.setdefault(layout.tensor_class(it.tensor_name, nl), {"count": 0, "bytes_in": 0, "bytes_out": 0})
        c["count"] += 1
        c["bytes_in"] += it.src_bytes
        c["bytes_out"] += it.dst_bytes
    return ConvertReport(str(plan.src), str(dst), plan.source_format.name, plan.target,
                         sum(len(it.sources) for it in plan.items), sum(len(it.entries) for it in plan.items),
                         plan.src_bytes, plan.dst_bytes, len(plan.shards), kept, round(seconds, 3), workers,
                         kernel, group.rank, group.world, dict(sorted(by_class.items())))
