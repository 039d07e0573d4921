"""Flag parsing shared by the commands: sizes, token counts, GPU specs, repeatable lists.

Errors name the flag and give an example of what it takes.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import click

from k2quant.errors import K2QuantError
from k2quant.formats.serving import GIB, GPUS, MIB, Gpu

#: size units: decimal (KB = 10**3) and binary (KiB = 2**10); a bare number is bytes
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
         "tb": 10**12, "kib": 2**10, "mib": MIB, "gib": GIB, "tib": 2**40}
_MEM_UNITS = ("gb", "gib", "mb", "mib", "tb", "tib")
MAX_GPUS = 1 << 20  # a bound on --gpus (a 20-digit count is a typo, not a cluster)
_ALIASES = {"A10080GB": "A100", "A10040GB": "A100-40GB", "H10080GB": "H100", "H80080GB": "H800",
            "H2096GB": "H20", "H200141GB": "H200", "B200192GB": "B200", "MI300X192GB": "MI300X"}


def find_gpu(name: str) -> Gpu:
    """A known GPU by name, case- and punctuation-insensitive (``h200``, ``A100-80GB``)."""
    key = re.sub(r"[\s_-]", "", name).upper()
    key = _ALIASES.get(key, key)
    for canon, gpu in GPUS.items():
        if re.sub(r"[\s_-]", "", canon).upper() == key:
            return gpu
    raise K2QuantError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}. "
                       f"For another GPU give its memory with --gpu-mem (e.g. --gpu-mem 96GiB)")


def parse_gpu_mem(text: str) -> int:
    """``--gpu-mem``: ``"141GiB"`` -> bytes; the unit is required (GB = 10**9, GiB = 2**30)."""
    size = _size(text)
    if size is None or size[1] not in _MEM_UNITS or size[0] <= 0:
        raise K2QuantError(f"--gpu-mem {text!r}: expected a positive size with a unit, e.g. 141GiB "
                           f"(2**30 bytes) or 150GB (10**9 bytes); units: GB, GiB, MB, MiB, TB, TiB")
    return int(size[0] * UNITS[size[1]])


def parse_gpus(spec: str, gpu_mem: str | None = None) -> tuple[int, Gpu]:
    """``"8xH200"`` -> ``(8, H200)``; ``--gpu-mem`` overrides the memory (``"8"`` alone needs it)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x×*]\s*([A-Za-z0-9][\w.-]*))?\s*", spec)
    if not m or int(m.group(1)) < 1:
        raise K2QuantError(f"--gpus {spec!r}: expected COUNTxNAME, e.g. 8xH200 or 16xH100 "
                           f"(or a count with --gpu-mem, e.g. --gpus 8 --gpu-mem 96GiB)")
    count, name = int(m.group(1)), m.group(2)
    if count > MAX_GPUS:
        raise K2QuantError(f"--gpus {spec!r}: {count} GPUs is more than the {MAX_GPUS:,} k2quant plans for; "
                           f"give the GPU count of one serving instance, e.g. 8xH200")
    if gpu_mem is not None:
        mem = parse_gpu_mem(gpu_mem)
        return count, Gpu(name or "custom", mem, gpu_mem, "--gpu-mem")
    if name is None:
        raise K2QuantError(f"--gpus {spec!r} names no GPU; write COUNTxNAME (e.g. 8xH200) or add --gpu-mem")
    return count, find_gpu(name)


def parse_tokens(text: str | int) -> int:
    """``"256k"`` -> 262144 tokens (k = 1024, m = 1024**2, as model cards count context)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", str(text))
    if not m or int(m.group(1)) < 1:
        raise K2QuantError(f"--context {text!r}: expected a positive token count such as 131072, 128k or 1m "
                           f"(k = 1024 tokens)")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]


def _size(text: str) -> tuple[float, str] | None:
    """``"5 GiB"`` -> ``(5.0, "gib")``; None when it is not a number with an optional unit."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    return (float(m.group(1)), m.group(2).lower()) if m and m.group(2).lower() in UNITS else None


def parse_size(text: str) -> int:
    """``--max-shard-size``: ``"5GB"`` -> 5_000_000_000; ``"512MiB"`` -> 536870912; a bare number is bytes."""
    size = _size(text)
    if size is None:
        raise click.BadParameter(f"{text!r} is not a size; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    return int(size[0] * UNITS[size[1]])


def name_list(flag: str, values: tuple[str, ...] | list[str] | None) -> list[str] | None:
    """A repeatable name option (``--targets``, ``--ignore``). A comma-separated value (the old ``qat``
    spelling) is still split, with a warning: names never hold commas, ``re:`` patterns may."""
    out: list[str] = []
    for v in values or ():
        if "," in v and not v.startswith("re:"):
            click.echo(f"warning: {flag} {v}: comma-separated lists are deprecated; repeat the flag "
                       f"({' '.join(f'{flag} {x.strip()}' for x in v.split(',') if x.strip())})", err=True)
            out += [x.strip() for x in v.split(",") if x.strip()]
        else:
            out.append(v)
    return out or None


def human(n: float) -> str:
    """Bytes for people: ``1234567`` -> ``"1.23 MB"``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def json_option(what: str):
    """``--json [FILE]``, the same in every command: the machine-readable ``what`` on stdout (alone), or
    written into FILE (then the tables print as usual)."""
    def check(ctx, param, value: str | None) -> str | None:
        if value not in (None, "-") and os.path.isdir(value):  # before the command runs, not after
            raise click.BadParameter(f"--json {value}: is a directory; give a file path, e.g. "
                                     f"{os.path.join(value, 'report.json')}")
        return value

    return click.option("--json", "as_json", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
                        callback=check, help=f"The {what} as JSON: on stdout, or into FILE.")


def emit_json(as_json: str | None, obj: dict, indent: int | None = None) -> bool:
    """Write ``obj`` where ``--json`` says; True when it went to stdout (the command prints nothing else)."""
    if as_json is None:
        return False
    text = json.dumps(obj, indent=indent, allow_nan=False)
    if as_json == "-":
        click.echo(text)
        return True
    path = Path(as_json)
    tmp = path.with_name(path.name + ".k2q-tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise K2QuantError(f"--json {path}: cannot write ({exc.strerror}); choose a writable file path") from None
    click.echo(f"wrote {path}", err=True)
    return False
