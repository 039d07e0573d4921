"""``k2quant convert``, ``inspect``, ``verify`` and ``make-tiny``: the checkpoint commands.

Parse options, build a scheme, call one library function, render with rich.
"""
from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from k2quant.cli.common import console, out
from k2quant.cli.options import emit_json, human, json_option, name_list, parse_size
from k2quant.errors import K2QuantError
from k2quant.quant.names import (
    CALIB_SAMPLES, CALIB_SEQ_LEN, CONVERT_INT4_RULE, FORMATS, INT4_GROUP_SIZE, INT4_RULES, KERNELS, METHODS, RECIPES,
)


@click.command()
@click.argument("src", type=click.Path(file_okay=False, path_type=str))
@click.argument("dst", type=click.Path(file_okay=False, path_type=str))
@click.option("--to", "target", required=True, type=click.Choice(FORMATS), help="Target format.")
@click.option("--group-size", type=int, default=None, help=f"INT4 group size (default {INT4_GROUP_SIZE}).")
@click.option("--scale-rule", type=click.Choice(INT4_RULES), default=None,
              help=f"INT4 scales: library = compressed-tensors amax/7.5; kimi = K2-Thinking's amax/7, codes -7..7 "
                   f"(default {CONVERT_INT4_RULE}).")
@click.option("--targets", multiple=True, help="INT4 modules to quantize, as compressed-tensors reads them: Linear "
              "(every Linear), a class name, an exact module name or re:regex (re.match); repeatable. "
              "Default: the routed experts.")
@click.option("--ignore", multiple=True, help="INT4 modules to leave BF16. Default: Kimi's four-entry list.")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=None,
              help="INT4 selection by name, read from the model: experts = routed experts only (K2-Thinking); "
              "linear = every Linear but lm_head; mlp = MLPs and experts only.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Output shard size.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Output shards converted in parallel processes, at most one per core, threads split between "
                   "them. One process already uses every core: more pay only for many large shards.")
@click.option("--device", default="cpu", show_default=True, help="Where the kernels run (cpu, cuda, cuda:1).")
@click.option("--kernel", type=click.Choice(KERNELS), default="auto", show_default=True,
              help="fast = compiled CPU kernels (numba); reference = pure torch (any device). Same bytes.")
@click.option("--force", is_flag=True, help="Write into a non-empty output directory (clears old k2quant outputs).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run: keep finished shards, redo the rest.")
@click.option("--rank", type=int, default=None, help="This process's rank when several machines share the work "
              "(torchrun sets RANK/WORLD_SIZE itself).")
@click.option("--world-size", type=int, default=None, help="Number of ranks sharing the work.")
@click.option("--method", type=click.Choice(METHODS), default="rtn", show_default=True,
              help="INT4 codes: rtn = round to nearest; gptq = calibrated on --calib-data, one layer at a time.")
@click.option("--calib-data", multiple=True, help="GPTQ calibration text: a .txt/.md/.jsonl file or a directory "
              "of them (repeatable).")
@click.option("--calib-samples", type=int, default=None, help=f"GPTQ calibration sequences (default {CALIB_SAMPLES}).")
@click.option("--calib-seq-len", type=int, default=None, help=f"Tokens per calibration sequence (default {CALIB_SEQ_LEN}).")
@click.option("--wait-timeout", type=click.FloatRange(min=0), default=24 * 3600.0, show_default=True,
              help="With --rank/--world-size: seconds a rank waits for the others (at most 600 for rank 0 to start).")
@click.option("--trust-remote-code", is_flag=True, help="Also copy SRC's *.py files (code that loaders run with "
              "trust_remote_code); off by default.")
