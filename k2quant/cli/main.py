"""``k2quant``: the command group. Every command is registered here, by name."""
from __future__ import annotations

import atexit
import gc
import os
import sys

import click

from k2quant.cli import checkpoint, eval, plan, qat
from k2quant.cli.common import console
from k2quant.errors import K2QuantError


#: commands that close, fsync and unlock everything they write before they return (or raise): the console
#: entry point ends their process without the interpreter's teardown (``run``)
QUICK_EXIT = {"convert", "inspect", "verify", "plan", "make-tiny"}
_quick = [False]


class Group(click.Group):
    """A ``K2QuantError`` from any command becomes one line on stderr and exit 2."""

    def invoke(self, ctx: click.Context):
        # the process ends after the command: spare the interpreter's final garbage collection over torch's
        # objects (0.3-0.6 s of every run on 2 cores, measured); refcounting still frees everything
        atexit.register(gc.freeze)
        _quick[0] = ctx.invoked_subcommand in QUICK_EXIT
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

def run() -> None:
    """The console entry point (``k2quant``, ``python -m k2quant``): ``main``, then, for ``QUICK_EXIT`` commands,
    the process ends as soon as its output is flushed. The interpreter's teardown (torch, numba and their
    threads) took 0.8-0.9 s after a conversion had finished, measured on 2 cores; the command's files are
    already complete by then."""
    try:
        main()
    except SystemExit as exc:
        if not _quick[0]:
            raise
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said
                pass
        os._exit(code)


if __name__ == "__main__":
    run()
