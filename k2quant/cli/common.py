"""The two consoles every command prints to: ``out`` (results, stdout) and ``console`` (progress, errors)."""
from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)
out = Console()
