"""Execute a conversion plan: stream tensors shard by shard in row chunks, write atomically, index last.

Memory stays bounded whatever the model size: big tensors are read, converted and written in row
chunks of about ``items.CHUNK_ELEMS`` elements; each shard goes through ``pipeline`` (read ahead, convert,
write behind, fsync overlapped with the next shard), with threads sized to the cores left free.

Interrupted runs resume (``resume=True``): each finished shard leaves a record (its inputs, digest,
size) under ``.k2q-state/``; a resumed run keeps shards whose record and hash match and redoes the
rest. Scale-out: rank ``r`` of ``world`` converts shards ``i % world == r``; rank 0 writes the
manifest, config and index once every shard has its record.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import multiprocessing
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from k2quant.errors import OutputError
from k2quant.formats import arch, output, pipeline, shards
from k2quant.formats.checkpoint import Checkpoint
from k2quant.formats.plan import DEFAULT_MAX_SHARD, Plan, make_plan
from k2quant.quant import dispatch
from k2quant.quant.scheme import QuantScheme

#: progress(items_done, source_bytes_done) increments
Progress = pipeline.Progress


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
    remote_code_skipped: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# -- whole checkpoint ----------------------------------------------------------------------------
def convert(src: str | Path, dst: str | Path, target: str, scheme: QuantScheme | None, *,
            max_shard_size: int = DEFAULT_MAX_SHARD, workers: int = 1, force: bool = False,
            resume: bool = False, device: str = "cpu", kernel: str = "auto", rank: int | None = None,
            world_size: int | None = None, wait_timeout: float = 24 * 3600.0,
            progress: Progress | None = None, on_plan: Callable[[Plan], None] | None = None,
            trust_remote_code: bool = False, on_wait: Callable[[str], None] | None = None) -> ConvertReport:
    """Convert checkpoint ``src`` into ``dst`` in ``target`` format ("bf16", "fp8", "int4").

    ``trust_remote_code`` carries the source's ``*.py`` files (code loaders run); without it they are left out.
    """
    t0, cpu0 = time.perf_counter(), pipeline.cpu_sample()
    src, dst = Path(src), Path(dst)
    _check_counts(workers, world_size, rank, max_shard_size)
    ckpt = Checkpoint(src)
    plan = make_plan(ckpt, target, scheme, max_shard_size)
    _check_device(device)
    if kernel != "auto":
        dispatch.ops(kernel, device)  # fail early on a bad kernel/device choice (auto never fails)
    carried = ckpt.other_files(remote_code=trust_remote_code)  # every carried file checked before writing
    skipped = [] if trust_remote_code else [p.relative_to(ckpt.path).as_posix() for p in ckpt.remote_code_files()]
    group = output.Group(rank, world_size, dst, wait_timeout, on_wait)
    settings = output.run_settings(plan, ckpt)
    state = dst / output.STATE_DIR
    lock = output.Lock(dst, group.rank)
    try:
        kept = _start(src, dst, plan, settings, group, lock, force, resume, ckpt, carried)
        if on_plan:
            on_plan(plan)
        jobs = [pipeline.ShardJob(dst / name, tuple(plan.items[i] for i in idx), plan.source_format, scheme, device, kernel)
                for j, (name, idx) in enumerate(zip(plan.shard_names, plan.shards))
                if j % group.world == group.rank and name not in kept]
        records = _run_jobs(jobs, workers, progress, pipeline.free_cores(cpu0))  # sampled over the plan
        kernels = None  # the name the shards' converting processes report: no kernel load here for it
        try:
            for rec in records:
                kernels = rec.pop(pipeline.KERNELS_KEY)
                shards.write_json(state / f"{rec['shard']}.json", rec)
        finally:
            records.close()
        output.verify_headers(plan, dst, [j.path.name for j in jobs])
        group.barrier(lambda: output.all_recorded(dst, plan, kept, group.rank), f"every rank's shard records in {state}")
        if group.rank == 0:
            output.finish(ckpt, plan, dst, settings, kept, carried)
    finally:
        lock.release()
    # this process names the kernels itself only when it converted nothing (every shard kept, or another rank's)
    kernels = kernels or dispatch.ops(kernel, device).name
    report = _report(ckpt, plan, dst, time.perf_counter() - t0, workers, kernels, len(kept), group)
    report.remote_code_skipped = skipped
    return report


def _check_device(device: str) -> None:
    """A device torch can name and this build can use, before anything is read or written."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise OutputError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else \
            "a torch build without CUDA or no visible GPU"
        raise OutputError(f"--device {device!r}: this machine has {have}; use --device cpu, or install a CUDA "
                          f"build of torch")
    if dev.type not in ("cpu", "cuda"):
        raise OutputError(f"--device {device!r}: k2quant runs on cpu or cuda")


def _check_counts(workers: int, world_size: int | None, rank: int | None, max_shard_size: int) -> None:
    problems = []
    if type(workers) is not int or workers < 1:
        problems.append(f"--workers {workers}: must be at least 1")
    if world_size is not None and world_size < 1:
        problems.append(f"--world-size {world_size}: must be at least 1")
    if rank is not None and rank < 0:
        problems.append(f"--rank {rank}: must be 0 or more")
    if max_shard_size < 1:
        problems.append(f"--max-shard-size {max_shard_size}: must be at least 1 byte (e.g. 5GB)")
    if problems:
        raise OutputError("; ".join(problems))


