"""The shard pipeline: one output shard read, converted and written with reading, compute, writing and the
fsync overlapped; and the threads a run may use.

A reader thread reads items ahead while the kernels convert the current one; a writer thread hashes and
writes the pieces (``shards.ShardWriter``: around the page cache where it can), fsyncs the shard while the
next one is computed, and renames it into place once released: in order, each after the previous one's
record. Memory stays bounded: items read ahead up to ``items.READ_AHEAD_BYTES`` (one at least, each at most
``items.PREFETCH_BYTES``), four queued pieces a shard, two shards in flight.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import errno
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from k2quant.errors import OutputError
from k2quant.formats import items, shards, source
from k2quant.formats.plan import Item
from k2quant.quant import dispatch
from k2quant.quant.scheme import QuantScheme

#: progress(items_done, source_bytes_done) increments
Progress = Callable[[int, int], None]


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
    processes: int = 1  # processes converting shards at once: they share the read-ahead while kernels load


class _AsyncWriter:
    """A ShardWriter fed from a bounded queue by a thread, which also fsyncs it and, once released, renames it
    into place: writing and the fsync overlap reading and compute, of this shard and of the next one."""

    def __init__(self, writer: shards.ShardWriter, depth: int = 4):
        self.writer, self.q = writer, queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.digest: str | None = None
        self.released, self.commit = threading.Event(), False
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"k2q-write {writer.path.name}")
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
        try:
            if self.error is None:
                self.writer.sync()  # the fsync, before the release: it overlaps the next shard's compute
            self.released.wait()
            if self.commit and self.error is None:
                self.digest = self.writer.commit()
                return
        except BaseException as exc:
            self.error = self.error or exc
        self.writer.abort()

    def put(self, name: str, data: object) -> None:
        if self.error:
            raise self.error
        self.q.put((name, data))

    def finish(self) -> None:
        """No more data: the thread writes what is queued and fsyncs, then waits for ``release``."""
        self.q.put(None)

    def release(self, commit: bool) -> None:
        """Let the thread rename the file into place (``commit``), or remove it."""
        self.commit = commit
        self.released.set()

    def result(self) -> str:
        """Wait for the thread; the digest of the committed file, or the thread's error (the file removed)."""
        self.thread.join()
        if self.error:
            raise self.error
        assert self.digest is not None
        return self.digest


#: the record key naming the kernels that converted the shard ("fast", "reference"): for the report, popped before
#: the record is written (the records on disk, which --resume compares, do not change with it)
KERNELS_KEY = "_kernels"


class _Shard:
    """One output shard in flight: every piece computed and queued; its writer thread still writing and
    fsyncing. It appears under its name only once ``release``d; ``record()`` waits for that."""

    def __init__(self, job: ShardJob, out: _AsyncWriter, kernels: str):
        self.job, self.out, self.kernels = job, out, kernels

    def release(self) -> None:
        self.out.release(commit=True)

    def record(self) -> dict:
        job = self.job
        try:
            digest = self.out.result()
        except OSError as exc:
            raise _output_error(job, exc) from None
        inputs = sorted({info.file.name for it in job.items for _, info in it.sources})
        return {"shard": job.path.name, "inputs": inputs, shards.DIGEST_KEY: digest, "bytes": job.path.stat().st_size,
                "tensors": sum(len(it.entries) for it in job.items), "items": len(job.items),
                "source_bytes": sum(it.src_bytes for it in job.items), KERNELS_KEY: self.kernels}

    def abort(self) -> None:
        """Give the shard up: its temp file is removed, or, if it was already renamed, the file (no record of it
        was written, so it would not be kept anyway)."""
        if not self.out.released.is_set():
            self.out.release(commit=False)  # the thread removes the temp file
            self.out.thread.join()
            return
        try:
            self.out.result()
        except BaseException:  # noqa: BLE001 - the caller is already raising the first error
            return
        self.job.path.unlink(missing_ok=True)


def _output_error(job: ShardJob, exc: OSError) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"{job.path.parent}: disk full while writing {job.path.name}; the partial file was "
                           f"removed and no index was written. Free space (or use another disk) and run again")
    return OutputError(f"{job.path}: cannot write ({exc.strerror})")


class _ReadAhead:
    """The items' source tensors, read in order by one reader thread that keeps up to ``items.READ_AHEAD_BYTES``
    (at least one item) read ahead of the consumer: the disk stays busy while the kernels work. While the
    kernels still load (``dispatch.ready``), it reads up to ``items.LOAD_READ_AHEAD_BYTES`` ahead instead."""

    def __init__(self, reader: cf.ThreadPoolExecutor, todo: tuple[Item, ...]):
        self.reader, self.todo = reader, todo
        self.queued: collections.deque[tuple[int, cf.Future]] = collections.deque()
        self.held = self.pos = 0

    def fill(self, limit: int | None = None) -> None:
        limit = items.READ_AHEAD_BYTES if limit is None else limit
        while self.pos < len(self.todo):
            it = self.todo[self.pos]
            size = it.src_bytes if it.src_bytes <= items.PREFETCH_BYTES else 0  # bigger ones are read on demand
            if self.queued and self.held + size > limit:
                return
            self.queued.append((size, self.reader.submit(items.prefetch, it)))
            self.held += size
            self.pos += 1

    def next(self) -> dict[str, torch.Tensor] | None:
        self.fill()
        size, fut = self.queued.popleft()
        data = fut.result()
        self.held -= size
        self.fill()
        return data


