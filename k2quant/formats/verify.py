"""Prove a converted checkpoint right: every source tensor accounted for, formats exact, errors in bounds.

Streams both checkpoints item by item (row chunks for big tensors), like convert. Checks:

- DST opens (headers, index, no duplicates) and its config names the format its tensors are in;
- every SRC module/tensor is in DST as the DST format requires (converted, passed through, or a
  scale deliberately dropped), with the planned names, dtypes and shapes, and nothing else is;
- dequantized DST values against the SRC values: exact where nothing was quantized; INT4 within half a
  step of its group's scale (plus the bf16 roundings the format defines); FP8 within E4M3 rounding of
  the tile scale; stored codes identical where the format did not change;
- index ``total_size`` and the manifest's digest of every shard.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch

from k2quant.errors import FormatError, K2QuantError
from k2quant.formats import items, layout, output, plan, shards, source
from k2quant.formats.checkpoint import INDEX, Checkpoint
from k2quant.quant import dispatch, fp8_block, int4_group
from k2quant.quant import scheme as qscheme

#: |w - deq| <= INT4_STEP * scale + BF16_REL * |deq|: half a step, plus the library's bf16 rounding of w/scale
INT4_STEP = 0.5 + 2.0 ** -5
BF16_REL = 2.0 ** -8  # one bf16 rounding of the dequantized product
FP8_REL = 2.0 ** -4  # half an E4M3 step in the normal range
FP8_SUB = 2.0 ** -10  # half the smallest E4M3 subnormal step, in units of the tile scale
#: calibrated (GPTQ) INT4 trades weight error for output error: its codes are not the nearest ones. Its
#: module's squared error may be up to CALIB_MSE times round-to-nearest's (measured: 1.1-1.6x on SmolLM2),
#: and each group scale within CALIB_SCALE x of the scheme's own scale of the source group.
CALIB_MSE = 4.0
CALIB_SCALE = 4.0


@dataclasses.dataclass
class VerifyReport:
    src: str
    dst: str
    format: str
    ok: bool
    problems: list[dict]
    checked: dict[str, int]
    max_error: dict[str, float]  # class -> max |w - deq| / allowed bound (<= 1 passes)
    seconds: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class _Problems(list):
    def add(self, file: object, tensor: str, problem: str) -> None:
        self.append({"file": str(file), "tensor": tensor, "problem": problem})


def _expected_scheme(dst: Checkpoint, fmt: source.SourceFormat) -> qscheme.QuantScheme | None:
    """The scheme DST's config promises: loaders quantize every Linear not in its ignore list."""
    if fmt.name == "int4":
        ignore = tuple((dst.quantization_config or {}).get("ignore") or ())
        return fmt.scheme.with_(targets=("re:.*",), ignore=ignore)
    return fmt.scheme


def verify(src: str | Path, dst: str | Path, progress: Callable[[int, int], None] | None = None,
           on_start: Callable[[int], None] | None = None) -> VerifyReport:
    """Check DST against SRC; every problem names its file and tensor."""
    t0 = time.perf_counter()
    problems = _Problems()
    stats = {"items": 0, "quantized": 0, "exact": 0, "codes_kept": 0, "shards_hashed": 0}
    errors: dict[str, float] = {}
    fmt_name = "?"
    try:
        s_ck, d_ck = Checkpoint(src), Checkpoint(dst)
        d_fmt = source.detect(d_ck)
        fmt_name = d_fmt.name
        s_plan = plan.make_plan(s_ck, d_fmt.name, _expected_scheme(d_ck, d_fmt), 1 << 62)
        d_plan = plan.make_plan(d_ck, "bf16", None, 1 << 62)
    except K2QuantError as exc:
        problems.add(dst, "", str(exc))
        return VerifyReport(str(src), str(dst), fmt_name, False, problems, stats, errors,
                            round(time.perf_counter() - t0, 3))
    if on_start:
        on_start(s_plan.src_bytes)
    _check_layout(s_plan, d_ck, problems)
    _check_index(d_ck, problems)
    d_items = {it.key: it for it in d_plan.items}
    calib = _calibrated_scheme(d_ck, d_fmt)
    ctxs = (items.Ctx(s_plan.source_format, None, dispatch.REFERENCE, "cpu"),
            items.Ctx(d_plan.source_format, calib, dispatch.REFERENCE, "cpu"))
    for it in s_plan.items:
        d_it = d_items.get(it.key)
        if d_it is not None and d_it.src_rep == it.dst_rep and not _missing(it, d_ck):
            _check_values(it, d_it, ctxs, problems, stats, errors, s_ck.config.get("num_hidden_layers"))
        stats["items"] += 1
        if progress:
            progress(1, it.src_bytes)
    _check_manifest(d_ck, problems, stats)
    return VerifyReport(str(src), str(dst), fmt_name, not problems, problems, stats,
                        {k: round(v, 4) for k, v in sorted(errors.items())}, round(time.perf_counter() - t0, 3))


