"""The conversion pipeline around the kernels: special values refused in one pass, overlapped reads and
writes that give the sequential run's bytes, and failures in the reader or writer thread."""
import dataclasses
import errno
import json
import os
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import b3
from k2quant.errors import FormatError, OutputError
from k2quant.formats import convert, items, pipeline, shards
from k2quant.formats import plan as plan_mod
from k2quant.formats.checkpoint import INDEX, MANIFEST, Checkpoint
from k2quant.quant import dispatch
from k2quant.quant import scheme as qscheme

EXPERT = "model.layers.2.mlp.experts.3.up_proj"


def shard_of(path, name):
    return path / json.loads((path / INDEX).read_text())["weight_map"][name]


def poisoned(tiny_dirs, tmp_path, fmt, fn):
    """A copy of the tiny ``fmt`` checkpoint with the expert's weight rewritten by ``fn``."""
    src = tmp_path / f"src-{fmt}"
    shutil.copytree(tiny_dirs[fmt], src)
    f = shard_of(src, EXPERT + ".weight")
    sd = load_file(str(f))
    sd[EXPERT + ".weight"] = fn(sd[EXPERT + ".weight"].clone())
    save_file(sd, str(f), metadata={"format": "pt"})
    return src, f


def assert_nothing_complete(out):
    assert not (out / INDEX).exists()
    assert not list(out.glob("*.k2q-tmp"))
    assert not list(out.glob("*.safetensors"))


@pytest.mark.parametrize("kernel", ["auto", "reference"])
@pytest.mark.parametrize("target", ["fp8", "int4"])
def test_nan_inf_in_a_float_weight_is_refused_in_every_direction(tiny_dirs, tmp_path, kernel, target):
    def poison(w):  # [96, 320]: one NaN and one Inf, in different tiles and groups, past the first rows
        w[70, 200] = float("nan")
        w[33, 5] = -float("inf")
        return w

    src, f = poisoned(tiny_dirs, tmp_path, "bf16", poison)
    with pytest.raises(FormatError) as e:
        convert.convert(src, tmp_path / "o", target, qscheme.for_target(target), kernel=kernel)
    assert str(e.value) == (f"{f}: weight {EXPERT}.weight holds 2 NaN/Inf values and cannot be quantized; fix the "
                            f"source weights or keep this module unquantized with --ignore {EXPERT}")
    assert_nothing_complete(tmp_path / "o")


@pytest.mark.parametrize("kernel", ["auto", "reference"])
@pytest.mark.parametrize("target", ["bf16", "int4"])
@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_nan_code_in_an_fp8_weight_is_refused_in_every_direction(tiny_dirs, tmp_path, kernel, target, code):
    def poison(q):  # one E4M3 NaN code deep inside the tensor
        q.view(torch.uint8)[90, 250] = code
        return q

    src, f = poisoned(tiny_dirs, tmp_path, "fp8", poison)
    with pytest.raises(FormatError) as e:
        convert.convert(src, tmp_path / "o", target, qscheme.for_target(target), kernel=kernel)
    assert str(e.value) == (f"{f}: FP8 weight '{EXPERT}.weight' holds NaN codes (0x7f/0xff); the checkpoint is "
                            f"corrupt: re-download this shard")
    assert_nothing_complete(tmp_path / "o")


@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_fp8_scale_that_overflows_bf16_is_refused_for_int4(tiny_dirs, tmp_path, kernel):
    """A finite but absurd tile scale (code x scale beyond BF16's range: Inf, which has no INT4 code) is named,
    by the fused FP8 -> INT4 kernel and by the reference path alike."""
    src = tmp_path / "src-fp8"
    shutil.copytree(tiny_dirs["fp8"], src)
    f = shard_of(src, EXPERT + ".weight_scale_inv")
    sd = load_file(str(f))
    sd[EXPERT + ".weight_scale_inv"][0, 1] = 3e38  # rows 0..127, columns 128..255
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(FormatError) as e:
        convert.convert(src, tmp_path / "o", "int4", qscheme.for_target("int4"), kernel=kernel)
    w = shard_of(src, EXPERT + ".weight")
    assert str(e.value).startswith(f"{w}: FP8 weight '{EXPERT}.weight' times its scales "
                                   f"'{EXPERT}.weight_scale_inv' exceeds BF16's range (Inf) in rows 0..")
    assert_nothing_complete(tmp_path / "o")