@json_option("conversion summary")
def convert(src, dst, target, group_size, scale_rule, targets, ignore, recipe, max_shard_size, workers, device,
            kernel, force, resume, rank, world_size, wait_timeout, trust_remote_code, method, calib_data,
            calib_samples, calib_seq_len, as_json) -> None:
    """Convert checkpoint SRC into DST in another format (bf16, fp8, int4)."""
    from k2quant.formats import convert as conv
    from k2quant.formats import selection
    from k2quant.quant.scheme import for_target

    if target != "int4" and (group_size or scale_rule or targets or ignore):
        raise K2QuantError("--group-size/--scale-rule/--targets/--ignore apply to --to int4 only")
    if target != "int4" and recipe:
        raise K2QuantError(f"--recipe applies to --to int4 only; --to {target} quantizes every Linear but lm_head")
    targets, ignore = selection.with_recipe(recipe, src, name_list("--targets", targets),
                                            name_list("--ignore", ignore) if ignore else None)
    scheme = for_target(target, group_size, scale_rule, targets, ignore)
    _check_method(target, method, calib_data, calib_samples, calib_seq_len, workers, rank, world_size)
    if method == "gptq":
        _convert_gptq(src, dst, scheme, calib_data, calib_samples or CALIB_SAMPLES, calib_seq_len or CALIB_SEQ_LEN,
                      parse_size(max_shard_size), device, force, resume, as_json)
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[items]} modules"),
               DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    bar = Progress(*columns, console=console, disable=as_json == "-")
    task = bar.add_task(target, total=None, items=0)

    def on_plan(p) -> None:  # the plan passed every check: start showing progress
        bar.update(task, total=p.src_bytes, description=f"{p.source_format.name} → {target}")
        bar.start()

    def progress(n: int, nbytes: int) -> None:
        bar.update(task, advance=nbytes, items=bar.tasks[task].fields["items"] + n)

    try:
        with _interruptible(dst):
            report = conv.convert(src, dst, target, scheme, max_shard_size=parse_size(max_shard_size),
                                  workers=workers, force=force, resume=resume, device=device, kernel=kernel,
                                  rank=rank, world_size=world_size, wait_timeout=wait_timeout, progress=progress,
                                  on_plan=on_plan, trust_remote_code=trust_remote_code,
                                  on_wait=lambda msg: console.print(msg, highlight=False))
    finally:
        bar.stop()
    if report.remote_code_skipped:
        console.print(f"not copied (remote code, pass --trust-remote-code to copy): "
                      f"{', '.join(report.remote_code_skipped)}", highlight=False)
    if emit_json(as_json, report.to_json()):
        return
    t = Table(title=f"{report.source_format} → {report.target}: {report.dst}")
    for col in ("class", "modules", "bytes in", "bytes out"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for cls, c in report.by_class.items():
        t.add_row(cls, str(c["count"]), human(c["bytes_in"]), human(c["bytes_out"]))
    t.add_row("[bold]total", str(sum(c["count"] for c in report.by_class.values())), human(report.bytes_in),
              human(report.bytes_out))
    out.print(t)
    rate = report.bytes_in / report.seconds / 1e6 if report.seconds else 0
    kept = f" ({report.shards_kept} kept from the interrupted run)" if report.shards_kept else ""
    ranks = f", rank {report.rank} of {report.world_size}" if report.world_size > 1 else ""
    out.print(f"{report.tensors_in} → {report.tensors_out} tensors, {report.shards} shard(s){kept}, "
              f"{report.seconds:.2f} s ({rate:.0f} MB/s of source, {report.kernel} kernels{ranks})")


@contextlib.contextmanager
def _interruptible(dst: str):
    """Ctrl-C and SIGTERM stop the run (the library stops its workers and removes temp files): say how to go on."""
    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt:
        console.print(f"[bold red]interrupted:[/] finished shards are kept in {dst}; run the same command with "
                      f"--resume to continue", highlight=False)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, old)


def _check_method(target, method, calib_data, calib_samples, calib_seq_len, workers, rank, world_size) -> None:
    calib = {"--calib-data": calib_data, "--calib-samples": calib_samples, "--calib-seq-len": calib_seq_len}
    given = [k for k, v in calib.items() if v]
    problems = []
    if method == "rtn" and given:
        problems.append(f"{'/'.join(given)} calibrate --method gptq only; add --method gptq or drop them")
    if method == "gptq":
        if target != "int4":
            problems.append(f"--method gptq writes INT4; use --to int4 (got --to {target})")
        if not calib_data:
            problems.append("--method gptq needs --calib-data PATH (text, jsonl, or a directory of them)")
        for flag, v in (("--calib-samples", calib_samples), ("--calib-seq-len", calib_seq_len)):
            if v is not None and v < 1:
                problems.append(f"{flag} must be a positive integer, got {v}")
        if workers > 1 or rank is not None or world_size is not None:
            problems.append("--method gptq runs the layers in order in one process; drop --workers/--rank/"
                            "--world-size")
    if problems:
        raise K2QuantError("; ".join(problems))


def _convert_gptq(src, dst, scheme, calib_data, samples, seq_len, max_shard_size, device, force, resume,
                  as_json) -> None:
    from k2quant.formats import calibrate

    calib = calibrate.CalibConfig(data=tuple(calib_data), samples=samples, seq_len=seq_len, device=device)
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("layer {task.completed:.0f}/"
                   "{task.total}"), TextColumn("{task.fields[name]}"), TimeRemainingColumn(), console=console,
                   disable=as_json == "-")
    task = bar.add_task("gptq", total=None, name="")

    def on_plan(p) -> None:
        bar.update(task, description=f"{p.source_format.name} → int4 (gptq)")
        bar.start()

    def progress(done: int, total: int, name: str) -> None:
        bar.update(task, completed=done, total=total, name=name)

    try:
        report = calibrate.run(src, dst, scheme, calib, max_shard_size=max_shard_size, force=force, resume=resume,
                               progress=progress, on_plan=on_plan)
    finally:
        bar.stop()
    if emit_json(as_json, report.to_json()):
        return
    t = Table(title=f"{report.source_format} → int4 (gptq): {report.dst}")
    for col in ("layer", "experts", "tokens", "routed min / median / max", "no tokens", f"< {calib.expert_prior:g}"):
        t.add_column(col, justify="left" if col == "layer" else "right")
    for layer, cov in report.expert_coverage.items():
        for c in cov.values():
            t.add_row(layer, str(c["experts"]), str(c["tokens"]), f"{c['min']} / {c['median']} / {c['max']}",
                      str(c["zero"]), str(c["below_prior"]))
    if report.expert_coverage:
        out.print(t)
    kept = f" ({report.layers_kept} kept from the interrupted run)" if report.layers_kept else ""
    out.print(f"{report.modules_calibrated} modules calibrated in {report.layers} layers{kept} on {report.tokens} "
              f"tokens, {report.seconds:.2f} s ({report.seconds_gptq:.2f} s in GPTQ)")