def _calibrated_scheme(d_ck: Checkpoint, fmt: source.SourceFormat) -> qscheme.QuantScheme | None:
    """The INT4 scheme (with its scale rule) of a calibrated output, from its manifest; None for RTN outputs."""
    path = d_ck.path / output.MANIFEST
    if fmt.name != "int4" or not path.exists():
        return None
    try:
        manifest = shards.read_json(path, "manifest", "re-run the conversion")
    except K2QuantError:
        return None  # the manifest check reports an unreadable manifest
    settings = manifest.get("settings") if isinstance(manifest, dict) else None
    if not isinstance(settings, dict) or settings.get("method") != "gptq":
        return None
    scheme = settings.get("scheme")
    rule = scheme.get("scale_rule", fmt.scheme.scale_rule) if isinstance(scheme, dict) else fmt.scheme.scale_rule
    return fmt.scheme.with_(scale_rule=rule) if isinstance(rule, str) and rule in qscheme.SCALE_RULES[fmt.scheme.dtype] \
        else fmt.scheme


def _missing(it: plan.Item, d_ck: Checkpoint) -> bool:
    return any(e.name not in d_ck.tensors for e in it.entries)


def _check_layout(s_plan: plan.Plan, d_ck: Checkpoint, problems: _Problems) -> None:
    """Names, dtypes and shapes: DST holds exactly the planned tensors."""
    planned = {}
    for it in s_plan.items:
        for e in it.entries:
            planned[e.name] = (e, it)
    for name, (e, it) in planned.items():
        info = d_ck.tensors.get(name)
        src_file = it.sources[0][1].file.name
        if info is None:
            problems.add(d_ck.path, name, f"missing: source {it.key!r} ({src_file}) should be stored as "
                         f"{e.dtype}{list(e.shape)} in this {s_plan.target} checkpoint")
        elif (info.dtype, info.shape) != (e.dtype, e.shape):
            problems.add(info.file, name, f"is {info.dtype}{list(info.shape)}, expected {e.dtype}{list(e.shape)}")
    for name, info in d_ck.tensors.items():
        if name not in planned:
            problems.add(info.file, name, "not expected: no source tensor converts to it (wrong format, a tensor "
                         "that should have been dropped, or a module quantized against the config's ignore list)")


def _check_index(d_ck: Checkpoint, problems: _Problems) -> None:
    idx = d_ck.path / INDEX
    if not idx.exists():
        return
    meta = shards.read_json(idx, "index", "re-run the conversion").get("metadata")
    total = meta.get("total_size") if isinstance(meta, dict) else None
    if total is not None and total != d_ck.total_bytes():
        problems.add(idx, "", f"metadata.total_size is {total!r} but the shards hold {d_ck.total_bytes()} tensor bytes")


def _check_manifest(d_ck: Checkpoint, problems: _Problems, stats: dict) -> None:
    """The manifest's hashes, for the checkpoint's own shard files only: a name the manifest gives that is
    not one of them (``/dev/zero``, ``../x``) is reported, never opened."""
    path = d_ck.path / output.MANIFEST
    if not path.exists():
        return
    try:
        recs = shards.read_json(path, "k2quant manifest", "re-run the conversion").get("shards", {})
    except K2QuantError as exc:
        problems.add(path, "", str(exc))
        return
    if not isinstance(recs, dict):
        problems.add(path, "", f"'shards' is {type(recs).__name__}, expected an object; re-run the conversion")
        return
    own = {f.name: f for f in d_ck.files}
    for name, rec in recs.items():
        if name not in own:
            problems.add(path, "", f"lists {name!r}, which is not one of this checkpoint's shard files "
                         f"({len(own)} in its index); the manifest does not belong to these shards: re-run the conversion")
            continue
        digest = shards.record_digest(rec) if isinstance(rec, dict) else None
        if digest is None:
            problems.add(path, "", f"entry {name!r} has no {shards.DIGEST_KEY} (or sha256) string; re-run the conversion")
            continue
        stats["shards_hashed"] += 1
        if not shards.file_matches(own[name], rec):
            key, value = digest
            problems.add(own[name], "", f"{key} differs from the manifest ({value[:16]}...): the file changed after "
                         f"conversion (corruption or a flipped byte); re-run the conversion")
    for name in sorted(set(own) - set(recs)):
        problems.add(own[name], "", "not in the manifest: the shard was not written by the run the manifest records")