# -- overlapped reads, writes and fsyncs -------------------------------------------------------------
SHARD = 700_000  # bytes: several output shards from the tiny checkpoints


def sequential(jobs, progress):
    """The plain order, nothing overlapped across shards: each shard written, fsynced and renamed in turn."""
    for job in jobs:
        yield pipeline.run_shard(job, progress)


def files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize("src,target", [("fp8", "int4"), ("bf16", "fp8"), ("int4", "bf16")])
def test_overlapped_pipeline_writes_the_sequential_bytes(tiny_dirs, tmp_path, monkeypatch, src, target):
    monkeypatch.setattr(shards, "WRITEBACK_BYTES", 4096)  # hand ranges to the disk many times per shard
    scheme = qscheme.for_target(target)
    convert.convert(tiny_dirs[src], tmp_path / "overlapped", target, scheme, max_shard_size=SHARD)
    with monkeypatch.context() as m:
        m.setattr(pipeline, "run_sequential", sequential)
        convert.convert(tiny_dirs[src], tmp_path / "sequential", target, scheme, max_shard_size=SHARD)
    got, want = files(tmp_path / "overlapped"), files(tmp_path / "sequential")
    assert sum(n.endswith(".safetensors") for n in got) >= 3
    assert got == want
    manifest = json.loads(got[MANIFEST])
    for name, rec in manifest["shards"].items():  # the digest computed while writing is the file's
        assert rec["blake3"] == b3(got[name])


@pytest.mark.parametrize("budget,processes", [(0, 1), (800_000, 1), (10**9, 1), (1_600_000, 2)])
def test_the_reader_reads_ahead_while_the_kernels_load(tiny_dirs, tmp_path, monkeypatch, budget, processes):
    """While the kernels load (held back here until the reader has gone quiet), the first shard's items are
    read in order as far as LOAD_READ_AHEAD_BYTES allows (one item at least; split between the worker
    processes that load at once), none past it; no kernel runs before the load ends; and the output is the
    same bytes."""
    src, one_shard = tiny_dirs["bf16"], 10**9
    plan = plan_mod.make_plan(Checkpoint(src), "int4", qscheme.for_target("int4"), one_shard)
    sizes = [plan.items[i].src_bytes for i in plan.shards[0]]
    share = budget // processes
    want = max(1, max(n for n in range(len(sizes) + 1) if sum(sizes[:n]) <= share))  # one item at least
    assert 1 < want < len(sizes) or budget in (0, 10**9)
    assert processes == 1 or sum(sizes[:want + 1]) <= budget  # a single process would have read more
    real_start = pipeline.start_shard
    monkeypatch.setattr(pipeline, "start_shard",
                        lambda job, progress=None: real_start(dataclasses.replace(job, processes=processes), progress))
    monkeypatch.setattr(items, "LOAD_READ_AHEAD_BYTES", budget)
    monkeypatch.setattr(dispatch, "_fast_loaded", [])  # this process's kernels: loaded again, through the stub
    real_prefetch, real_load, real_pieces = items.prefetch, dispatch._load_fast_ops, items.pieces
    read, seen = [], {}

    def prefetch(item):
        read.append(item.src_bytes)
        return real_prefetch(item)

    def load():
        n, t = -1, time.monotonic()
        while len(read) != n or time.monotonic() - t < 0.3:  # until nothing more is read for 0.3 s
            if len(read) != n:
                n, t = len(read), time.monotonic()
            time.sleep(0.01)
        seen["read"] = n
        return real_load()

    def pieces(item, ctx, data=None):
        seen.setdefault("first piece", len(read))
        yield from real_pieces(item, ctx, data)

    monkeypatch.setattr(items, "prefetch", prefetch)
    monkeypatch.setattr(items, "pieces", pieces)
    monkeypatch.setattr(dispatch, "_load_fast_ops", load)
    report = convert.convert(src, tmp_path / "o", "int4", qscheme.for_target("int4"), max_shard_size=one_shard)
    assert report.kernel == "fast"
    assert seen["read"] == want
    assert seen["first piece"] >= want  # the first piece converted after the load, not before
    monkeypatch.undo()
    convert.convert(src, tmp_path / "ref", "int4", qscheme.for_target("int4"), max_shard_size=one_shard)
    assert files(tmp_path / "o") == files(tmp_path / "ref")


