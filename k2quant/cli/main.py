"""``k2quant``: the command group. Every command is registered here, by name."""
from __future__ import annotations

import atexit
import gc
import sys

import click

from k2quant.cli import checkpoint, eval, plan, qat
from k2quant.cli.common import console
from k2quant.errors import K2QuantError


class Group(click.Group):
    """A ``K2QuantError`` from any command becomes one line on stderr and exit 2."""

    def invoke(self, ctx: click.Context):
        # the process ends after the command: spare the interpreter's final garbage collection over torch's
        # objects (0.3-0.6 s of every run on 2 cores, measured); refcounting still frees everything
        atexit.register(gc.freeze)
        try:
            return super().invoke(ctx)
        except K2QuantError as exc:
            console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            sys.exit(2)


@click.group(cls=Group)
@click.version_option(package_name="k2quant")
def main() -> None:
    """Streaming, format-exact BF16 / block-FP8 / INT4 tools for Kimi-K2-class checkpoints."""


for command in (checkpoint.convert, checkpoint.inspect, checkpoint.verify, checkpoint.make_tiny, plan.plan,
                eval.eval_cmd, eval.diff_cmd, qat.qat):
    main.add_command(command)

if __name__ == "__main__":
    main()
