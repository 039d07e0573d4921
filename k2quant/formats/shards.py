"""safetensors files: a validating header reader, a pread tensor reader, a streaming atomic writer.

The reader parses headers itself so a truncated or corrupt file is reported with its name and
the fix, and reads each tensor with one ``pread`` (no mmap: resident memory stays one tensor).
The writer knows every tensor's dtype and shape up front, writes the header first and then each
tensor's bytes as it is produced, to a temp name renamed into place on ``commit``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from pathlib import Path

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


def itemsize(tag: str) -> int:
    return torch.empty((), dtype=DTYPES[tag]).element_size()


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: ``({name: TensorInfo}, metadata)``."""
    path = Path(path)
    size = path.stat().st_size
    fix = "re-download or re-copy this file"
    if size < 8:
        raise FormatError(f"{path}: truncated safetensors file ({size} bytes, no header length); {fix}")
    with open(path, "rb") as fh:
        (hlen,) = struct.unpack("<Q", fh.read(8))
        if hlen > MAX_HEADER or 8 + hlen > size:
            raise FormatError(
                f"{path}: corrupt or truncated safetensors header: header length {hlen} but the file "
                f"has {size} bytes; {fix}")
        raw = fh.read(hlen)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{path}: corrupt safetensors header (not valid JSON: {exc}); {fix}") from None
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + hlen
    infos: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for name, ent in header.items():
        try:
            tag, shape, (start, end) = ent["dtype"], tuple(int(d) for d in ent["shape"]), ent["data_offsets"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{path}: tensor {name!r} has a malformed header entry {ent!r}")
            continue
        if tag not in DTYPES:
            problems.append(
                f"{path}: tensor {name!r} has dtype {tag!r}, which k2quant does not handle; expected one of "
                f"{sorted(DTYPES)}; convert that tensor to a supported dtype first")
            continue
        n = 1
        for d in shape:
            n *= d
        if end - start != n * itemsize(tag) or start < 0:
            problems.append(f"{path}: tensor {name!r} spans bytes {start}..{end} but {tag}{list(shape)} "
                            f"needs {n * itemsize(tag)}; the header is corrupt; {fix}")
            continue
        if base + end > size:
            problems.append(f"{path}: tensor {name!r} ends at byte {base + end} but the file has only {size} "
                            f"bytes (truncated file or corrupt header); {fix}")
            continue
        infos[name] = TensorInfo(name, path, tag, shape, base + start, base + end)
    if problems:
        from k2quant.errors import collect
        collect(problems)
    return infos, metadata


def read_bytes(info: TensorInfo, offset: int = 0, n: int | None = None) -> bytearray:
    """``n`` bytes of the tensor's data from ``offset`` (relative to the tensor), one pread loop."""
    n = info.nbytes - offset if n is None else n
    buf = bytearray(n)
    fd = os.open(info.file, os.O_RDONLY)
    try:
        view, got = memoryview(buf), 0
        while got < n:
            k = os.preadv(fd, [view[got:]], info.start + offset + got)
            if k == 0:
                raise FormatError(f"{info.file}: tensor {info.name!r} is cut short (file truncated while "
                                  f"reading); re-download or re-copy this file")
            got += k
    finally:
        os.close(fd)
    return buf


def read_rows(info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of the tensor (dim 0), read straight from their byte range."""
    row = info.nbytes // info.shape[0] if info.shape and info.shape[0] else info.nbytes
    shape = (r1 - r0, *info.shape[1:])
    if row * (r1 - r0) == 0:
        return torch.empty(shape, dtype=DTYPES[info.dtype])
    buf = read_bytes(info, r0 * row, (r1 - r0) * row)
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


class ShardWriter:
    """Streams tensors into ``path`` in the planned order, whole or in row chunks; visible after ``commit``.

    The sha256 of the file is computed as it is written (for the resume manifest and ``verify``).
    """

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + TMP_SUFFIX)
        self.entries = entries
        self.cur = 0
        self.left = entries[0].nbytes if entries else 0
        self.sha = hashlib.sha256()
        self.fh = open(self.tmp, "wb")
        self._out(header_bytes(entries, {"format": "pt"} if metadata is None else metadata))
        self._skip_empty()

    def _out(self, data) -> None:
        self.fh.write(data)
        self.sha.update(data)

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
            self.write_raw(name, t.contiguous().view(torch.uint8).numpy())

    def commit(self) -> str:
        """Flush, fsync, rename into place; return the file's sha256."""
        if self.cur != len(self.entries):
            raise AssertionError(f"{self.path}: {len(self.entries) - self.cur} tensors not written")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)
        return self.sha.hexdigest()

    def abort(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        self.tmp.unlink(missing_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj: object) -> None:
    """Write JSON to a temp name, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({exc.strerror})") from None