@pytest.mark.parametrize("budget", [0, 40_000, 10**9])
def test_the_reader_stays_ahead_within_its_byte_budget(tiny_dirs, tmp_path, monkeypatch, budget):
    """Items read ahead of the one being converted hold at most READ_AHEAD_BYTES (or are a single item); with
    room, the reader gets several items ahead of a slow consumer; and the output is the same bytes."""
    monkeypatch.setattr(items, "READ_AHEAD_BYTES", budget)
    monkeypatch.setattr(items, "LOAD_READ_AHEAD_BYTES", budget)  # the kernels may still be loading at the start
    real_prefetch, real_pieces = items.prefetch, items.pieces
    lock, held, peaks = threading.Lock(), {}, []

    def prefetch(item):
        data = real_prefetch(item)
        with lock:
            held[id(item)] = item.src_bytes
            queued = list(held.values())[1:]  # the oldest is the item being converted (or about to be)
            peaks.append((len(queued), 0 if len(queued) <= 1 else sum(queued)))
        return data

    def pieces(item, ctx, data=None):
        time.sleep(0.002)  # a slow consumer: the reader runs ahead as far as it may
        with lock:
            held.pop(id(item), None)
        yield from real_pieces(item, ctx, data)

    monkeypatch.setattr(items, "prefetch", prefetch)
    monkeypatch.setattr(items, "pieces", pieces)
    convert.convert(tiny_dirs["bf16"], tmp_path / "o", "int4", qscheme.for_target("int4"), max_shard_size=SHARD)
    most_items = max(n for n, _ in peaks)
    assert max(extra for _, extra in peaks) <= budget
    if budget == 0:
        assert most_items == 1
    if budget == 10**9:
        assert most_items > 3
    monkeypatch.undo()
    convert.convert(tiny_dirs["bf16"], tmp_path / "ref", "int4", qscheme.for_target("int4"), max_shard_size=SHARD)
    assert files(tmp_path / "o") == files(tmp_path / "ref")


def assert_no_complete_output(out):
    """No index, no temp file; a shard left behind has its completion record (a resumed run keeps it)."""
    assert not (out / INDEX).exists()
    assert not list(out.glob("*" + shards.TMP_SUFFIX))
    state = out / ".k2q-state"
    for p in out.glob("*.safetensors"):
        rec = json.loads((state / f"{p.name}.json").read_text())
        assert rec["blake3"] == b3(p.read_bytes())


@pytest.mark.parametrize("fail_at", [1, 4, 9])
def test_an_error_in_the_reader_thread_is_raised_once_and_nothing_looks_complete(tiny_dirs, tmp_path, monkeypatch,
                                                                                 fail_at):
    real, calls, threads = items.prefetch, [], set()

    def prefetch(item):
        calls.append(item)
        threads.add(threading.current_thread().name)
        if len(calls) == fail_at:
            raise FormatError(f"{item.key}: planted read error")
        return real(item)

    monkeypatch.setattr(items, "prefetch", prefetch)
    with pytest.raises(FormatError, match="planted read error") as e:
        convert.convert(tiny_dirs["fp8"], tmp_path / "o", "int4", qscheme.for_target("int4"), max_shard_size=SHARD)
    assert e.value.__context__ is None or not isinstance(e.value.__context__, FormatError)
    assert all(t.startswith("k2q-read") for t in threads)
    assert_no_complete_output(tmp_path / "o")