def _check_values(it: plan.Item, d_it: plan.Item, ctxs, problems: _Problems, stats: dict,
                  errors: dict[str, float], nl: int | None) -> None:
    s_ctx, d_ctx = ctxs
    name = it.tensor_name
    cls = layout.tensor_class(name, nl)
    d_file = d_it.sources[0][1].file
    if it.passthrough:
        if not all(_bytes_equal(e_info, d_it, e.name) for e, (_, e_info) in zip(it.entries, it.sources)
                   if e.dtype == e_info.dtype):
            problems.add(d_file, name, "differs from the source: it should have been copied unchanged")
        else:
            stats["codes_kept" if it.dst_rep != source.PLAIN else "exact"] += 1
        return
    if d_it.src_rep == source.INT4:
        try:
            items.check_int4_shape(d_it, items.Reader(d_it, None))
        except K2QuantError as exc:
            problems.add(d_file, name, str(exc))
            return
    worst = 0.0
    calib = d_ctx.scheme if it.dst_rep == source.INT4 else None  # a calibrated (GPTQ) output: judged on its own terms
    sq = [0.0, 0.0]  # calibrated: squared error of DST and of round-to-nearest
    rules = set(_rules(d_it, d_ctx)) if it.dst_rep != source.PLAIN else set()
    try:
        for r0, r1 in items.chunks(it, s_ctx if it.dst_rep == source.PLAIN else
                                      dataclasses.replace(s_ctx, scheme=d_ctx.src.scheme)):
            w_src = items.decode_rows(it, items.Reader(it, None), s_ctx, r0, r1)
            w = w_src.float()
            deq = items.decode_rows(d_it, items.Reader(d_it, None), d_ctx, r0, r1).float()
            if it.dst_rep == source.PLAIN:
                if not torch.equal(w, deq):
                    problems.add(d_file, name, "differs from the exact dequantization of the source")
                    return
                continue
            if calib is not None:
                bad = _calibrated_rows(d_it, calib, w, deq, r0, r1, sq)
                if bad:
                    problems.add(d_file, name, bad)
                    return
                continue
            scale = _scale_rows(d_it, d_ctx, r0, r1)
            rules = {r for r in rules if torch.equal(_expected_scale(w_src, d_ctx, r), scale)}
            bound = _bound(d_it, d_ctx, w, deq, scale)
            ratio = ((w - deq).abs() / bound) if w.numel() else torch.zeros(1)
            # a NaN ratio must fail: max() over NaN would drop it, so non-finite counts as infinitely wrong
            worst = max(worst, float(ratio.max()) if bool(torch.isfinite(ratio).all()) else float("inf"))
    except K2QuantError as exc:  # e.g. NaN/Inf scales in DST, refused by the decoder's own checks
        problems.add(d_file, name, str(exc))
        return
    if calib is not None:  # scales and codes were checked row by row; the error against RTN's decides
        worst = sq[0] / max(sq[1], 1e-30) / CALIB_MSE
        rules = {calib.scale_rule}
    if it.dst_rep == source.PLAIN:
        stats["exact"] += 1
        return
    stats["quantized"] += 1
    errors[cls] = max(errors.get(cls, 0.0), worst)
    if not worst <= 1.0:
        rule = "half an INT4 step of its group scale" if it.dst_rep == source.INT4 else \
            "E4M3 rounding of its tile scale"
        if calib is not None:
            rule = f"for calibrated INT4: {CALIB_MSE:g}x the squared error of round-to-nearest"
        problems.add(d_file, name, f"dequantized values are off by up to {worst:.3g}x the allowed error "
                     f"({rule}): wrong scale or codes")
    elif not rules:  # within its own bound, but a bound that grows with the scale proves nothing by itself
        what = "INT4 scale rule (library or kimi)" if it.dst_rep == source.INT4 else "FP8 block rule (amax/448)"
        problems.add(d_file, name, f"scales ({_scale_name(d_it)}) are not what the {what} computes from the "
                     f"source: the output was not made from this source, or its scales were changed; re-run the "
                     f"conversion")