def _start(src: Path, dst: Path, plan: Plan, settings: dict, group: output.Group, lock: output.Lock, force: bool,
           resume: bool, ckpt: Checkpoint, carried: list[Path]) -> dict[str, dict]:
    """Take DST for this run: rank 0 prepares it and records the settings; every other rank waits for them and
    refuses to join a run whose settings differ from its own."""
    state = dst / output.STATE_DIR
    run = {"settings": settings, "world_size": group.world}
    if group.rank == 0:
        if dst.is_dir():
            lock.acquire()
        output.prepare_output(src, dst, plan.dst_bytes, force, resume, output.written_files(plan, ckpt, carried))
        if not lock.held:
            lock.acquire()
        kept = output.resume_state(dst, settings, plan) if resume else {}
        output.clean_partial(dst, kept, plan, 0, group.world)
        state.mkdir(exist_ok=True)
        shards.write_json(state / "run.json", run)
        shards.write_json(state / "settings.json", settings)
    # without torchrun, the other ranks wait for rank 0's settings (start rank 0 first when using --force)
    group.barrier(lambda: (state / "settings.json").exists(),
                  f"rank 0 to start the run (it writes {state / 'settings.json'})", first=True)
    if group.rank != 0:
        lock.acquire()
        output.check_joined_run(dst, run)
        kept = output.resume_state(dst, settings, plan) if resume else {}
        output.clean_partial(dst, kept, plan, group.rank, group.world)
    return kept


def _run_jobs(jobs: list[pipeline.ShardJob], workers: int, progress: Progress | None,
              free: int | None = None) -> Iterator[dict]:
    workers, threads = pipeline.worker_layout(workers, len(jobs), free)
    if workers <= 1:
        with pipeline.torch_threads(threads):
            yield from pipeline.run_sequential(jobs, progress)
        return
    jobs = [dataclasses.replace(j, threads=threads, processes=workers) for j in jobs]
    ctx = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)
    futures: list[cf.Future] = []
    try:
        with _signals_deferred():  # submit spawns the workers
            futures = [pool.submit(pipeline.run_shard, job) for job in jobs]
        for fut in cf.as_completed(futures):
            rec = fut.result()
            if progress:
                progress(rec["items"], rec["source_bytes"])
            yield rec
    except BaseException:  # Ctrl-C, SIGTERM, a failed shard, or the consumer stopped: stop every worker now
        _stop(pool, futures, jobs)
        raise
    pool.shutdown()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while workers are spawned, then deliver them.

    Interrupted half-way through a spawn, a worker reads truncated start-up data and prints a traceback.
    SIGINT is blocked, so the workers start with it blocked (the mask survives exec) and a Ctrl-C sent to
    the whole group stays pending in them until ``_worker_init`` ignores it; the parent records both
    signals and re-raises them afterwards, so its own handlers (the CLI's: stop everything) run then.
    """
    main = threading.current_thread() is threading.main_thread()
    got: list[int] = []
    old = {s: signal.signal(s, lambda n, f: got.append(n)) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        for s, h in old.items():
            signal.signal(s, h)
        for s in dict.fromkeys(got):
            signal.raise_signal(s)


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group: the parent alone handles it (and stops the workers), so a
    # worker never dies half-way inside the executor's machinery
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # discards a Ctrl-C pending since the spawn
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _stop(pool: cf.ProcessPoolExecutor, futures: list[cf.Future], jobs: list[pipeline.ShardJob]) -> None:
    """Terminate the workers, wait for them briefly, and remove every temp file they may have left.

    Futures are not cancelled one by one: the executor marks them all broken when its workers die, and
    (Python 3.11) raises InvalidStateError in its own thread for a future cancelled before that."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
    pool.shutdown(wait=True)
    for job in jobs:
        job.path.with_name(job.path.name + shards.TMP_SUFFIX).unlink(missing_ok=True)


def _report(ckpt: Checkpoint, plan: Plan, dst: Path, seconds: float, workers: int, kernel: str, kept: int,
            group: output.Group) -> ConvertReport:
    a = arch.from_config(ckpt.config)
    by_class: dict[str, dict[str, int]] = {}
    for it in plan.items:
        c = by_class.setdefault(a.report_class(it.tensor_name), {"count": 0, "bytes_in": 0, "bytes_out": 0})
        c["count"] += 1
        c["bytes_in"] += it.src_bytes
        c["bytes_out"] += it.dst_bytes
    return ConvertReport(str(plan.src), str(dst), plan.source_format.name, plan.target,
                         sum(len(it.sources) for it in plan.items), sum(len(it.entries) for it in plan.items),
                         plan.src_bytes, plan.dst_bytes, len(plan.shards), kept, round(seconds, 3), workers,
                         kernel, group.rank, group.world, dict(sorted(by_class.items())))
