"""``k2quant plan``: will this checkpoint, in this format, serve this context on these GPUs?

Parses the options, calls ``formats.capacity.estimate`` once, renders the report side by side per format
(rich) or as JSON. Bad input raises ``K2QuantError``; the main CLI prints it and exits 2.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from k2quant.cli.options import emit_json, json_option, parse_gpus, parse_tokens
from k2quant.formats.serving import DEFAULT_RESERVE, GIB, GPUS, KV_DTYPES, Gpu
from k2quant.quant.names import FORMATS

if TYPE_CHECKING:
    from k2quant.formats.capacity import CapacityReport, FormatFit
from k2quant.errors import K2QuantError

GB = 10**9


@click.command("plan")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--gpus", required=True, help="COUNTxNAME, e.g. 8xH200, 16xH100 (names: "
              + ", ".join(GPUS) + ").")
@click.option("--gpu-mem", default=None, help="Memory per GPU with a unit (96GiB, 150GB); overrides the GPU table.")
@click.option("--context", default=None, help="Tokens per request: 131072, 128k, 1m (k = 1024). "
              "Default: the config's max_position_embeddings.")
@click.option("--batch", default=1, show_default=True, type=int, help="Concurrent requests at full context.")
@click.option("--formats", default=",".join(FORMATS), show_default=True, help="Comma-separated formats to compare.")
@click.option("--tp", type=int, default=None, help="Tensor-parallel size (default: GPUs / ep).")
@click.option("--ep", type=int, default=None, help="Expert-parallel groups; tp x ep = GPUs (default 1).")
@click.option("--dcp", type=int, default=1, show_default=True,
              help="Decode context parallel: split each request's KV tokens over this many TP ranks.")
@click.option("--kv-dtype", type=click.Choice(sorted(KV_DTYPES)), default="bf16", show_default=True)
@click.option("--reserve", type=float, default=DEFAULT_RESERVE, show_default=True,
              help="Fraction of each GPU kept for activations and workspace (vLLM's default leaves 0.10).")
@json_option("report (all sizes in bytes)")
def plan(model: str, gpus: str, gpu_mem: str | None, context: str | None, batch: int, formats: str,
         tp: int | None, ep: int | None, dcp: int, kv_dtype: str, reserve: float, as_json: str | None) -> None:
    """Weights, KV cache and reserve per GPU for each format of MODEL (checkpoint dir or config.json)."""
    from k2quant.formats import capacity

    count, gpu = parse_gpus(gpus, gpu_mem)
    cluster = capacity.make_cluster(count, gpu, tp, ep, dcp)
    tokens = parse_tokens(context) if context is not None else None
    fmts = tuple(f.strip() for f in formats.split(",") if f.strip())
    if not fmts:
        raise K2QuantError(f"--formats {formats!r} names no format; give a comma-separated list, e.g. bf16,fp8,int4")
    report = capacity.estimate(model, cluster, tokens, batch, fmts, kv_dtype, reserve)
    if not emit_json(as_json, report.to_json(), indent=2):
        render(report, Console(width=max(100, Console().width)))


def render(report: CapacityReport, console: Console) -> None:
    """Header lines, the side-by-side table, then the notes."""
    r = report
    src = "real shard headers" if r.sizes_from == "headers" else "config.json (no shards)"
    console.print(f"[bold]{r.source}[/]: sizes from {src}; {r.params / 1e9:,.1f} B parameters")
    console.print(f"KV cache (MLA latent): {r.num_hidden_layers} layers x {r.kv_values_per_token_per_layer} values x "
                  f"{KV_DTYPES[r.kv_dtype]} B ({r.kv_dtype}) = {r.kv_bytes_per_token:,} B per token")
    c = r.cluster
    console.print(f"{c.count} x {c.gpu.name} at {_gib(c.gpu.mem_bytes)} each ({_basis(c.gpu)}); TP {c.tp} x EP {c.ep}"
                  + (f", DCP {c.dcp}" if c.dcp > 1 else ""))
    console.print(f"context {r.context:,} tokens x batch {r.batch}; reserve {r.reserve * 100:g}% of each GPU")
    console.print(table(r))
    for note in r.notes:
        console.print(f"note: {note}")


def table(r: CapacityReport) -> Table:
    """One column per format; rows in the order the per-GPU total adds up."""
    kv_tokens, kv_requests = -(-r.context // r.cluster.dcp), -(-r.batch // r.cluster.ep)  # cached on one GPU
    t = Table(show_edge=False, header_style="bold")
    t.add_column("")
    for p in r.formats:
        t.add_column(p.format, justify="right")
    rows: list[tuple[str, Callable[[FormatFit], str]]] = [
        ("weights, checkpoint (GB = 1e9 B)", lambda p: f"{p.weight_bytes / GB:,.1f} GB"),
        ("  of which scales", lambda p: f"{p.scale_bytes / GB:,.2f} GB"),
        ("weights per GPU", lambda p: _gib(p.weight_bytes_per_gpu)),
        (f"KV cache per GPU ({kv_tokens:,} tok x {kv_requests} req)", lambda p: _gib(p.kv_bytes_per_gpu)),
        (f"reserve ({r.reserve * 100:g}%)", lambda p: _gib(p.reserve_bytes)),
        ("total per GPU", lambda p: _gib(p.total_bytes_per_gpu)),
        ("GPU memory", lambda p: _gib(r.cluster.gpu.mem_bytes)),
        ("headroom", lambda p: _gib(p.headroom_bytes)),
        ("verdict", lambda p: _verdict(p)),
        (f"max context at batch {r.batch}", lambda p: f"{p.max_context:,}"),
        (f"max batch at {r.context:,}", lambda p: f"{p.max_batch:,}"),
    ]
    for label, cell in rows:
        t.add_row(label, *(cell(p) for p in r.formats))
    return t


def _basis(gpu: Gpu) -> str:
    if gpu.source == "--gpu-mem":
        return f"--gpu-mem {gpu.label}"
    return f"driver-reported total; sold as {gpu.label}"


def _verdict(p: FormatFit) -> str:
    if p.fits:
        return "[green]fits[/]"
    mem = p.total_bytes_per_gpu + p.headroom_bytes
    return "[red]does not fit[/]" + (" (weights alone)" if p.weight_bytes_per_gpu + p.reserve_bytes > mem else "")


def _gib(n: int) -> str:
    return f"{n / GIB:,.2f} GiB"
