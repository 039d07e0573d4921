"""safetensors files: a validating header reader, a pread tensor reader, a streaming atomic writer.

The reader parses headers itself so a truncated or corrupt file is reported with its name and
the fix, and reads each tensor with one ``pread`` (no mmap: resident memory stays one tensor).
The writer knows every tensor's dtype and shape up front, writes the header first and then each
tensor's bytes as it is produced, to a temp name renamed into place on ``commit``.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import stat
import struct
from pathlib import Path

import blake3
import numpy as np
import torch

from k2quant.errors import FormatError, OutputError

#: safetensors dtype tag -> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TAGS: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
TMP_SUFFIX = ".k2q-tmp"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype tag, shape and absolute byte range."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


ITEMSIZE: dict[str, int] = {tag: torch.empty((), dtype=dt).element_size() for tag, dt in DTYPES.items()}


def itemsize(tag: str) -> int:
    return ITEMSIZE[tag]  # a table: headers of 100k+ tensors call this per tensor


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: ``({name: TensorInfo}, metadata)``.

    Refuses what the safetensors library refuses (offsets that are not contiguous from 0 to the end of the
    file, duplicate names, metadata that is not strings) and what k2quant cannot convert (no tensors, more
    than ``MAX_TENSORS``), with bounded cost: the tensor count is checked before the JSON is parsed.
    """
    path = Path(path)
    fix = "re-download or re-copy this file"
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{path}: is {_kind(st.st_mode)}, not a safetensors file; remove it or replace it "
                              f"with the shard")
        size = st.st_size
        if size < 8:
            raise FormatError(f"{path}: truncated safetensors file ({size} bytes, no header length); {fix}")
        with open(path, "rb") as fh:
            (hlen,) = struct.unpack("<Q", fh.read(8))
            if hlen > MAX_HEADER or 8 + hlen > size:
                raise FormatError(
                    f"{path}: corrupt or truncated safetensors header: header length {hlen} but the file "
                    f"has {size} bytes; {fix}")
            raw = fh.read(hlen)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror}); {fix}") from None
    if raw.count(b'"data_offsets"') > MAX_TENSORS:
        raise FormatError(f"{path}: header lists more than {MAX_TENSORS} tensors; k2quant reads at most "
                          f"{MAX_TENSORS} per shard (Kimi K2 has ~3,000): re-shard the checkpoint")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise FormatError(f"{path}: corrupt safetensors header (not valid JSON: {why}); {fix}") from None
    metadata = header.pop("__metadata__", None)  # null = none, as the safetensors library reads it
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings, found {metadata!r:.80}; {fix}")
    infos, problems = _entries(path, header, 8 + hlen, size, fix)
    if not problems:
        problems = _check_coverage(path, infos, 8 + hlen, size, fix)
    if problems:
        from k2quant.errors import collect
        collect(problems)
    return infos, metadata


MAX_TENSORS = 200_000  # per shard: Kimi K2 has ~2,200 per shard, ~140,000 in all; inspect takes ~0.2 ms each


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return out


def _is_int(v: object) -> bool:
    return type(v) is int


def _entries(path: Path, header: dict, base: int, size: int, fix: str) -> tuple[dict[str, TensorInfo], list[str]]:
    infos: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for name, ent in header.items():
        ok = isinstance(ent, dict) and isinstance(ent.get("dtype"), str) and isinstance(ent.get("shape"), list) \
            and isinstance(ent.get("data_offsets"), list) and len(ent["data_offsets"]) == 2 \
            and all(_is_int(d) and d >= 0 for d in ent["shape"] + ent["data_offsets"])
        if not ok:
            problems.append(f"{path}: tensor {name!r} has a malformed header entry {ent!r:.120} (expected dtype, "
                            f"shape of non-negative integers, data_offsets [start, end]); {fix}")
            continue
        tag, shape, (start, end) = ent["dtype"], tuple(ent["shape"]), ent["data_offsets"]
        if tag not in DTYPES:
            problems.append(
                f"{path}: tensor {name!r} has dtype {tag!r}, which k2quant does not handle; expected one of "
                f"{sorted(DTYPES)}; convert that tensor to a supported dtype first")
            continue
        n = 1
        for d in shape:
            n *= d
        if end - start != n * itemsize(tag):
            problems.append(f"{path}: tensor {name!r} spans bytes {start}..{end} but {tag}{list(shape)} "
                            f"needs {n * itemsize(tag)}; the header is corrupt; {fix}")
            continue
        if base + end > size:
            problems.append(f"{path}: tensor {name!r} ends at byte {base + end} but the file has only {size} "
                            f"bytes (truncated file or corrupt header); {fix}")
            continue
        infos[name] = TensorInfo(name, path, tag, shape, base + start, base + end)
    if not header and not problems:
        problems.append(f"{path}: holds no tensors; a shard of a checkpoint holds at least one: {fix}")
    return infos, problems


