"""Reads and writes around the page cache (O_DIRECT): the same bytes and hashes as through it, the ranges that
cannot be read that way, filesystems that refuse it, and failures in the helper threads."""
import errno
import fcntl
import hashlib
import json
import os
import struct
import threading

import pytest
import torch
from safetensors.torch import load_file

from helpers import b3
from k2quant.errors import FormatError, OutputError
from k2quant.formats import convert, shards
from k2quant.formats.checkpoint import INDEX
from k2quant.quant import scheme as qscheme


def direct_works(d):
    """Whether the filesystem holding ``d`` takes O_DIRECT (tmpfs and some others do not)."""
    try:
        fd = os.open(d / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    (d / "probe").unlink()
    return True


@pytest.fixture
def small_stages(monkeypatch):
    """Staging buffers of 8 KiB: a few hundred KB of output crosses many of them and the ring wraps."""
    monkeypatch.setattr(shards, "STAGE_BYTES", 8192)


def tree(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


TENSORS = {"odd": torch.arange(5, dtype=torch.uint8), "a": torch.randn(300, 77).to(torch.bfloat16),
           "b": torch.randn(1000, 33), "c": torch.tensor([1, 2, 3], dtype=torch.int64)}


def write(path, direct, pieces=3):
    """TENSORS written by a ShardWriter, each tensor in ``pieces`` row chunks; returns (sha, writer)."""
    entries = [shards.Entry(n, shards.TAGS[t.dtype], tuple(t.shape)) for n, t in TENSORS.items()]
    w = shards.ShardWriter(path, entries, direct=direct)
    for n, t in TENSORS.items():
        for chunk in t.tensor_split(min(pieces, len(t))):
            w.write(n, chunk)
    return w.commit(), w


@pytest.mark.parametrize("stages", ["default", "small"])
def test_direct_and_buffered_writes_give_the_same_file_and_hash(tmp_path, request, stages):
    if stages == "small":
        request.getfixturevalue("small_stages")
    sha_d, wd = write(tmp_path / "d.safetensors", direct=True)
    sha_b, wb = write(tmp_path / "b.safetensors", direct=False)
    if direct_works(tmp_path):
        assert wd.direct is not None
    assert wb.direct is None
    data = (tmp_path / "d.safetensors").read_bytes()
    assert data == (tmp_path / "b.safetensors").read_bytes()
    want = b3(data)
    assert sha_d == sha_b == want == shards.digest_file(tmp_path / "d.safetensors")
    assert (len(data) > shards.STAGE_BYTES) == (stages == "small")  # several staging buffers, or one
    got = load_file(str(tmp_path / "d.safetensors"))  # the real library reads it (the last block was truncated)
    assert all(torch.equal(got[n], t) for n, t in TENSORS.items())
    assert not list(tmp_path.glob("*.k2q-tmp"))


def test_direct_reads_equal_buffered_reads_at_any_offset(tmp_path, monkeypatch):
    """The 5-byte tensor first puts every later one off any block boundary (and the int64 one off its own
    element size)."""
    write(tmp_path / "x.safetensors", direct=False)
    infos, _ = shards.read_header(tmp_path / "x.safetensors")
    monkeypatch.setattr(shards, "DIRECT_READ_MIN", 1)
    assert any(i.start % shards.DIRECT_ALIGN for i in infos.values())
    for info in infos.values():
        for off, n in ((0, info.nbytes), (info.nbytes // 3, info.nbytes // 2), (info.nbytes - 1, 1)):
            assert bytes(shards.read_view(info, off, n)) == bytes(shards.read_bytes(info, off, n)), (info.name, off)
        assert torch.equal(shards.read_tensor(info), TENSORS[info.name])


def test_a_file_cut_short_is_reported_by_the_direct_reader(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    write(path, direct=False)
    infos, _ = shards.read_header(path)
    os.truncate(path, infos["b"].start + 100)  # after the header was read: the file shrinks under the reader
    monkeypatch.setattr(shards, "DIRECT_READ_MIN", 1)
    if not direct_works(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    with pytest.raises(FormatError, match=r"x.safetensors: tensor 'b' is cut short \(file truncated while reading\)"):
        shards.read_view(infos["b"])


@pytest.mark.parametrize("target", ["bf16", "fp8", "int4"])
def test_every_direction_writes_the_same_bytes_around_and_through_the_page_cache(tiny_dirs, tmp_path, monkeypatch,
                                                                                 small_stages, target):
    for fmt in ("bf16", "fp8", "int4"):
        if fmt == target:
            continue
        monkeypatch.setattr(shards, "DIRECT_IO", False)
        convert.convert(tiny_dirs[fmt], tmp_path / f"{fmt}-b", target, qscheme.for_target(target), max_shard_size=300_000)
        monkeypatch.setattr(shards, "DIRECT_IO", True)
        monkeypatch.setattr(shards, "DIRECT_READ_MIN", 1)  # every tensor read around the page cache too
        convert.convert(tiny_dirs[fmt], tmp_path / f"{fmt}-d", target, qscheme.for_target(target), max_shard_size=300_000)
        monkeypatch.setattr(shards, "DIRECT_READ_MIN", 1 << 20)
        a, b = tree(tmp_path / f"{fmt}-b"), tree(tmp_path / f"{fmt}-d")
        assert len([n for n in a if n.endswith(".safetensors")]) > 1
        assert a == b, fmt


def test_a_filesystem_that_refuses_o_direct_gets_buffered_io(tiny_dirs, tmp_path, monkeypatch):
    real_fcntl, real_open, refused = fcntl.fcntl, os.open, []

    def no_direct_fcntl(fd, cmd, arg=0):
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            refused.append("fcntl")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, cmd, arg)

    def no_direct_open(path, flags, *a, **k):
        if flags & os.O_DIRECT:
            refused.append("open")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **k)

    convert.convert(tiny_dirs["fp8"], tmp_path / "ref", "int4", qscheme.for_target("int4"))
    monkeypatch.setattr(shards.fcntl, "fcntl", no_direct_fcntl)
    monkeypatch.setattr(shards.os, "open", no_direct_open)
    monkeypatch.setattr(shards, "DIRECT_READ_MIN", 1)
    convert.convert(tiny_dirs["fp8"], tmp_path / "o", "int4", qscheme.for_target("int4"))
    assert {"fcntl", "open"} <= set(refused)
    assert tree(tmp_path / "o") == tree(tmp_path / "ref")


@pytest.mark.parametrize("fail_at", [1, 4, 40])
def test_disk_full_in_the_direct_write_thread_is_one_error_and_nothing_looks_complete(tiny_dirs, tmp_path, monkeypatch,
                                                                                      small_stages, fail_at):
    if not direct_works(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    real, calls = shards._pwrite_all, []

    def pwrite_all(fd, view, offset):
        calls.append(threading.current_thread().name)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, view, offset)

    monkeypatch.setattr(shards, "_pwrite_all", pwrite_all)
    out = tmp_path / "o"
    with pytest.raises(OutputError) as e:
        convert.convert(tiny_dirs["bf16"], out, "int4", qscheme.for_target("int4"), max_shard_size=300_000)
    assert str(e.value).startswith(f"{out}: disk full while writing model-0000")
    assert all(t.startswith("k2q-direct") for t in calls)
    assert not (out / INDEX).exists() and not list(out.glob("*.k2q-tmp"))
    for p in out.glob("*.safetensors"):  # a shard finished before the failure stays, with its record (resume keeps it)
        rec = json.loads((out / ".k2q-state" / f"{p.name}.json").read_text())
        assert rec["blake3"] == b3(p.read_bytes())


def test_the_last_block_is_padded_on_disk_and_truncated(tmp_path):
    """Whatever the length, the file ends exactly at the last tensor byte (no padding left behind)."""
    sha, _ = write(tmp_path / "x.safetensors", direct=True)
    data = (tmp_path / "x.safetensors").read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    assert len(data) == 8 + hlen + sum(t.numel() * t.element_size() for t in TENSORS.values())
    assert len(data) % shards.DIRECT_ALIGN  # this file's length is not a multiple of the block


def test_a_record_matches_by_blake3_or_by_an_earlier_versions_sha256(tmp_path, small_stages):
    """Resume and verify read records of both kinds (BLAKE3, and an earlier version's sha256); a changed byte
    fails both, and a record with neither fails."""
    path = tmp_path / "x.safetensors"
    write(path, direct=True)
    data = path.read_bytes()
    new = {"blake3": b3(data)}
    old = {"sha256": hashlib.sha256(data).hexdigest()}
    assert shards.file_matches(path, new) and shards.file_matches(path, old)
    assert not shards.file_matches(path, {"blake3": old["sha256"]}) and not shards.file_matches(path, {})
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert not shards.file_matches(path, new) and not shards.file_matches(path, old)