def _calibrated_rows(d_it: plan.Item, sch: qscheme.QuantScheme, w: torch.Tensor, deq: torch.Tensor, r0: int, r1: int,
                     sq: list[float]) -> str | None:
    """Calibrated INT4 rows: finite positive scales near the source's own, codes in the rule's range; adds the
    squared errors of DST and of round-to-nearest to ``sq``. Returns the problem, or None."""
    scale = shards.read_rows(d_it.part("scale"), r0, r1).float()
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        return f"holds {int((~torch.isfinite(scale) | (scale <= 0)).sum())} non-finite or non-positive scales"
    q = int4_group.unpack(shards.read_rows(d_it.part("packed"), r0, r1), w.shape[-1])
    lo, hi = int4_group.CODE_RANGE[sch.scale_rule]
    if int(q.min()) < lo or int(q.max()) > hi:
        return f"codes span {int(q.min())}..{int(q.max())}, outside {lo}..{hi} of the {sch.scale_rule} scale rule"
    rq, rs = int4_group.quantize_weight(w, sch)
    ratio = scale / rs.float()
    if not bool(((ratio <= CALIB_SCALE) & (ratio >= 1 / CALIB_SCALE)).all()):
        return (f"group scales differ from the source groups' own by up to {float(ratio.max()):.3g}x / "
                f"{float(ratio.min()):.3g}x (allowed {CALIB_SCALE:g}x either way): wrong scales or wrong source")
    sq[0] += float(((w - deq) ** 2).sum())
    sq[1] += float(((w - int4_group.dequantize(rq, rs, sch).float()) ** 2).sum())
    return None


def _rules(d_it: plan.Item, d_ctx) -> tuple[str, ...]:
    """The scale rules an RTN output of this format may follow (INT4 has two; which one is the user's choice)."""
    return tuple(int4_group.DIVISOR) if d_it.src_rep == source.INT4 else (d_ctx.src.scheme.scale_rule,)


def _expected_scale(w: torch.Tensor, d_ctx, rule: str) -> torch.Tensor:
    """The scale RTN computes from the source rows under ``rule``, in the dtype the format stores."""
    sch = d_ctx.src.scheme.with_(scale_rule=rule)
    if sch.dtype == "int4":
        return int4_group.compute_scale(w, sch).to(torch.bfloat16).float()
    return fp8_block.compute_scale(w, sch).float()


def _scale_name(d_it: plan.Item) -> str:
    return d_it.part("scale").name


def _scale_rows(d_it: plan.Item, d_ctx, r0: int, r1: int) -> torch.Tensor:
    """The stored scales of rows ``r0:r1``; any NaN, Inf, zero or negative scale is an error."""
    sch = d_ctx.src.scheme
    info = d_it.part("scale")
    rows = (r0, r1) if d_it.src_rep == source.INT4 else (r0 // sch.block_size[0], -(-r1 // sch.block_size[0]))
    scale = shards.read_rows(info, *rows).float()
    bad = int((~torch.isfinite(scale) | (scale <= 0)).sum())
    if bad:
        raise FormatError(f"{info.file}: {info.name!r} holds {bad} scales that are NaN, Inf, zero or negative; every "
                          f"scale must be finite and positive: re-run the conversion")
    return scale


def _bound(d_it: plan.Item, d_ctx, w: torch.Tensor, deq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    sch = d_ctx.src.scheme
    if d_it.src_rep == source.INT4:
        s = scale.repeat_interleave(sch.group_size, dim=-1)[..., : w.shape[-1]]
        return INT4_STEP * s + BF16_REL * deq.abs() + 1e-30
    bn, bk = sch.block_size
    s = scale.repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)[: w.shape[0], : w.shape[1]]
    return torch.maximum(FP8_REL * w.abs(), FP8_SUB * s) + BF16_REL * deq.abs() + 1e-30


def _bytes_equal(src_info: shards.TensorInfo, d_it: plan.Item, name: str) -> bool:
    d_info = next((i for _, i in d_it.sources if i.name == name), None)
    if d_info is None or d_info.nbytes != src_info.nbytes:
        return False
    for off in range(0, src_info.nbytes, items.RAW_CHUNK):
        n = min(items.RAW_CHUNK, src_info.nbytes - off)
        if shards.read_bytes(src_info, off, n) != shards.read_bytes(d_info, off, n):
            return False
    return True