def _check_coverage(path: Path, infos: dict[str, TensorInfo], base: int, size: int, fix: str) -> list[str]:
    """Tensors must tile the data area exactly, in offset order, as the safetensors library requires."""
    pos = base
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if info.start != pos:
            what = "overlaps the tensor before it" if info.start < pos else "leaves a gap after the tensor before it"
            return [f"{path}: tensor {info.name!r} starts at data offset {info.start - base}, expected {pos - base}: "
                    f"it {what}; the safetensors library refuses such a file; {fix}"]
        pos = info.end
    if pos != size:
        return [f"{path}: tensors end at data offset {pos - base} but the file holds {size - base} data bytes; the "
                f"safetensors library refuses such a file (shifted offsets, truncated or padded file); {fix}"]
    return []


#: read big tensors and write shards with O_DIRECT (writes through aligned staging buffers) where the
#: filesystem takes it. Measured on this project's machines (2 cores, virtual disk): 2 GB written at 1.7 GB/s
#: for 0.12 CPU-seconds, against 0.3-0.6 GB/s for 3-6 CPU-seconds through the page cache plus fsync. The CPU
#: the page cache costs is CPU the kernels lose. Where O_DIRECT is refused (tmpfs, some network filesystems),
#: reads and writes go through the page cache.
DIRECT_IO = hasattr(os, "O_DIRECT") and hasattr(fcntl, "F_SETFL")
DIRECT_ALIGN = 4096  # file offsets, lengths and buffer addresses: a multiple of any disk's logical block


def aligned_empty(nbytes: int, align: int = DIRECT_ALIGN) -> np.ndarray:
    """An uninitialised uint8 array whose first byte sits at a multiple of ``align``."""
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = -raw.ctypes.data % align
    return raw[off:off + nbytes]


def read_bytes(info: TensorInfo, offset: int = 0, n: int | None = None) -> bytearray:
    """``n`` bytes of the tensor's data from ``offset`` (relative to the tensor), one pread loop."""
    n = info.nbytes - offset if n is None else n
    buf = bytearray(n)
    fd = os.open(info.file, os.O_RDONLY)
    try:
        _pread_all(fd, memoryview(buf), info.start + offset, info)
    finally:
        os.close(fd)
    return buf


def _cut_short(info: TensorInfo) -> FormatError:
    return FormatError(f"{info.file}: tensor {info.name!r} is cut short (file truncated while reading); "
                       f"re-download or re-copy this file")


def _pread_all(fd: int, view: memoryview, pos: int, info: TensorInfo) -> None:
    got = 0
    while got < len(view):
        k = os.preadv(fd, [view[got:]], pos + got)
        if k == 0:
            raise _cut_short(info)
        got += k


#: reads at least this big go around the page cache (O_DIRECT) where the filesystem allows it. Measured here:
#: 2.2-3.0 GB/s for ~0.02 CPU-seconds per GB, against ~1 GB/s and ~1.3 CPU-seconds per GB through the page
#: cache (a cold source; a source already cached is read from the disk again, which only a warm benchmark sees)
DIRECT_READ_MIN = 1 << 20


def read_view(info: TensorInfo, offset: int = 0, n: int | None = None) -> memoryview:
    """Like ``read_bytes``, as a writable buffer that may sit inside a larger aligned one (O_DIRECT reads)."""
    n = info.nbytes - offset if n is None else n
    pos = info.start + offset
    if DIRECT_IO and n >= DIRECT_READ_MIN and pos % ITEMSIZE[info.dtype] == 0:
        got = _read_direct(info, pos, n)
        if got is not None:
            return got
    return memoryview(read_bytes(info, offset, n))


#: a big O_DIRECT read is split into pieces of this size, read concurrently so that the disk has several
#: requests at once (one 29 MB read at a time measured 2.2 GB/s here; 4 MiB pieces, 4 at a time, 3.0 GB/s)
READ_PIECE = 4 << 20
READ_THREADS = 4
_readers: list[cf.ThreadPoolExecutor] = []


