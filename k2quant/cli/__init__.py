"""The ``k2quant`` command line: flag parsing and rendering only; the work is the library's.

``main`` (in ``cli.main``) registers every command by name. Command modules import click and rich at the
top and their numeric stack (torch, transformers) inside the command, so ``k2quant --help`` and
``k2quant CMD --help`` start without it. They are the only modules that print.
"""
from k2quant.cli.main import main

__all__ = ["main"]