def start_shard(job: ShardJob, progress: Progress | None = None) -> _Shard:
    """Read, convert and queue every piece of one shard (temp name); its writer thread writes and fsyncs it,
    and renames it once the returned shard is released. Reading starts before the kernels are loaded: loaded
    in a thread from the start of the run instead, they held the GIL while the run set up its output, which then
    took 0.3 s instead of 0.05 and the first read started later (measured)."""
    if job.threads:
        torch.set_num_threads(job.threads)
    writer = shards.ShardWriter(job.path, [e for it in job.items for e in it.entries])
    out = _AsyncWriter(writer)
    try:
        with cf.ThreadPoolExecutor(1, thread_name_prefix="k2q-read") as reader:
            ahead = _ReadAhead(reader, job.items)
            if not dispatch.ready(job.kernel, job.device):
                # the disk works while the kernels load (next line); N worker processes load at once and
                # split the budget, so that peak memory does not grow with --workers
                ahead.fill(items.LOAD_READ_AHEAD_BYTES // max(1, job.processes))
            ctx = items.Ctx(job.src, job.scheme, dispatch.ops(job.kernel, job.device), job.device, job.calibrated)
            for it in job.items:
                data = ahead.next()
                for name, chunk in items.pieces(it, ctx, data):
                    out.put(name, chunk)
                if progress:
                    progress(1, it.src_bytes)
    except BaseException as exc:
        out.finish()
        out.release(commit=False)
        _quiet(out)
        if isinstance(exc, OSError):
            raise _output_error(job, exc) from None
        raise
    out.finish()
    return _Shard(job, out, ctx.ops.name)


def run_shard(job: ShardJob, progress: Progress | None = None) -> dict:
    """Write one output shard (temp name, then rename). Returns its record (inputs, digest, bytes)."""
    shard = start_shard(job, progress)
    shard.release()
    return shard.record()


def _quiet(out: _AsyncWriter) -> None:
    try:
        out.result()
    except BaseException:  # noqa: BLE001 - the error being raised is the one to report
        pass


def run_sequential(jobs: list[ShardJob], progress: Progress | None) -> Iterator[dict]:
    """Shard after shard in this process; a shard's last writes and fsync overlap the next one's compute.

    Shards still appear in order, each only after the previous one's record is written (the consumer takes
    it before this generator goes on). On any error every shard in flight is given up (``_Shard.abort``)."""
    prev: _Shard | None = None  # released: renaming into place
    cur: _Shard | None = None  # computed: writing and fsyncing
    try:
        for job in jobs:
            cur = start_shard(job, progress)
            if prev is not None:
                rec, prev = prev.record(), None
                yield rec
            cur.release()
            prev, cur = cur, None
        if prev is not None:
            rec, prev = prev.record(), None
            yield rec
    except BaseException:
        for shard in (prev, cur):
            if shard is not None:
                shard.abort()
        raise


# -- threads ---------------------------------------------------------------------------------------
def cores() -> int:
    """The CPU cores this process may run on (its affinity mask; a container's cpuset included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_sample() -> tuple[float, float, float] | None:
    """(wall s, busy CPU s of the whole machine, this process's CPU s) now; None where /proc/stat is not."""
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:8]]  # user nice system idle iowait irq softirq
    except (OSError, ValueError):
        return None
    own = os.times()
    return time.monotonic(), (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def free_cores(since: tuple[float, float, float] | None) -> int:
    """Cores other processes left free since the ``cpu_sample()`` ``since`` (this process's own use not counted).

    A thread on a core another process keeps busy waits a scheduler slice at every parallel call; the kernels
    then run slower on two threads than on one (measured: 7 vs 12 ms per 2048x7168 FP8 decode)."""
    now = cpu_sample()
    if since is None or now is None or now[0] - since[0] < 0.05:  # too short to tell: assume all free
        return cores()
    others = ((now[1] - since[1]) - (now[2] - since[2])) / (now[0] - since[0])  # cores busy elsewhere
    return max(1, min(cores(), int(cores() - others + 0.5)))


def worker_layout(workers: int, shards_to_write: int, free: int | None = None) -> tuple[int, int]:
    """(processes, threads each) for ``--workers``: never more processes than cores, nor more threads in all
    than the free cores (``free``, default all) or one per process.

    Each worker process loads torch and the kernels again (~2 s) and the kernels already use every core
    in one process, so extra processes pay only where the work per shard dwarfs that start-up."""
    n = max(1, min(workers, shards_to_write, cores()))
    budget = min(torch.get_num_threads(), cores(), cores() if free is None else free)
    return n, max(1, budget // n)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with at most ``n`` torch (and so kernel) threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    if n < before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
