"""Conversion throughput on a K2-shaped checkpoint: every direction, against the disk and the library.

Run by hand (never a test). It builds a BF16 fixture with real Kimi-K2 expert shapes (gate/up 2048x7168,
down 7168x2048; enough experts for ``--size-gb``), attention (q_a_proj 1536x7168, kv_a_proj_with_mqa
576x7168 with its partial FP8 row tile, ...) and norms, in release-style shards, then the FP8 and INT4
fixtures from it with ``k2quant.formats.convert.convert``. Then, for each direction, it runs the real
``convert.convert(...)`` call in a child process (one per run, so peak RSS is that run's) and reports:

- elements/s (all weight elements read) and source GB/s, end to end: the ``convert.convert`` call
  (workers' start, read, decode, encode, write, verify, index); "wall s" adds the child's interpreter start;
- % of the disk bound: the same source shards read sequentially with 64 MiB reads right before the run and
  right after it, the mean of the two (the disk's speed moves on a shared virtual disk), after the same
  cache eviction (``posix_fadvise(DONTNEED)`` on every source file after an fsync; with ``--drop-caches``,
  as root, also ``echo 3 > /proc/sys/vm/drop_caches``);
- % of the I/O bound: max(source bytes at the read speed, output bytes at the sequential write speed
  measured here with fsync); on a disk that writes slower than it reads, the output side sets the limit;
- x library: compressed-tensors 0.20 on sampled expert tensors of the same fixture, per element
  (``calculate_qparams`` + ``PackedQuantizationCompressor.compress`` for INT4, ``FP8BlockDequantizer``
  for FP8 decode, ``PackedQuantizationCompressor.decompress`` for INT4 decode), extrapolated to the
  whole run; "kernel x" is the same ratio for the k2quant kernels alone on the same sampled tensors;
- peak RSS: of the whole process tree (VmRSS summed over the child and its convert workers, sampled from
  /proc every 50 ms) and of the largest single process (its VmHWM; ``ru_maxrss`` is not used because
  it inherits the bench process's own RSS across fork).

    python bench/convert.py --size-gb 0.5                 # quick run
    python bench/convert.py --json bench/out/convert.json  # the full run (>= 6 GB BF16)

Targets (issue): FP8->INT4 and BF16->INT4 >= 25x the library path; every direction >= 50% of the disk
bound end to end; peak RSS <= 2 GiB.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from k2quant.formats import convert, shards, tiny
from k2quant.formats.checkpoint import INDEX
from k2quant.quant import fp8_block, int4_group
from k2quant.quant import scheme as qscheme

DIRECTIONS = (("bf16", "fp8"), ("fp8", "bf16"), ("bf16", "int4"), ("fp8", "int4"), ("int4", "bf16"))
EXPERT_BYTES = 3 * 2048 * 7168 * 2  # gate + up + down, BF16
GIB = 2**30


# -- fixture -------------------------------------------------------------------------------------
def k2_config(size_gb: float) -> dict:
    """A DeepseekV3/K2 config with real hidden/expert/attention dims and as many experts as the size asks."""
    layers = 2 if size_gb >= 1 else 1
    experts = max(2, round(size_gb * 1e9 / (layers * EXPERT_BYTES)) - 1)
    return tiny.config_for(
        "bf16", hidden_size=7168, moe_intermediate_size=2048, intermediate_size=18432, vocab_size=2048,
        num_hidden_layers=layers, first_k_dense_replace=0, n_routed_experts=experts, n_shared_experts=1,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_experts_per_tok=min(8, experts))


def build_bf16(path: Path, cfg: dict, shard_bytes: int, seed: int = 0) -> Path:
    """Stream a BF16 checkpoint to ``path``: tensors are made one at a time, never all in memory."""
    specs = tiny.tensor_shapes(cfg)
    groups, cur, size = [], [], 0
    for name, shape in specs.items():
        nbytes = 4 * shape[0] if name.endswith("e_score_correction_bias") else 2 * torch.Size(shape).numel()
        if cur and size + nbytes > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    groups.append(cur)
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: make_tensor(n, specs[n], g) for n in names}
        entries = [shards.Entry(n, shards.TAGS[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
        writer = shards.ShardWriter(path / fname, entries)
        for n, t in tensors.items():
            writer.write(n, t)
        writer.commit()
        weight_map |= {n: fname for n in names}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


def make_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Weights like tiny.random_weights (N(0, 1/K) plus a few 8x outliers), made per tensor."""
    if name.endswith("e_score_correction_bias"):
        return torch.randn(shape, generator=g) * 0.01
    if len(shape) == 1:
        return (1.0 + 0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    w = torch.randn(shape, generator=g) * shape[1] ** -0.5
    w.view(-1)[torch.randint(0, w.numel(), (max(1, w.numel() // 2000),), generator=g)] *= 8.0
    return w.to(torch.bfloat16)


def kernel_kwargs(kernel: str | None) -> dict:
    """``kernel=`` for convert.convert when this k2quant has the option (it is passed through as given)."""
    if kernel is None or "kernel" not in inspect.signature(convert.convert).parameters:
        return {}
    return {"kernel": kernel}


def build_fixtures(root: Path, size_gb: float, shard_gb: float, workers: int) -> dict[str, Path]:
    dirs = {fmt: root / fmt for fmt in ("bf16", "fp8", "int4")}
    stamp = root / "fixture.json"
    want = {"size_gb": size_gb, "shard_gb": shard_gb}
    if stamp.exists() and json.loads(stamp.read_text()) == want and all((d / INDEX).exists() for d in dirs.values()):
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    build_bf16(dirs["bf16"], k2_config(size_gb), int(shard_gb * 1e9))
    for fmt in ("fp8", "int4"):
        convert.convert(dirs["bf16"], dirs[fmt], fmt, qscheme.for_target(fmt), workers=workers,
                        max_shard_size=int(shard_gb * 1e9), **kernel_kwargs("auto"))
    stamp.write_text(json.dumps(want))
    print(f"fixtures built in {time.perf_counter() - t0:.0f} s under {root}", file=sys.stderr)
    return dirs


# -- cache eviction and the disk bound -------------------------------------------------------------
def evict(paths: list[Path], drop_caches: bool) -> None:
    """Drop the files' pages from the page cache (fsync first: dirty pages cannot be dropped)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if drop_caches:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def shard_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def sequential_read(paths: list[Path], chunk: int = 64 << 20, direct: bool = False) -> tuple[int, float]:
    """(bytes, seconds) to read every file front to back with large reads, through the page cache or around it
    (O_DIRECT into an aligned buffer)."""
    buf = shards.aligned_empty(chunk)
    view = memoryview(buf)
    total, t0 = 0, time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            while n := os.readv(fd, [view]):
                total += n
        finally:
            os.close(fd)
    return total, time.perf_counter() - t0


def random_buffer(nbytes: int) -> np.ndarray:
    """Fresh random bytes in an aligned buffer (O_DIRECT writes need one; random: nothing compresses them)."""
    buf = shards.aligned_empty(nbytes)
    buf[:] = np.frombuffer(os.urandom(nbytes), dtype=np.uint8)
    return buf


def sequential_write(directory: Path, nbytes: int, chunk: int = 16 << 20, direct: bool = False) -> tuple[int, float]:
    """(bytes, seconds) to write ``nbytes`` of fresh data to one file with large writes, then fsync (through the
    page cache or, ``direct``, around it)."""
    buf = random_buffer(chunk)
    path = directory / "write-bound.tmp"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)
    try:
        for _ in range(max(1, nbytes // chunk)):
            os.write(fd, memoryview(buf))
        os.fsync(fd)
    finally:
        os.close(fd)
    secs = time.perf_counter() - t0
    path.unlink()
    return max(1, nbytes // chunk) * chunk, secs


def read_while_writing(src: list[Path], directory: Path, chunk: int = 16 << 20) -> tuple[int, float]:
    """(bytes read + written, seconds) with ``src`` read front to back (O_DIRECT) while another thread writes
    (O_DIRECT) for exactly as long: what the disk gives when a conversion does both at once."""
    done, written = threading.Event(), [0]
    buf = random_buffer(chunk)
    path = directory / "write-bound.tmp"

    def write() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            while not done.is_set():
                written[0] += os.write(fd, memoryview(buf))
        finally:
            os.close(fd)

    t = threading.Thread(target=write)
    t0 = time.perf_counter()
    t.start()
    nread, _ = sequential_read(src, direct=True)
    done.set()
    t.join()
    secs = time.perf_counter() - t0
    path.unlink()
    return nread + written[0], secs


def disk_bounds(src: list[Path], directory: Path, drop_caches: bool, modes: tuple[bool, ...] = (False, True)) -> dict:
    """The disk's best sequential read of ``src`` (cold) and write speed, each the faster of the page-cache and
    the O_DIRECT way (k2quant reads and writes big data around the page cache where it can; ``modes``: which
    to measure), and the speed of reading and writing at once (a disk whose bandwidth reads and writes share
    gives each less then)."""
    out = {}
    for direct in modes:
        evict(src, drop_caches)
        rb, rs = sequential_read(src, direct=direct)
        wb, ws = sequential_write(directory, 1 << 30, direct=direct)
        out["direct" if direct else "buffered"] = {"read_gb_s": rb / rs / 1e9, "write_gb_s": wb / ws / 1e9}
    evict(src, drop_caches)
    both, secs = read_while_writing(src, directory)
    evict(src, drop_caches)
    kinds = [k for k in ("buffered", "direct") if k in out]
    out["read_gb_s"] = max(out[k]["read_gb_s"] for k in kinds)
    out["write_gb_s"] = max(out[k]["write_gb_s"] for k in kinds)
    out["read_write_gb_s"] = both / secs / 1e9
    return out


# -- one conversion in a child process ---------------------------------------------------------------
def tree_rss(pid: int) -> tuple[int, int]:
    """(summed VmRSS, largest VmHWM) over ``pid`` and all its descendants, from /proc, in bytes.

    VmHWM is per address space, so unlike ``ru_maxrss`` it does not inherit the parent's RSS at fork.
    """
    total, hwm, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = dict(x.split(":", 1) for x in Path(f"/proc/{p}/status").read_text().splitlines() if ":" in x)
            total += int(fields["VmRSS"].split()[0]) * 1024
            hwm = max(hwm, int(fields["VmHWM"].split()[0]) * 1024)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, KeyError, ValueError):
            continue
    return total, hwm


def run_child(src: Path, dst: Path, target: str, workers: int, kernel: str | None, threads: int,
              max_shard_size: int) -> dict:
    """Run one conversion in a fresh interpreter; returns its report plus wall time and peak RSS."""
    cmd = [sys.executable, __file__, "--_child", json.dumps(
        {"src": str(src), "dst": str(dst), "target": target, "workers": workers, "kernel": kernel,
         "threads": threads, "max_shard_size": max_shard_size})]
    peak = [0, 0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            rss, hwm = tree_rss(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], hwm)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    _, status, _ = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"convert {src} -> {target} failed (exit {proc.returncode})")
    report = json.loads(out.strip().splitlines()[-1])
    return report | {"wall_s": wall, "peak_rss_tree": peak[0], "peak_rss_proc": max(peak[1], report["vm_hwm"])}


def run_llmc(python: str, src: Path, dst: Path, threads: int) -> dict:
    """llm-compressor's model_free_ptq on the same source, in its own venv's interpreter (bench/llmc_model_free.py):
    whole-process wall seconds, the call's seconds, and the peak RSS of its process tree."""
    cmd = [python, str(Path(__file__).with_name("llmc_model_free.py")), str(src), str(dst), "--threads", str(threads)]
    peak, done = [0], threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], tree_rss(proc.pid)[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    proc.wait()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    shutil.rmtree(dst, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"llm-compressor on {src} failed (exit {proc.returncode})")
    return {"llmc_wall_s": wall, "llmc_call_s": json.loads(out.strip().splitlines()[-1])["model_free_ptq_s"],
            "llmc_peak_rss": peak[0]}


def child_main(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    scheme = qscheme.for_target(spec["target"])
    t0 = time.perf_counter()
    report = convert.convert(spec["src"], spec["dst"], spec["target"], scheme, workers=spec["workers"],
                             force=True, max_shard_size=spec["max_shard_size"], **kernel_kwargs(spec["kernel"]))
    hwm = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    print(json.dumps(report.to_json() | {"convert_s": time.perf_counter() - t0, "vm_hwm": int(hwm.split()[1]) * 1024}))
    sys.stdout.flush()
    os._exit(0)  # as the k2quant command line ends a conversion (k2quant/cli/main.py: run): no teardown


# -- library and kernel rates on sampled expert tensors ----------------------------------------------
def sample_items(d: Path, kind: str, count: int) -> list[dict[str, torch.Tensor]]:
    """The stored tensors of ``count`` routed-expert modules (alternating gate/down shapes)."""
    idx = json.loads((d / INDEX).read_text())["weight_map"]
    part = {"bf16": ".weight", "fp8": ".weight", "int4": ".weight_packed"}[kind]
    mods = sorted(n[: -len(part)] for n in idx if ".experts." in n and n.endswith(part)
                  and (".gate_proj" in n or ".down_proj" in n))[:count]
    out = []
    for m in mods:
        names = [n for n in idx if n.startswith(m + ".")]
        infos = {n: shards.read_header(d / idx[n])[0][n] for n in names}
        out.append({n[len(m) + 1:]: shards.read_tensor(i) for n, i in infos.items()})
    return out


def rate(fn, items: list[dict[str, torch.Tensor]], numel) -> float:
    """Elements per second of ``fn`` over the items (best of 2 passes)."""
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        best = min(best, time.perf_counter() - t0)
    return sum(numel(it) for it in items) / best


def library_paths() -> dict:
    """compressed-tensors 0.20 entry points per direction (None where the library has no such path)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor as Packed
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    int4_scheme = QuantizationScheme(targets=["Linear"], weights=args)

    def int4_encode(w: torch.Tensor) -> dict:
        n, k = w.shape
        g = w.reshape(n, k // 32, 32)  # [N, K/g, g]
        scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
        return Packed.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, int4_scheme)

    def fp8_decode(it: dict) -> torch.Tensor:
        conv = FP8BlockDequantizer(targets=["m"], weight_block_size=[128, 128])
        return conv.process({"m.weight": it["weight"], "m.weight_scale_inv": it["weight_scale_inv"]})["m.weight"]

    def int4_decode(it: dict) -> torch.Tensor:
        return Packed.decompress({"weight_packed": it["weight_packed"], "weight_scale": it["weight_scale"],
                                  "weight_shape": it["weight_shape"]}, int4_scheme)["weight"]

    return {("bf16", "fp8"): None,
            ("fp8", "bf16"): fp8_decode,
            ("bf16", "int4"): lambda it: int4_encode(it["weight"]),
            ("fp8", "int4"): lambda it: int4_encode(fp8_decode(it).to(torch.bfloat16)),
            ("int4", "bf16"): int4_decode}


def k2quant_paths(kernel: str) -> dict:
    """The per-tensor work convert does per direction, with the fast or the reference kernels."""
    fp8s, int4s = qscheme.get("fp8-block-128"), qscheme.get("int4-g32")
    if kernel == "fast":
        from k2quant.quant import fast
        return {("bf16", "fp8"): lambda it: fast.fp8_quantize(it["weight"]),
                ("fp8", "bf16"): lambda it: fast.fp8_dequantize(it["weight"], it["weight_scale_inv"]),
                ("bf16", "int4"): lambda it: fast.int4_quantize_pack(it["weight"], 32, "library"),
                ("fp8", "int4"): lambda it: fast.fp8_to_int4(it["weight"], it["weight_scale_inv"], 32, "library"),
                ("int4", "bf16"): lambda it: fast.int4_unpack_dequantize(
                    it["weight_packed"], it["weight_scale"], int(it["weight_shape"][-1]), 32)}

    def fp8_decode(it: dict) -> torch.Tensor:
        return fp8_block.dequantize(it["weight"], it["weight_scale_inv"], fp8s, torch.bfloat16)

    def int4_encode(w: torch.Tensor) -> torch.Tensor:
        return int4_group.pack(int4_group.quantize_weight(w, int4s)[0])

    return {("bf16", "fp8"): lambda it: fp8_block.quantize_weight(it["weight"], fp8s),
            ("fp8", "bf16"): fp8_decode,
            ("bf16", "int4"): lambda it: int4_encode(it["weight"]),
            ("fp8", "int4"): lambda it: int4_encode(fp8_decode(it)),
            ("int4", "bf16"): lambda it: int4_group.dequantize(
                int4_group.unpack(it["weight_packed"], int(it["weight_shape"][-1])), it["weight_scale"], int4s)}


def kernel_rates(dirs: dict[str, Path], samples: int) -> dict:
    """Melem/s of the library, the reference and the fast kernels on the same sampled expert tensors."""
    def numel(it: dict) -> int:
        return int(torch.Size(it["weight_shape"].tolist()).numel()) if "weight_shape" in it else it["weight"].numel()

    paths = {"library": library_paths(), "reference": k2quant_paths("reference")}
    try:
        from k2quant.quant import fast
        if fast.available():
            paths["fast"] = k2quant_paths("fast")
    except ImportError:
        pass
    out = {}
    for src, dst in DIRECTIONS:
        items = sample_items(dirs[src], src, samples)
        out[f"{src}->{dst}"] = {name: (rate(p[(src, dst)], items, numel) if p[(src, dst)] else None)
                                for name, p in paths.items()}
    return out


def best_rates(measured: list[dict]) -> dict:
    """Each direction's and path's best rate over several ``kernel_rates`` measurements."""
    return {d: {path: (None if measured[0][d][path] is None else max(m[d][path] for m in measured))
                for path in measured[0][d]} for d in measured[0]}


# -- report ----------------------------------------------------------------------------------------
def render(rows: list[dict], disk: dict, meta: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"k2quant convert, {meta['fixture_gb']:.2f} GB BF16 fixture, workers={meta['workers']}, "
                    f"threads={meta['threads']}")
    for col in ("direction", "kernel", "run", "Melem/s", "src GB/s", "read GB/s", "write GB/s", "r+w GB/s", "% disk bound",
                "% I/O bound", "x library", "x lib wall", "kernel x library",
                "peak RSS tree", "peak RSS proc", "convert s", "wall s"):
        t.add_column(col, justify="right")
    for r in rows:
        fmt = lambda x, f: "n/a" if x is None else f.format(x)  # noqa: E731
        t.add_row(r["direction"], r["kernel"], str(r.get("rep", 0) + 1), fmt(r["melem_s"], "{:.0f}"), fmt(r["src_gb_s"], "{:.2f}"),
                  fmt(r["read_gb_s"], "{:.2f}"), fmt(r["write_gb_s"], "{:.2f}"), fmt(r.get("rw_gb_s"), "{:.2f}"),
                  fmt(r["pct_disk_bound"], "{:.0f}%"), fmt(r["pct_io_bound"], "{:.0f}%"), fmt(r["x_library"], "{:.1f}x"),
                  fmt(r["x_library_wall"], "{:.1f}x"),
                  fmt(r["kernel_x_library"], "{:.1f}x"), f"{r['peak_rss_tree'] / GIB:.2f} GiB",
                  f"{r['peak_rss_proc'] / GIB:.2f} GiB", f"{r['convert_s']:.1f}", f"{r['wall_s']:.1f}")
    console = Console(width=200)
    console.print(t)
    console.print("bounds: the mean of a measurement right before each run and one right after it: read GB/s = the same source shards read sequentially "
                  "(64 MiB reads, after eviction); write GB/s = 1 GiB written sequentially + fsync; each the faster "
                  "of the page cache and O_DIRECT; r+w GB/s = bytes read and written per second with both at once "
                  "(O_DIRECT); I/O bound = max(source bytes / read speed, output bytes / write speed, (source + "
                  "output bytes) / r+w speed)")
    for r in rows:
        if r.get("llmc_wall_s"):
            console.print(f"{r['direction']}: llm-compressor model_free_ptq {r['llmc_wall_s']:.1f} s whole process "
                          f"({r['llmc_call_s']:.1f} s in the call), peak RSS {r['llmc_peak_rss'] / GIB:.2f} GiB; "
                          f"k2quant {r['wall_s']:.1f} s whole process: {r['x_llmc_wall']:.1f}x "
                          f"({r['x_llmc']:.1f}x in the call)")
    summary(rows, console)
    console.print(f"cache eviction: {meta['eviction']}")


def summary(rows: list[dict], console) -> None:
    """Median and range over the repeats of each direction and kernel (``--repeat``)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["direction"], r["kernel"]), []).append(r)
    if all(len(g) < 2 for g in groups.values()):
        return
    console.print("over the repeats, median [min-max]:", markup=False)
    for (direction, kernel), g in groups.items():
        def stat(key: str, fmt: str) -> str:
            v = sorted(x[key] for x in g if x.get(key) is not None)
            if not v:
                return "n/a"
            return f"{fmt.format(statistics.median(v))} [{fmt.format(v[0])}-{fmt.format(v[-1])}]"
        line = (f"  {direction} {kernel} x{len(g)}: wall {stat('wall_s', '{:.1f}')} s, in the call "
                f"{stat('convert_s', '{:.1f}')} s, % I/O bound {stat('pct_io_bound', '{:.0f}')}, x library "
                f"{stat('x_library', '{:.1f}')}, x lib wall {stat('x_library_wall', '{:.1f}')}")
        llmc = next((x for x in g if x.get("llmc_wall_s")), None)
        if llmc:
            walls = sorted(x["wall_s"] for x in g)
            line += (f"; llm-compressor {llmc['llmc_wall_s']:.1f} s whole process over k2quant's median "
                     f"{statistics.median(walls):.1f} s: {llmc['llmc_wall_s'] / statistics.median(walls):.1f}x "
                     f"[{llmc['llmc_wall_s'] / walls[-1]:.1f}-{llmc['llmc_wall_s'] / walls[0]:.1f}x]")
        console.print(line, markup=False, soft_wrap=True)


def elements(d: Path) -> int:
    """Weight elements of a checkpoint (INT4 counted by weight_shape, not packed words)."""
    idx = json.loads((d / INDEX).read_text())["weight_map"]
    total = 0
    for f in sorted(set(idx.values())):
        infos, _ = shards.read_header(d / f)
        for n, i in infos.items():
            if n.endswith(".weight_packed"):
                total += 8 * i.numel
            elif not n.endswith(("_scale", "_scale_inv", "_shape")):
                total += i.numel
    return total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path(__file__).parent / "out" / "fixture")
    ap.add_argument("--size-gb", type=float, default=6.0, help="BF16 fixture size (>= 6 for the issue's numbers)")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="shard size of fixtures and outputs (release: 5)")
    ap.add_argument("--workers", type=int, default=1, help="convert --workers (1: measured fastest on 2 cores)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch/numba threads per process")
    ap.add_argument("--kernels", default="auto,reference",
                    help="comma list passed to convert(kernel=...); ignored if convert has no such option")
    ap.add_argument("--directions", default=",".join(f"{a}->{b}" for a, b in DIRECTIONS))
    ap.add_argument("--samples", type=int, default=3, help="expert tensors per direction for library rates")
    ap.add_argument("--drop-caches", action="store_true", help="also drop the global page cache (root)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--cold-arch", action="store_true",
                    help="a fresh K2QUANT_CACHE_DIR per run: each run builds the model description with transformers")
    ap.add_argument("--llmc", metavar="PYTHON", help="the interpreter of a venv with llm-compressor (bench/README.md): "
                    "also run its model_free_ptq on the same source for each ->int4 direction")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per direction (each after its own bound measurement); the summary gives the median "
                         "and range: on a disk whose speed moves, one run says little")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child:
        return child_main(json.loads(a._child))
    dirs = build_fixtures(a.dir, a.size_gb, a.shard_gb, a.workers)
    kernels = [k for k in a.kernels.split(",") if k] if kernel_kwargs("auto") else [None]
    # the machine's load moves too (the library's rate moved 47-106 Melem/s between runs): with --repeat, each
    # path's rates are measured that many times and its best kept, so no path is judged at a bad moment
    rates = best_rates([kernel_rates(dirs, a.samples) for _ in range(max(1, a.repeat))])
    disk, rows = {}, []
    for fmt, d in dirs.items():
        evict(shard_files(d), a.drop_caches)
        nbytes, secs = sequential_read(shard_files(d))
        disk[fmt] = {"bytes": nbytes, "seconds": secs, "gb_s": nbytes / secs / 1e9}
    out_dir = a.dir.parent / "convert-out"
    for direction in a.directions.split(","):
        src, dst = direction.split("->")
        n = elements(dirs[src])
        for kernel, rep in ((k, i) for k in kernels for i in range(max(1, a.repeat))):
            shutil.rmtree(out_dir, ignore_errors=True)
            # the disk moves (a shared virtual disk here): measure its bounds right before each run
            bounds = disk_bounds(shard_files(dirs[src]), a.dir.parent, a.drop_caches)
            if a.cold_arch:
                os.environ["K2QUANT_CACHE_DIR"] = str(a.dir.parent / f"arch-cache-{time.time_ns()}")
            r = run_child(dirs[src], out_dir, dst, a.workers, kernel, a.threads, int(a.shard_gb * 1e9))
            # and right after it (O_DIRECT only, as k2quant does it here): the bound is the mean of the two, and a
            # run is never judged against a moment of the disk it did not see
            after = disk_bounds(shard_files(dirs[src]), a.dir.parent, a.drop_caches, modes=(True,))
            bounds = {"before": bounds, "after": after} | {k: (bounds[k] + after[k]) / 2 for k in
                                                            ("read_gb_s", "write_gb_s", "read_write_gb_s")}
            read_s, write_s = r["bytes_in"] / 1e9 / bounds["read_gb_s"], r["bytes_out"] / 1e9 / bounds["write_gb_s"]
            both_s = (r["bytes_in"] + r["bytes_out"]) / 1e9 / bounds["read_write_gb_s"]
            lib = rates[direction]["library"]
            mine = rates[direction].get("fast" if kernel in (None, "auto", "fast") else "reference")
            rows.append({"direction": direction, "kernel": kernel or "default", "rep": rep, "elements": n,
                         "src_bytes": r["bytes_in"], "dst_bytes": r["bytes_out"], "wall_s": r["wall_s"],
                         "convert_s": r["convert_s"], "read_gb_s": bounds["read_gb_s"],
                         "write_gb_s": bounds["write_gb_s"], "bounds": bounds,
                         "melem_s": n / r["convert_s"] / 1e6, "src_gb_s": r["bytes_in"] / r["convert_s"] / 1e9,
                         "pct_disk_bound": 100 * read_s / r["convert_s"],
                         # the I/O bound: read the source and write the output, overlapped, on a disk
                         # that may share its bandwidth between the two
                         "pct_io_bound": 100 * max(read_s, write_s, both_s) / r["convert_s"],
                         "rw_gb_s": bounds["read_write_gb_s"],
                         "x_library": None if lib is None else n / r["convert_s"] / lib,
                         # the whole process: interpreter, imports, kernel loading, the call, exit
                         "x_library_wall": None if lib is None else n / r["wall_s"] / lib,
                         "kernel_x_library": None if lib is None or mine is None else mine / lib,
                         "peak_rss_tree": r["peak_rss_tree"], "peak_rss_proc": r["peak_rss_proc"]})
            if a.llmc and dst == "int4" and kernel in (None, "auto", "fast") and rep == 0:  # ~1-2 min each
                evict(shard_files(dirs[src]), a.drop_caches)
                llmc = run_llmc(a.llmc, dirs[src], out_dir.with_name("llmc-out"), a.threads)
                rows[-1] |= llmc | {"x_llmc_wall": llmc["llmc_wall_s"] / r["wall_s"],
                                    "x_llmc": llmc["llmc_call_s"] / r["convert_s"]}
            print(json.dumps(rows[-1]), file=sys.stderr)
    shutil.rmtree(out_dir, ignore_errors=True)
    meta = {"fixture_gb": disk["bf16"]["bytes"] / 1e9, "workers": a.workers, "threads": a.threads,
            "eviction": "fsync + posix_fadvise(DONTNEED) on every source shard before each run"
                        + (" + /proc/sys/vm/drop_caches" if a.drop_caches else ""),
            "kernel_melem_s": {d: {k: (None if v is None else v / 1e6) for k, v in r.items()}
                               for d, r in rates.items()},
            "torch": torch.__version__, "cpus": os.cpu_count(), "max_rss_self": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss * 1024}
    render(rows, disk, meta)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"meta": meta, "disk": disk, "runs": rows}, indent=2))


if __name__ == "__main__":  # convert --workers spawns processes that import this file as __mp_main__
    main()