def _direct_piece(fd: int, view: memoryview, offset: int) -> int:
    """Read ``view`` full from ``offset`` on, or up to the end of the file; the number of bytes read."""
    got = 0
    while got < len(view):
        k = os.preadv(fd, [view[got:]], offset + got)
        got += k
        if k == 0 or k % DIRECT_ALIGN:  # a read that ends off a block boundary ended at the end of the file
            break
    return got


def _read_direct(info: TensorInfo, pos: int, n: int) -> memoryview | None:
    """Bytes ``pos:pos+n`` of the file, read with O_DIRECT over the aligned range around them (in concurrent
    pieces); None where the filesystem refuses O_DIRECT (the caller reads through the page cache)."""
    lo = pos - pos % DIRECT_ALIGN
    hi = -(-(pos + n) // DIRECT_ALIGN) * DIRECT_ALIGN
    view = memoryview(aligned_empty(hi - lo))
    pieces = [(s, view[s:s + READ_PIECE]) for s in range(0, len(view), READ_PIECE)]
    try:
        fd = os.open(info.file, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise
    try:
        try:
            got = [_direct_piece(fd, pieces[0][1], lo)]
        except OSError as exc:  # some filesystems take the flag at open and refuse the read
            if exc.errno == errno.EINVAL:
                return None
            raise
        rest = pieces[1:]
        if len(rest) > 1:
            if not _readers:
                _readers.append(cf.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="k2q-pread"))
            got += _readers[0].map(lambda p: _direct_piece(fd, p[1], lo + p[0]), rest)
        else:
            got += [_direct_piece(fd, v, lo + s) for s, v in rest]
    finally:
        os.close(fd)
    end = 0  # the data is whole up to the first piece that came back short
    for (s, v), g in zip(pieces, got):
        end = s + g
        if g < len(v):
            break
    if lo + end < pos + n:
        raise _cut_short(info)
    return view[pos - lo:pos - lo + n]


def read_rows(info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of the tensor (dim 0), read straight from their byte range."""
    row = info.nbytes // info.shape[0] if info.shape and info.shape[0] else info.nbytes
    shape = (r1 - r0, *info.shape[1:])
    if row * (r1 - r0) == 0:
        return torch.empty(shape, dtype=DTYPES[info.dtype])
    buf = read_view(info, r0 * row, (r1 - r0) * row)
    return torch.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(shape)


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """The whole tensor, read with one pread into a fresh buffer (no mmap)."""
    if not info.shape:
        return torch.frombuffer(read_bytes(info), dtype=DTYPES[info.dtype]).reshape(())
    return read_rows(info, 0, info.shape[0])


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor an output shard will hold."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


def header_bytes(entries: list[Entry], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length + JSON header (space-padded to 8 bytes) for ``entries`` in order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


#: buffered writes only: the writer starts the disk writing back every this many bytes, so that the fsync at
#: commit waits for the tail only (without it the whole shard stays dirty in the page cache until the fsync)
WRITEBACK_BYTES = 64 << 20

STAGE_BYTES = 8 << 20  # one staging buffer of the direct writer (hashed, then written, whole)
STAGES = 3  # staging buffers per open file: one filling, the others being hashed and written

#: A shard's digest (manifest, resume records, verify): BLAKE3 of the whole file, as ``b3sum`` prints it.
#: BLAKE3 runs at ~7 GB/s on one core here where sha256 runs at ~1.7 GB/s, and hashing the output was the
#: biggest CPU cost of every conversion writing BF16 (sha256 of 6.1 GB: 3.6 CPU-seconds of ~10). Manifests of
#: earlier k2quant versions hold a "sha256" per shard, which verify and resume still check.
DIGEST_KEY = "blake3"
HASH_CHUNK = 16 << 20  # files are read and hashed this much at a time (BLAKE3 hashes each on every core)


def new_digest():
    return blake3.blake3()


def digest_file(path: Path) -> str:
    """The shard digest of a file (read, not mapped: a file truncated under a mapping would crash the process)."""
    return _hash_file(path, blake3.blake3(max_threads=blake3.blake3.AUTO))


def record_digest(rec: dict) -> tuple[str, str] | None:
    """(key, value) of the digest a shard record holds: this version's BLAKE3, or an earlier one's sha256."""
    for key in (DIGEST_KEY, "sha256"):
        if isinstance(rec.get(key), str):
            return key, rec[key]
    return None


def file_matches(path: Path, rec: dict) -> bool:
    """Whether the file has the digest its record holds (of either kind)."""
    got = record_digest(rec)
    if got is None:
        return False
    key, value = got
    return (digest_file(path) if key == DIGEST_KEY else sha256_file(path)) == value


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class _DirectFile:
    """Append-only writes to a file opened with O_DIRECT, digested on the way: bytes are copied into aligned
    staging buffers; each full one is hashed by one helper thread (in order) and written by another while the
    next ones fill.
    ``close_data`` writes the last partial block padded with zeros, then truncates the file to its length."""

    def __init__(self, fd: int, digest):
        self.fd, self.digest, self.size = fd, digest, 0
        self.bufs = [aligned_empty(STAGE_BYTES) for _ in range(STAGES)]
        self.pending: list[tuple[cf.Future, cf.Future] | None] = [None] * STAGES
        self.cur, self.fill = 0, 0
        self.hasher = cf.ThreadPoolExecutor(1, thread_name_prefix="k2q-hash")  # one thread: updates in order
        self.io = cf.ThreadPoolExecutor(1, thread_name_prefix="k2q-direct")

    def write(self, data: memoryview) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        pos = 0
        while pos < len(src):
            n = min(len(src) - pos, STAGE_BYTES - self.fill)
            self.bufs[self.cur][self.fill:self.fill + n] = src[pos:pos + n]
            self.fill += n
            pos += n
            if self.fill == STAGE_BYTES:
                self._submit(STAGE_BYTES, STAGE_BYTES)

    def _submit(self, nbytes: int, data_bytes: int) -> None:
        """Hash the current buffer's first ``data_bytes`` and write its first ``nbytes`` (aligned)."""
        i = self.cur
        view = memoryview(self.bufs[i])
        self.pending[i] = (self.hasher.submit(self.digest.update, view[:data_bytes]),
                           self.io.submit(_pwrite_all, self.fd, view[:nbytes], self.size))
        self.size += nbytes
        self.cur, self.fill = (i + 1) % STAGES, 0
        self._wait(self.cur)  # the next buffer to fill must be hashed and on disk already

    def _wait(self, i: int) -> None:
        futs, self.pending[i] = self.pending[i], None
        for fut in futs or ():
            fut.result()

    def close_data(self) -> None:
        """Write what is staged (the last block padded to the alignment), wait for every hash and write, and set
        the file's length; the caller fsyncs."""
        true_size = self.size + self.fill
        if self.fill:
            pad = -self.fill % DIRECT_ALIGN
            self.bufs[self.cur][self.fill:self.fill + pad] = 0
            self._submit(self.fill + pad, self.fill)
        for i in range(STAGES):
            self._wait(i)
        os.ftruncate(self.fd, true_size)
        self.size = true_size

    def shutdown(self) -> None:
        self.hasher.shutdown(wait=True)
        self.io.shutdown(wait=True)
        self.pending = [None] * STAGES


class ShardWriter:
    """Streams tensors into ``path`` in the planned order, whole or in row chunks; visible after ``commit``.

    The file's digest (``DIGEST_KEY``) is computed as it is written (for the resume manifest and ``verify``). With
    ``DIRECT_IO`` the file is written around the page cache (``_DirectFile``); otherwise buffered, and every
    ``WRITEBACK_BYTES`` the written range is handed to the disk (``posix_fadvise(DONTNEED)`` starts its
    writeback without waiting, and drops the pages already written), so writing overlaps compute.
    """

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str] | None = None,
                 direct: bool | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + TMP_SUFFIX)
        self.entries = entries
        self.cur = 0
        self.left = entries[0].nbytes if entries else 0
        self.digest = new_digest()
        self.written = self.kicked = 0
        self.synced = False
        self.direct: _DirectFile | None = None
        fd = create_fresh(self.tmp)
        if DIRECT_IO if direct is None else direct:
            self.direct = _open_direct(fd, self.digest)
        self.fh = os.fdopen(fd, "wb")
        self._out(header_bytes(entries, {"format": "pt"} if metadata is None else metadata))
        self._skip_empty()

    def _out(self, data) -> None:
        self.written += len(data)
        if self.direct is not None:  # it digests too, in its own thread
            self.direct.write(memoryview(data).cast("B"))
            return
        self.digest.update(data)
        self.fh.write(data)
        if self.written - self.kicked >= WRITEBACK_BYTES:
            self._writeback()

    def _writeback(self) -> None:
        self.fh.flush()
        if hasattr(os, "posix_fadvise"):  # Linux: starts the writeback of dirty pages (WB_SYNC_NONE)
            os.posix_fadvise(self.fh.fileno(), self.kicked, self.written - self.kicked, os.POSIX_FADV_DONTNEED)
        self.kicked = self.written

    def _skip_empty(self) -> None:
        while self.cur < len(self.entries) and self.left == 0:
            self.cur += 1
            self.left = self.entries[self.cur].nbytes if self.cur < len(self.entries) else 0

    def write_raw(self, name: str, data) -> None:
        """Append raw bytes to entry ``name`` (which must be the current one)."""
        data = memoryview(data).cast("B")
        if self.cur >= len(self.entries) or name != self.entries[self.cur].name or len(data) > self.left:
            want = self.entries[self.cur] if self.cur < len(self.entries) else None
            raise AssertionError(f"{self.path.name}: writer expected {want} ({self.left} bytes left), got {name} "
                                 f"({len(data)} bytes)")
        self._out(data)
        self.left -= len(data)
        self._skip_empty()

    def write(self, name: str, t: torch.Tensor) -> None:
        """Append a tensor (the whole entry or a chunk of its leading rows)."""
        e = self.entries[self.cur] if self.cur < len(self.entries) else None
        if e is None or TAGS.get(t.dtype) != e.dtype or tuple(t.shape[1:]) != e.shape[1:]:
            raise AssertionError(f"{self.path.name}: writer expected {e}, got {name} {t.dtype} {tuple(t.shape)}")
        if t.numel():
            self.write_raw(name, t.contiguous().reshape(-1).view(torch.uint8).numpy())  # reshape: 0-d tensors too

    def sync(self) -> None:
        """Flush and fsync the temp file (every entry written); ``commit`` then only renames it."""
        if self.cur != len(self.entries):
            raise AssertionError(f"{self.path}: {len(self.entries) - self.cur} tensors not written")
        if not self.synced:
            if self.direct is not None:
                self.direct.close_data()
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.synced = True

    def commit(self) -> str:
        """Flush, fsync (unless ``sync`` did), rename into place; return the file's digest (``DIGEST_KEY``)."""
        self.sync()
        self._close()
        os.replace(self.tmp, self.path)
        return self.digest.hexdigest()

    def abort(self) -> None:
        self._close()
        self.tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        if self.direct is not None:
            self.direct.shutdown()
        if not self.fh.closed:
            self.fh.close()


