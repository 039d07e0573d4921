"""One item of a conversion plan (a module, or a loose tensor): read its source tensors, decode them, encode
them in the target format, in row chunks. The public reader and decoder that convert, verify, the loader
and diff share; ``convert`` adds shards, workers and the output directory around it.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

from k2quant.errors import FormatError, NonFinite
from k2quant.formats import shards, source
from k2quant.formats.plan import Item
from k2quant.quant import dispatch, int4_group
from k2quant.quant.scheme import QuantScheme

CHUNK_ELEMS = 1 << 24  # elements per row chunk of a big tensor
PREFETCH_BYTES = 256 << 20  # items up to this size are read whole, ahead of the kernels
READ_AHEAD_BYTES = 192 << 20  # the reader stays this far ahead (at least one item): ~6 K2 experts in BF16
LOAD_READ_AHEAD_BYTES = 1 << 30  # ... and this far while the kernels load (~0.8 s): what the disk reads meanwhile
RAW_CHUNK = 64 << 20  # passthrough copies move this many bytes at a time


@dataclasses.dataclass
class Ctx:
    src: source.SourceFormat
    scheme: QuantScheme | None
    ops: dispatch.Ops
    device: str
    calibrated: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # key -> (codes, scale) of GPTQ


class Reader:
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


def chunks(item: Item, ctx: Ctx) -> list[tuple[int, int]]:
    n, k = item.shape
    align = 1
    for sch, rep in ((ctx.src.scheme, item.stored_rep), (ctx.scheme, item.dst_rep)):
        if rep == source.FP8:
            align = max(align, sch.block_size[0])  # tiles never split across chunks
    rows = max(align, (CHUNK_ELEMS // max(k, 1)) // align * align)
    return [(r, min(r + rows, n)) for r in range(0, n, rows)]


def _dev(t: torch.Tensor, ctx: Ctx) -> torch.Tensor:
    """``t`` on the run's device. On CPU no call at all: each torch call lets go of the GIL, and taking it back
    waits for whichever thread holds it (measured: 0.47 s over 396 no-op ``.cpu()`` calls in one run)."""
    return t if ctx.device == "cpu" else t.to(ctx.device)


def _host(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "cpu" else t.cpu()


def nan_codes(item: Item) -> FormatError:
    w = item.part("weight")
    return FormatError(f"{w.file}: FP8 weight {w.name!r} holds NaN codes (0x7f/0xff); the checkpoint is "
                       f"corrupt: re-download this shard")


def fp8_overflow(item: Item, r0: int, r1: int) -> FormatError:
    w, s = item.part("weight"), item.part("scale")
    return FormatError(f"{w.file}: FP8 weight {w.name!r} times its scales {s.name!r} exceeds BF16's range (Inf) "
                       f"in rows {r0}..{r1}, which has no INT4 code; the scales are corrupt: re-download this "
                       f"shard")


def fp8_rows(item: Item, rd: Reader, ctx: Ctx, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``r0:r1`` of the FP8 codes and their tile scales, checked (NaN codes by the kernel that reads
    them, when it can: ``ops.checks_input``; the scales, tiny, here)."""
    bn = ctx.src.scheme.block_size[0]
    q = _dev(rd.rows("weight", r0, r1), ctx)
    if not ctx.ops.checks_input and ctx.ops.count_nonfinite(q):
        raise nan_codes(item)
    scale = _dev(rd.rows("scale", r0 // bn, -(-r1 // bn)), ctx).to(torch.float32)
    bad = ctx.ops.count_nonfinite(scale)
    if bad:  # every path sees this: FP8 -> BF16, and the fused FP8 -> INT4 kernels
        s = item.part("scale")
        raise FormatError(f"{s.file}: FP8 scale {s.name!r} holds {bad} NaN/Inf tiles (rows {r0}..{r1} of the "
                          f"weight); the checkpoint is corrupt: re-download this shard")
    return q, scale


def decode_rows(item: Item, rd: Reader, ctx: Ctx, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of the item's float weight (stored plain as is, quantized ones dequantized to BF16)."""
    rep = item.stored_rep
    if rep == source.FP8:
        try:
            return ctx.ops.fp8_decode(*fp8_rows(item, rd, ctx, r0, r1), ctx.src.scheme)
        except NonFinite:
            raise nan_codes(item) from None
    if rep == source.INT4:
        packed, scale = _dev(rd.rows("packed", r0, r1), ctx), _dev(rd.rows("scale", r0, r1), ctx)
        return ctx.ops.int4_decode(packed, scale, item.shape[1], ctx.src.scheme)
    role = item.sources[0][0]
    return _dev(rd.rows(role, r0, r1), ctx)


def check_int4_shape(item: Item, rd: Reader) -> None:
    shape = tuple(int(d) for d in rd.whole("shape").tolist())
    if shape != tuple(item.shape):
        info = item.part("shape")
        raise FormatError(f"{info.file}: {info.name!r} says {list(shape)} but the packed codes and scales hold "
                          f"{list(item.shape)}; the checkpoint is inconsistent")


def check_finite(item: Item, w: torch.Tensor, ops: dispatch.Ops) -> None:
    bad = ops.count_nonfinite(w)
    if bad:
        info = item.sources[0][1]
        raise FormatError(f"{info.file}: weight {item.key}.weight holds {bad} NaN/Inf values and cannot be "
                          f"quantized; fix the source weights or keep this module unquantized with --ignore {item.key}")


def encode(item: Item, w: torch.Tensor, ctx: Ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the float weight in the item's target format: (codes, scale), NaN/Inf refused.

    With ``ops.checks_input`` the encoding kernel finds special values in the pass that converts (only then
    are they counted, for the message); otherwise they are counted first."""
    fn = ctx.ops.fp8_encode if item.dst_rep == source.FP8 else ctx.ops.int4_encode
    if not ctx.ops.checks_input:
        check_finite(item, w, ctx.ops)
        return fn(w, ctx.scheme)
    try:
        return fn(w, ctx.scheme)
    except NonFinite:
        check_finite(item, w, ctx.ops)
        raise AssertionError(f"{item.key}: the kernel saw NaN/Inf that counting does not find") from None


def passthrough(item: Item, rd: Reader) -> Iterator[tuple[str, object]]:
    for entry, (role, info) in zip(item.entries, item.sources):
        if entry.dtype != info.dtype:  # e.g. a BF16 compressed-tensors FP8 scale written as F32 (exact)
            yield entry.name, rd.whole(role).to(shards.DTYPES[entry.dtype])
        elif rd.data is not None:
            yield entry.name, rd.data[role]
        else:
            for off in range(0, info.nbytes, RAW_CHUNK):
                yield entry.name, shards.read_view(info, off, min(RAW_CHUNK, info.nbytes - off))


def pieces(item: Item, ctx: Ctx, data: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, object]]:
    """The item's output as ``(entry name, tensor chunk or raw bytes)`` in write order."""
    rd = Reader(item, data)
    if item.passthrough:
        yield from passthrough(item, rd)
        return
    if item.stored_rep == source.INT4:
        check_int4_shape(item, rd)
    names = [e.name for e in item.entries]
    if item.dst_rep == source.INT4 and ctx.calibrated and item.key in ctx.calibrated:
        q, scale = ctx.calibrated[item.key]  # codes chosen by calibration (GPTQ), not by rounding here
        yield names[0], int4_group.pack(q)
        yield names[1], scale.to(torch.bfloat16)
        yield names[2], torch.tensor(list(item.shape), dtype=torch.int64)
        return
    scales = []
    fused = item.stored_rep == source.FP8 and item.dst_rep == source.INT4
    for r0, r1 in chunks(item, ctx):
        if fused:
            q, fp8_scale = fp8_rows(item, rd, ctx, r0, r1)
            try:
                packed, scale = ctx.ops.fp8_to_int4(q, fp8_scale, ctx.src.scheme, ctx.scheme)
            except NonFinite:
                raise (nan_codes(item) if ctx.ops.count_nonfinite(q) else fp8_overflow(item, r0, r1)) from None
            yield names[0], _host(packed)
            scales.append(_host(scale))
            continue
        w = decode_rows(item, rd, ctx, r0, r1)
        if item.dst_rep == source.PLAIN:
            dt = shards.DTYPES[item.entries[0].dtype]
            yield names[0], _host(w if w.dtype == dt else w.to(dt))
            continue
        q, scale = encode(item, w, ctx)
        yield names[0], _host(q)
        scales.append(_host(scale))
    if item.dst_rep == source.FP8:
        yield names[1], _joined(scales).to(torch.float32)
    elif item.dst_rep == source.INT4:
        yield names[1], _joined(scales).to(torch.bfloat16)
        yield names[2], torch.tensor(list(item.shape), dtype=torch.int64)


def _joined(chunks: list[torch.Tensor]) -> torch.Tensor:
    """The row chunks as one tensor; a single chunk (most items) as it is. torch.cat runs on torch's thread
    pool, which wakes while the kernels' pool still spins: 198 single-chunk cats took 0.56 s of one 4.5 s
    FP8 -> INT4 conversion (measured)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def run_item(item: Item, src: source.SourceFormat, scheme: QuantScheme | None, device: str = "cpu",
             kernel: str = "reference") -> dict[str, torch.Tensor]:
    """The output tensors of one item, whole, by name (for loaders and tests; convert streams ``pieces``)."""
    ctx = Ctx(src, scheme, dispatch.ops(kernel, device), device)
    parts: dict[str, list] = {}
    for name, chunk in pieces(item, ctx, prefetch(item)):
        parts.setdefault(name, []).append(chunk)
    return {e.name: assemble(e, parts.get(e.name, [])) for e in item.entries}


def assemble(e: shards.Entry, chunks: list) -> torch.Tensor:
    """One entry from its pieces: row chunks of a tensor, or raw byte chunks of a passthrough copy."""
    if chunks and isinstance(chunks[0], torch.Tensor):
        return _joined(chunks).reshape(e.shape)
    raw = b"".join(chunks)
    if not raw:
        return torch.empty(e.shape, dtype=shards.DTYPES[e.dtype])
    return torch.frombuffer(bytearray(raw), dtype=shards.DTYPES[e.dtype]).reshape(e.shape)
