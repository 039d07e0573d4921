"""``k2quant eval`` and ``k2quant diff``: parse options, call the library, render rich tables.

Registered on the main group in ``k2quant/cli/main.py``. Bad input raises ``K2QuantError`` (the main CLI
prints it as one line and exits 2); an unmet ``--fail-under`` exits 1.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from k2quant.cli.options import emit_json, json_option
from k2quant.errors import K2QuantError


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 10 ** -digits):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}f}"


def _signed(v: float, digits: int = 4) -> str:
    text = _fmt(v, digits)
    return text if text.startswith("-") else "+" + text


def _limit(value: str | None) -> int | float | None:
    if value is None:
        return None
    try:
        x = float(value)
    except ValueError:
        raise K2QuantError(f"--limit {value!r}: expected a document count (e.g. 200) or a fraction (e.g. 0.1)") from None
    if not (0 < x < float("inf")):
        raise K2QuantError(f"--limit {value!r}: must be a positive document count (e.g. 200) or a fraction in "
                           f"(0, 1) (e.g. 0.1)")
    return int(x) if x >= 1 and x == int(x) else x


def _pairs(items: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise K2QuantError(f"--model-arg {item!r}: expected KEY=VALUE, e.g. gpu_memory_utilization=0.9")
        out.append((key.strip(), value.strip()))
    return tuple(out)


# -- eval ----------------------------------------------------------------------------------------
def metrics_table(rep) -> Table:
    """Per task and metric: the baseline, then per candidate its value, delta +- paired SE, recovery."""
    t = Table(title=f"k2quant eval: baseline {rep.baseline}", title_justify="left")
    for col in ("task", "metric", "", rep.baseline):
        t.add_column(col, justify="right" if col == rep.baseline else "left")
    for c in rep.candidates:
        t.add_column(c, justify="right")
        t.add_column("Δ ± se", justify="right")
        t.add_column("recovery", justify="right")
    for r in rep.rows:
        cells = [r.task, r.metric, "↑" if r.higher_is_better else "↓", _fmt(r.baseline)]
        for c in r.candidates:
            se = "" if c.delta_se is None else f" ± {_fmt(c.delta_se)}"
            rec = "n/a" if c.recovery_pct is None else f"{c.recovery_pct:.2f}%"
            cells += [_fmt(c.value), f"{_signed(c.delta)}{se}", rec]
        t.add_row(*cells)
    return t


def flips_table(rep) -> Table | None:
    rows = [(c, f) for c, fl in rep.flips.items() for f in fl]
    if not rows:
        return None
    t = Table(title="paired multiple choice (acc)", title_justify="left")
    for col in ("candidate", "task", "n", "right→wrong", "wrong→right", "same choice", "McNemar p"):
        t.add_column(col, justify="left" if col in ("candidate", "task") else "right")
    for c, f in rows:
        same = "n/a" if f.same_choice_pct is None else f"{f.same_choice_pct:.1f}%"
        t.add_row(c, f.task, str(f.n), str(f.right_to_wrong), str(f.wrong_to_right), same,
                  f"{f.mcnemar_p:.3g}")
    return t


def direct_table(rep) -> Table | None:
    if not rep.direct:
        return None
    t = Table(title=f"direct measures vs {rep.baseline} (full next-token distributions)", title_justify="left")
    for col in ("candidate", "tokens", "mean KL ± se", "p99 KL", "max KL", "same top-1", "PPL ratio", "Δp mean",
                "Δp RMS"):
        t.add_column(col, justify="left" if col == "candidate" else "right")
    for c, m in rep.direct.items():
        t.add_row(c, str(m.tokens), f"{_fmt(m.kl_mean, 5)} ± {_fmt(m.kl_se, 5)}", _fmt(m.kl_p99, 5),
                  _fmt(m.kl_max, 5), f"{m.top1_pct:.2f}% ± {m.top1_se_pct:.2f}", f"{m.ppl_ratio:.5f}",
                  _signed(m.dp_mean, 5), _fmt(m.dp_rms, 5))
    return t


def settings_from_options(*, tasks: str = "k2quant_ppl,k2quant_mc", backend: str = "hf", tp: int | None = None,
                          ep: bool | None = None, model_args: tuple[str, ...] = (), base_urls: tuple[str, ...] = (),
                          limit: str | None = None, batch_size: int = 16, max_length: int = 512,
                          num_fewshot: int | None = None, dtype: str = "float32", seed: int = 0,
                          text_files: tuple[Path, ...] = (), measure_tokens: int = 16384,
                          no_cache: bool = False, trust_remote_code: bool = False):
    """The ``EvalSettings`` the ``eval`` options describe (``--tp`` / ``--ep`` become vllm arguments)."""
    from k2quant.eval.harness import EvalSettings

    extra = _pairs(model_args) + ((("tensor_parallel_size", str(tp)),) if tp else ()) + \
        ((("enable_expert_parallel", str(ep)),) if ep is not None else ())
    return EvalSettings(tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()), backend=backend,
                        limit=_limit(limit), batch_size=batch_size, max_length=max_length, num_fewshot=num_fewshot,
                        dtype=dtype, seed=seed, text_files=tuple(str(p) for p in text_files), backend_args=extra,
                        base_urls=tuple(base_urls), measure_tokens=measure_tokens, use_cache=not no_cache,
                        trust_remote_code=trust_remote_code)


@click.command("eval")
@click.argument("baseline", type=click.Path(path_type=Path))
@click.argument("candidates", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--tasks", default="k2quant_ppl,k2quant_mc", show_default=True,
              help="comma-separated lm-eval tasks: k2quant_ppl, k2quant_mc, k2quant_piqa, k2quant_openbookqa, "
                   "or any built-in task whose data is reachable")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=None,
              help="write results.json, raw lm-eval outputs and request caches here")
@click.option("--backend", type=click.Choice(["hf", "vllm", "api"]), default="hf", show_default=True)
@click.option("--tp", type=int, default=None, help="vllm: tensor_parallel_size")
@click.option("--ep/--no-ep", default=None, help="vllm: enable_expert_parallel")
@click.option("--model-arg", "model_args", multiple=True, help="KEY=VALUE passed to the vllm/api backend")
@click.option("--base-url", "base_urls", multiple=True,
              help="api: one completions URL per checkpoint, in argument order")
@click.option("--limit", default=None, help="first N documents per task (or a fraction); smoke tests only")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-length", type=int, default=512, show_default=True, help="context window (tokens)")
@click.option("--num-fewshot", type=int, default=None)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="hf: compute dtype (weights are the checkpoint's values either way)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--text", "text_files", multiple=True, type=click.Path(path_type=Path),
              help="UTF-8 text file(s) for k2quant_ppl and the direct measures, documents separated by two "
                   "blank lines (default: held-out Shakespeare scenes)")
@click.option("--measure-tokens", type=int, default=16384, show_default=True,
              help="positions scored for KL / top-1 / PPL ratio (baseline log-probs kept: tokens x vocab x 4 B)")
@click.option("--no-cache", is_flag=True, help="do not use lm-eval request caches under --report")
@click.option("--fail-under", type=float, default=None, metavar="RECOVERY",
              help="exit 1 when any task metric's recovery % is below this")
@click.option("--trust-remote-code", is_flag=True,
              help="vllm: run Python code shipped inside the checkpoints (off by default: only for checkpoints "
                   "you trust)")
def eval_cmd(baseline: Path, candidates: tuple[Path, ...], tasks: str, report_dir: Path | None, backend: str,
             tp: int | None, ep: bool | None, model_args: tuple[str, ...], base_urls: tuple[str, ...],
             limit: str | None, batch_size: int, max_length: int, num_fewshot: int | None, dtype: str, seed: int,
             text_files: tuple[Path, ...], measure_tokens: int, no_cache: bool, fail_under: float | None,
             trust_remote_code: bool) -> None:
    """Degradation of CANDIDATE checkpoints against BASELINE: the same lm-eval tasks on each, plus KL."""
    from k2quant.eval import compare

    settings = settings_from_options(tasks=tasks, backend=backend, tp=tp, ep=ep, model_args=model_args,
                                     base_urls=base_urls, limit=limit, batch_size=batch_size,
                                     max_length=max_length, num_fewshot=num_fewshot, dtype=dtype, seed=seed,
                                     text_files=text_files, measure_tokens=measure_tokens, no_cache=no_cache,
                                     trust_remote_code=trust_remote_code)
    err = Console(stderr=True)
    t0 = time.perf_counter()
    with err.status("evaluating") as status:
        rep = compare.evaluate(baseline, list(candidates), settings, report_dir, progress=status.update)
    out = Console()
    for table in (metrics_table(rep), flips_table(rep), direct_table(rep)):
        if table is not None:
            out.print(table)
    if rep.direct_note:
        out.print(f"[dim]{rep.direct_note}[/dim]")
    where = f"; wrote {report_dir / 'results.json'}" if report_dir else ""
    out.print(f"{len(candidates) + 1} checkpoints in {time.perf_counter() - t0:.1f} s{where}")
    worst = rep.min_recovery()
    if fail_under is not None and (worst is None or worst < fail_under):
        out.print(f"[bold red]FAIL[/bold red]: lowest recovery {_fmt(worst, 2)}% is under --fail-under {fail_under}%")
        raise SystemExit(1)


# -- diff ----------------------------------------------------------------------------------------
def class_table(rep) -> Table:
    t = Table(title=f"k2quant diff: {rep.b} vs {rep.a} (reference)", title_justify="left")
    for col in ("tensor class", "elements", "rel. error", "SQNR dB", "max |Δ|"):
        t.add_column(col, justify="left" if col == "tensor class" else "right")
    for cls, s in list(rep.by_class().items()) + [("all", rep.total())]:
        t.add_row(cls, f"{s.numel:,}", _fmt(s.rel_error, 5), _fmt(s.sqnr_db, 2), _fmt(s.max_abs, 5))
    return t


#: short column headers for the per-layer table
SHORT = {"attention": "attn", "dense_mlp": "dense", "embedding": "embed", "lm_head": "head",
         "routed_expert": "routed", "router_bias": "r.bias", "shared_expert": "shared"}


def layer_table(rep) -> Table:
    """Rows: layers (``-`` = embeddings, final norm, lm_head); columns: classes; cells: SQNR in dB."""
    groups = rep.groups()
    classes = sorted({cls for _, cls in groups})
    layers = sorted({layer for layer, _ in groups}, key=lambda x: -1 if x is None else x)
    t = Table(title="SQNR (dB) per layer and tensor class; ∞ = identical", title_justify="left")
    t.add_column("layer")
    for cls in classes:
        t.add_column(SHORT.get(cls, cls), justify="right")
    for layer in layers:
        t.add_row("-" if layer is None else str(layer),
                  *(_fmt(groups[(layer, c)].sqnr_db, 2) if (layer, c) in groups else "" for c in classes))
    return t


@click.command("diff")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@json_option("error of every tensor and group")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="write a PNG of SQNR / relative error per layer and tensor class")
def diff_cmd(a: Path, b: Path, as_json: str | None, plot_path: Path | None) -> None:
    """Per-tensor error of checkpoint B against A (any formats), streaming: no model, any size."""
    from k2quant.eval import diff

    if plot_path is not None and plot_path.is_dir():  # before the diff runs, not after
        raise K2QuantError(f"--plot {plot_path}: is a directory; give a file path, e.g. {plot_path / 'diff.png'}")
    t0 = time.perf_counter()
    with Console(stderr=True).status("diff") as status:
        rep = diff.diff(a, b, progress=lambda i, n: status.update(f"diff: {i}/{n} tensors"))
    if plot_path:
        from k2quant.eval import plot

        plot.plot_layers(rep, plot_path)
        click.echo(f"wrote {plot_path}", err=True)
    if emit_json(as_json, rep.to_json(), indent=1):
        return
    out = Console()
    out.print(class_table(rep))
    out.print(layer_table(rep))
    out.print(f"{len(rep.tensors)} tensors in {time.perf_counter() - t0:.1f} s")