@click.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--check-rule", type=int, default=16, show_default=True,
              help="INT4: modules to requantize when telling which scale rule the checkpoint follows (0 = all).")
@json_option("inspect report")
def inspect(path, check_rule, as_json) -> None:
    """What checkpoint PATH holds: format, tensor classes, bytes, size in each target format."""
    from k2quant.formats import inspect as insp

    r = insp.inspect(path, check_rule)
    if emit_json(as_json, r.to_json()):
        return
    out.print(f"[bold]{r.path}[/]: {r.format} ({r.model_type}), {r.tensors} tensors in {r.shards} shard(s), "
              f"{human(r.stored_bytes)}")
    if r.int4_rule:
        k = r.int4_rule
        out.print(f"INT4 scale rule: [bold]{k['rule']}[/] ({k['reproduced_by_kimi_rule']}/{k['modules_checked']} "
                  f"modules reproduced by the kimi rule, {k['modules_with_code_-8']} use code -8)")
    t = Table()
    for col in ("class", "tensors", "params", "dtypes", "bytes"):
        t.add_column(col, justify="left" if col in ("class", "dtypes") else "right")
    for cls, c in r.classes.items():
        t.add_row(cls, str(c["tensors"]), f"{c['params']:,}", ",".join(c["dtypes"]), human(c["bytes"]))
    out.print(t)
    s = Table(title="size in each target format (tensor bytes)")
    for fmt in r.sizes:
        s.add_column(fmt, justify="right")
    s.add_row(*(f"{human(v)} ({v:,})" for v in r.sizes.values()))
    out.print(s)


@click.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.argument("dst", type=click.Path(exists=True, file_okay=False, path_type=str))
@json_option("verify report")
def verify(src, dst, as_json) -> None:
    """Check that DST is a correct conversion of SRC (exit 1 if not)."""
    from k2quant.formats import verify as ver

    bar = Progress(TextColumn("[bold]verify"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   console=console, disable=as_json == "-")
    task = bar.add_task("verify", total=None)

    def on_start(total: int) -> None:
        bar.update(task, total=total)
        bar.start()

    try:
        r = ver.verify(src, dst, progress=lambda n, b: bar.update(task, advance=b), on_start=on_start)
    finally:
        bar.stop()
    if not emit_json(as_json, r.to_json()):
        c = r.checked
        out.print(f"[bold]{r.dst}[/] ({r.format}) against {r.src}: {c.get('items', 0)} source items, "
                  f"{c.get('quantized', 0)} quantized within bounds checked, {c.get('exact', 0)} exact, "
                  f"{c.get('codes_kept', 0)} kept byte for byte, {c.get('shards_hashed', 0)} shard hashes")
        if r.max_error:
            out.print("worst error / allowed bound: " + ", ".join(f"{k} {v:.3f}" for k, v in r.max_error.items()))
        if r.problems:
            t = Table(title=f"{len(r.problems)} problem(s)")
            for col in ("file", "tensor", "problem"):
                t.add_column(col, overflow="fold")
            for p in r.problems[:50]:
                t.add_row(Path(p["file"]).name, p["tensor"], p["problem"])
            out.print(t)
        out.print("[bold green]OK[/]" if r.ok else "[bold red]FAILED[/]")
    if not r.ok:
        sys.exit(1)


@click.command("make-tiny")
@click.argument("dst", type=click.Path(file_okay=False, path_type=str))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="fp8", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def make_tiny(dst, fmt, seed) -> None:
    """Write the embedded tiny Kimi-K2-architecture checkpoint (random weights) to DST."""
    from k2quant.formats import tiny

    if Path(dst).exists() and any(Path(dst).iterdir()):
        raise K2QuantError(f"{dst}: not empty; choose an empty or new directory")
    try:
        tiny.build(dst, fmt, seed=seed)
    except OSError as exc:
        raise K2QuantError(f"{dst}: cannot write the tiny checkpoint ({exc.strerror}); choose a writable "
                           f"directory") from None
    out.print(f"wrote a tiny K2 checkpoint ({fmt}) to {dst}")
