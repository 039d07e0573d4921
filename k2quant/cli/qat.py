"""``k2quant qat SRC --data ... --out ...`` and ``k2quant qat export STATE OUT`` (click + rich)."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from k2quant.cli.options import name_list
from k2quant.errors import K2QuantError
from k2quant.qat.config import LOSSES, TRAIN, QatConfig, QatReport
from k2quant.quant.names import INT4_GROUP_SIZE, INT4_RULES, QAT_INT4_RULE, RECIPES


class _TrainByDefault(click.Group):
    """``qat SRC ...`` runs ``qat train SRC ...``; ``qat export ...`` the export."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


@click.group("qat", cls=_TrainByDefault)
def qat() -> None:
    """Quantization-aware training of the routed experts, exported to INT4 (`qat SRC ...` trains)."""


@qat.command("train")
@click.argument("src", required=False, type=click.Path(file_okay=False))
@click.option("--data", "data", multiple=True, help="Text (.txt/.md) or jsonl files/dirs; repeatable.")
@click.option("--eval-data", multiple=True, help="Held-out data (default: the last --eval-fraction of --data).")
@click.option("--out", type=click.Path(file_okay=False), help="Output dir: INT4 export, plus state/.")
@click.option("--steps", type=int, default=2000, show_default=True)
@click.option("--lr", type=float, default=QatConfig.lr, show_default=True,
              help="Peak AdamW learning rate (linear warmup, cosine to 0).")
@click.option("--seq-len", type=int, default=4096, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--loss", type=click.Choice(LOSSES), default="kl", show_default=True)
@click.option("--scale-rule", type=click.Choice(INT4_RULES), default=QAT_INT4_RULE, show_default=True)
@click.option("--group-size", type=int, default=INT4_GROUP_SIZE, show_default=True)
@click.option("--targets", multiple=True, help="Modules to fake-quantize (name or re:regex, re.match); repeatable. "
              "Default: the routed experts, as convert.")
@click.option("--ignore", multiple=True, help="Modules to leave unquantized; repeatable. Default: Kimi's list.")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=None,
              help="Selection by name, read from the model (as convert): experts = routed experts only (K2-Thinking); "
              "linear = every Linear but lm_head; mlp = MLPs and experts only.")
@click.option("--teacher", type=click.Path(file_okay=False), default=None,
              help="Checkpoint to distill from (default SRC), e.g. the BF16 model when SRC is a GPTQ INT4 start; "
                   "then the latent weights start at the teacher's values inside SRC's code bins (step 0 = SRC).")
@click.option("--teacher-topk", type=int, default=QatConfig.teacher_topk, show_default=True,
              help="KL to the teacher's top-k log-probs (the rest of the vocabulary as one bucket), computed before "
                   "training so the teacher model is freed (0: the whole teacher runs in each step, full KL).")
@click.option("--train", "train_", type=click.Choice(TRAIN), default=QatConfig.train, show_default=True,
              help="What the optimizer updates: all parameters, or only the fake-quantized targets "
                   "(experts: the old name of targets).")
@click.option("--warmup", type=float, default=0.1, show_default=True, help="Share of steps.")
@click.option("--clip", type=float, default=1.0, show_default=True, help="Gradient-norm clip (0: off).")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=False, show_default=True)
@click.option("--save-every", type=int, default=0, show_default=True, help="Save state every N steps (0: at end).")
@click.option("--eval-every", type=int, default=0, show_default=True)
@click.option("--eval-fraction", type=float, default=0.05, show_default=True)
@click.option("--log-every", type=int, default=1, show_default=True, help="Code-flip rate every N steps.")
@click.option("--log-jsonl", "json_log", type=click.Path(dir_okay=False), help="Write one JSON line per step here.")
@click.option("--json", "old_json", hidden=True, help="Renamed --log-jsonl.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tokenizer", type=click.Path(file_okay=False), help="Tokenizer dir (default: SRC).")
@click.option("--requantize", is_flag=True, help="Start from an INT4 source the scale rule does not reproduce.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out (from OUT/state).")
def train(src, data, eval_data, out, train_, targets, ignore, recipe, resume, old_json, **opts) -> None:
    """Train SRC (bf16, fp8 or int4) with fake-quant experts and export INT4 to OUT."""
    from k2quant.qat import state, train as qat_train

    if old_json is not None:  # the old spelling still works, with a warning
        click.echo(f"warning: qat --json {old_json}: renamed --log-jsonl {old_json} (in the other commands --json "
                   f"prints the machine-readable report)", err=True)
        opts["json_log"] = opts["json_log"] or old_json
    state_dir = None
    if resume:
        if src and (Path(src) / state.RUN_FILE).is_file() and not out:  # the old spelling: --resume STATE
            click.echo(f"warning: qat --resume {src}: --resume is now a flag; continuing the run in "
                       f"{Path(src).parent} (write --resume --out {Path(src).parent})", err=True)
            state_dir, src = Path(src), None
        elif not out:
            raise K2QuantError("qat --resume: give the run's output directory, --out OUT (its state is OUT/state)")
        else:
            state_dir = Path(out) / state.STATE
        saved, _ = state.read_run(state_dir)
        src, data, out = src or saved.src, data or saved.data, out or saved.out
        eval_data = eval_data or saved.eval_data
    missing = [f"--{n}" for n, v in (("data", data), ("out", out)) if not v] + ([] if src else ["SRC"])
    if missing:
        raise K2QuantError(f"qat: missing {', '.join(missing)}; usage: k2quant qat SRC --data FILE --out DIR")
    from k2quant.formats import selection

    targets, ignore = selection.with_recipe(recipe, src, name_list("--targets", targets),
                                            name_list("--ignore", ignore) if ignore else None)
    cfg = QatConfig(src=str(src), data=list(data), out=str(out), train=train_, targets=targets, ignore=ignore,
                    eval_data=list(eval_data or ()) or None, **opts)
    console = Console(stderr=True)
    main = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch / torchrun only rank 0 reports
    with Progress(TextColumn("[bold]qat"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=console, disable=not main) as bar:
        task = bar.add_task("qat", total=cfg.steps, info="loading")

        def progress(rec: dict) -> None:
            flips = f" flips {rec['flip_rate']:.2e}" if "flip_rate" in rec else ""
            bar.update(task, completed=rec["step"], info=f"loss {rec['loss']:.4f} kl {rec['kl']:.4f} "
                       f"lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s{flips}")

        report = qat_train.run(cfg, resume=state_dir, progress=progress)
    if main:
        _render(Console(), report)


def _render(console: Console, report: QatReport) -> None:
    t = Table(title=f"qat -> {report.out}", show_header=False)
    for k, v in dataclasses.asdict(report).items():
        t.add_row(k, json.dumps(v) if isinstance(v, dict) else str(v))
    console.print(t)


@qat.command("export")
@click.argument("state", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
def export(state: str, out: str) -> None:
    """Write the INT4 checkpoint of a qat STATE directory into OUT (through the convert writer)."""
    from k2quant.qat import export as qat_export

    report = qat_export.export(state, out)
    Console().print(f"exported {report.tensors_out} tensors, {report.bytes_out / 1e6:.1f} MB -> {report.dst}")