def _open_direct(fd: int, digest) -> _DirectFile | None:
    """The empty file open as ``fd`` switched to O_DIRECT writes, or None where the filesystem refuses them
    (``fd`` is then left as it was, for buffered writes)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        probe = aligned_empty(DIRECT_ALIGN)
        probe[:] = 0
        os.pwrite(fd, memoryview(probe), 0)  # some filesystems take the flag and refuse the write
        os.ftruncate(fd, 0)
    except OSError:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        os.ftruncate(fd, 0)
        return None
    return _DirectFile(fd, digest)


def create_fresh(path: Path) -> int:
    """A new file at ``path`` (a stale one removed first), never opened through a link someone placed there."""
    path.unlink(missing_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)


def sha256_file(path: Path) -> str:
    return _hash_file(path, hashlib.sha256())


def _hash_file(path: Path, h) -> str:
    """``h`` (a hashlib or blake3 object) over the whole file, read ``HASH_CHUNK`` at a time; its hex digest."""
    view = memoryview(bytearray(HASH_CHUNK))
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(view):
            h.update(view[:n])
    return h.hexdigest()


MAX_JSON = 256 * 1024 * 1024  # an index of a 1 TB checkpoint is ~15 MB


def read_json(path: Path, what: str, fix: str, kind: type = dict) -> object:
    """Parse a JSON file k2quant did not necessarily write: any problem is one ``FormatError`` naming the file.

    Only a regular file is read (a FIFO or device would block or never end), at most ``MAX_JSON`` bytes,
    nesting that overflows the parser is refused, and the top level must be ``kind``.
    """
    path = Path(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{path}: {what} is not a regular file ({_kind(st.st_mode)}); {fix}")
        if st.st_size > MAX_JSON:
            raise FormatError(f"{path}: {what} is {st.st_size} bytes, more than the {MAX_JSON} k2quant reads; {fix}")
        with open(path, "rb") as fh:
            obj = json.loads(fh.read().decode("utf-8"))
    except OSError as exc:
        raise FormatError(f"{path}: cannot read {what} ({exc.strerror}); {fix}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise FormatError(f"{path}: {what} is not valid JSON ({reason}); {fix}") from None
    if not isinstance(obj, kind):
        raise FormatError(f"{path}: {what} must be a JSON {kind.__name__}, found {type(obj).__name__}; {fix}")
    return obj


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def write_json(path: Path, obj: object) -> None:
    """Write JSON to a temp name, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with os.fdopen(create_fresh(tmp), "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({exc.strerror})") from None