@pytest.mark.parametrize("fail_at", [1, 5, 30])
def test_disk_full_in_the_writer_thread_is_one_error_and_nothing_looks_complete(tiny_dirs, tmp_path, monkeypatch,
                                                                                fail_at):
    real, calls = shards.ShardWriter.write_raw, []

    def write_raw(self, name, data):
        calls.append(threading.current_thread().name)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, data)

    monkeypatch.setattr(shards.ShardWriter, "write_raw", write_raw)
    out = tmp_path / "o"
    with pytest.raises(OutputError) as e:
        convert.convert(tiny_dirs["bf16"], out, "int4", qscheme.for_target("int4"), max_shard_size=SHARD)
    assert str(e.value).startswith(f"{out}: disk full while writing model-0000")
    assert str(e.value).endswith("the partial file was removed and no index was written. Free space (or use "
                                 "another disk) and run again")
    assert all(t.startswith("k2q-write") for t in calls)
    assert_no_complete_output(out)


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_failed_fsync_at_commit_is_one_error_and_nothing_looks_complete(tiny_dirs, tmp_path, monkeypatch, fail_at):
    real, calls = os.fsync, []

    def fsync(fd):
        if threading.current_thread().name.startswith("k2q-write"):
            calls.append(fd)
            if len(calls) == fail_at:
                raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "o"
    with pytest.raises(OutputError, match=r"cannot write \(Input/output error\)"):
        convert.convert(tiny_dirs["fp8"], out, "bf16", None, max_shard_size=SHARD)
    assert len(calls) >= fail_at  # the next shard may be committing already: it is aborted too
    assert_no_complete_output(out)


@pytest.mark.parametrize("cores", [1, 2, 3, 8])
@pytest.mark.parametrize("workers", [1, 2, 4, 16])
@pytest.mark.parametrize("free", [None, 1, 2])
def test_workers_never_oversubscribe_the_cores(monkeypatch, cores, workers, free):
    monkeypatch.setattr(pipeline, "cores", lambda: cores)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    for shards_to_write in (1, 3, 100):
        procs, threads = pipeline.worker_layout(workers, shards_to_write, free)
        assert 1 <= procs <= min(workers, shards_to_write, cores)  # oracle: the machine's cores, as patched
        assert threads >= 1 and procs * threads <= cores
        budget = cores if free is None else min(free, cores)
        assert procs * threads <= max(procs, budget)  # one thread per process at least, else the free cores
        assert threads == max(1, min(8, budget) // procs)


@pytest.mark.parametrize("cores,samples,want", [
    (2, [(0.0, 0.0, 0.0), (1.0, 1.5, 0.5)], 1),   # another process kept one core busy: one left
    (2, [(0.0, 0.0, 0.0), (1.0, 2.0, 2.0)], 2),   # all the busy time was this process's own
    (4, [(0.0, 0.0, 0.0), (2.0, 5.0, 0.0)], 2),   # 2.5 cores busy elsewhere: 1.5 free, rounded
    (2, [(0.0, 0.0, 0.0), (1.0, 9.0, 0.0)], 1),   # busier than the machine: at least one
    (2, [(0.0, 0.0, 0.0), (0.01, 0.02, 0.0)], 2),  # too short a window to tell: every core
])
def test_free_cores_counts_the_other_processes_only(monkeypatch, cores, samples, want):
    monkeypatch.setattr(pipeline, "cores", lambda: cores)
    monkeypatch.setattr(pipeline, "cpu_sample", lambda: samples[-1])
    assert pipeline.free_cores(samples[0]) == want


def test_convert_restores_the_callers_torch_threads(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "free_cores", lambda since: 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        convert.convert(tiny_dirs["fp8"], tmp_path / "o", "int4", qscheme.for_target("int4"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
