"""The output directory of a conversion: safety checks, resume state, ranks, and the final files.

Each finished shard leaves a record (its inputs, sha256, size) under ``.k2q-state/``; a resumed run keeps
shards whose record and hash match. Rank 0 writes the manifest, carried files, config and, last, the index.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from k2quant.errors import OutputError, collect
from k2quant.formats import shards
from k2quant.formats.checkpoint import CONFIG, INDEX, Checkpoint
from k2quant.formats.plan import Plan

STATE_DIR = ".k2q-state"
MANIFEST = "k2quant_manifest.json"


def _fingerprint(ckpt: Checkpoint) -> dict:
    return {"files": {f.name: f.stat().st_size for f in ckpt.files}, "tensors": len(ckpt.tensors)}


def run_settings(plan: Plan, ckpt: Checkpoint) -> dict:
    """What must be equal for a resumed run to continue an interrupted one."""
    return plan.settings() | {"source": str(ckpt.path.resolve()), "source_files": _fingerprint(ckpt)}


def prepare_output(src: Path, dst: Path, need_bytes: int, force: bool, resume: bool = False) -> None:
    """Refuse unsafe outputs before anything is written; with ``force`` clear old k2quant outputs."""
    s, d = src.resolve(), dst.resolve()
    if d == s or d.is_relative_to(s):
        raise OutputError(f"{dst}: the output directory is the source directory or inside it; the source must "
                          f"never be modified: choose a directory outside {src}")
    if d.exists() and not d.is_dir():
        raise OutputError(f"{dst}: exists and is not a directory; choose a directory path")
    if d.exists() and any(d.iterdir()) and not resume:
        if not force:
            n = sum(1 for _ in d.iterdir())
            hint = " (it holds an interrupted k2quant run: pass --resume to continue it)" \
                if (d / STATE_DIR).exists() else ""
            raise OutputError(f"{dst}: output directory is not empty ({n} entries){hint}; choose an empty directory "
                              f"or pass --force to replace k2quant outputs in it")
        for p in list(d.glob("*.safetensors")) + list(d.glob("*" + shards.TMP_SUFFIX)) + [d / INDEX, d / MANIFEST]:
            p.unlink(missing_ok=True)
        shutil.rmtree(d / STATE_DIR, ignore_errors=True)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / (".k2q-probe" + shards.TMP_SUFFIX)
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o644))
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{dst}: cannot write to the output directory ({exc.strerror}); choose a writable "
                          f"directory") from None
    free = shutil.disk_usage(d).free
    if free < need_bytes:
        raise OutputError(f"{dst}: not enough free disk: the output needs {need_bytes / 1e9:.2f} GB but "
                          f"{free / 1e9:.2f} GB are free; free space or choose another disk")


def shard_records(state: Path) -> dict[str, dict]:
    """The completion records finished shards left in the state directory, by shard name."""
    records = {}
    for f in state.glob("*.json"):
        if f.name != "settings.json":
            rec = json.loads(f.read_text())
            records[rec["shard"]] = rec
    return records


def resume_state(dst: Path, settings: dict, plan: Plan) -> dict[str, dict]:
    """Records of shards an interrupted run finished and that are intact; refuse changed settings."""
    state = dst / STATE_DIR
    manifest = dst / MANIFEST
    saved = None
    if (state / "settings.json").exists():
        saved = json.loads((state / "settings.json").read_text())
    elif manifest.exists():
        saved = json.loads(manifest.read_text())["settings"]
    if saved is None:
        if any(dst.glob("*.safetensors")):
            raise OutputError(f"{dst}: --resume found shards but no k2quant run state ({STATE_DIR}/ or {MANIFEST}); "
                              f"pass --force to start over")
        return {}
    diff = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
    if diff:
        details = "; ".join(f"{k}: was {saved.get(k)!r}, now {settings.get(k)!r}" for k in diff)
        raise OutputError(f"{dst}: --resume with settings that differ from the interrupted run's ({details}); "
                          f"rerun with the same settings, or pass --force instead of --resume to start over")
    records = json.loads(manifest.read_text())["shards"] if manifest.exists() else {}
    records |= shard_records(state)
    kept = {}
    for name in plan.shard_names:
        rec, path = records.get(name), dst / name
        if rec and path.exists() and path.stat().st_size == rec["bytes"] and shards.sha256_file(path) == rec["sha256"]:
            kept[name] = rec
    return kept


def clean_partial(dst: Path, kept: dict[str, dict], plan: Plan, rank: int, world: int) -> None:
    """Remove what a crash left of this rank's shards (temp files, unrecorded shards); rank 0 the rest."""
    for j, name in enumerate(plan.shard_names):
        if j % world == rank:
            (dst / (name + shards.TMP_SUFFIX)).unlink(missing_ok=True)
            if name not in kept:
                (dst / name).unlink(missing_ok=True)
    if rank == 0:
        own = {n + shards.TMP_SUFFIX for n in plan.shard_names}
        for p in dst.glob("*" + shards.TMP_SUFFIX):
            if p.name not in own:  # index, config, manifest or carried files cut short
                p.unlink(missing_ok=True)
        (dst / INDEX).unlink(missing_ok=True)  # rewritten last


def verify_headers(plan: Plan, dst: Path, names: list[str]) -> None:
    """Read written headers back and compare them with the plan (names, dtypes, shapes)."""
    for name, idx in zip(plan.shard_names, plan.shards):
        if name not in names:
            continue
        infos, _ = shards.read_header(dst / name)
        want = [e for i in idx for e in plan.items[i].entries]
        got = [(i.name, i.dtype, i.shape) for i in sorted(infos.values(), key=lambda i: i.start)]
        if got != [(e.name, e.dtype, e.shape) for e in want]:
            raise OutputError(f"{dst / name}: written header does not match the plan; the file is corrupt "
                              f"(disk or filesystem error): run again")


def _copy_other_files(ckpt: Checkpoint, dst: Path) -> None:
    for p in ckpt.other_files():
        if p.name == MANIFEST:
            continue
        out = dst / p.relative_to(ckpt.path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + shards.TMP_SUFFIX)
        shutil.copy2(p, tmp)
        os.replace(tmp, out)


def write_index(plan: Plan, dst: Path) -> None:
    weight_map = {e.name: name for name, idx in zip(plan.shard_names, plan.shards)
                  for i in idx for e in plan.items[i].entries}
    shards.write_json(dst / INDEX, {"metadata": {"total_size": plan.dst_bytes},
                                    "weight_map": dict(sorted(weight_map.items()))})


class Group:
    """Ranks converting one checkpoint together: torch.distributed (torchrun) or shared-storage polling."""

    def __init__(self, rank: int | None, world_size: int | None, dst: Path, timeout: float):
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        self.dist = world_size is None and env_world > 1
        self.rank = int(os.environ.get("RANK", "0")) if self.dist else (rank or 0)
        self.world = env_world if self.dist else (world_size or 1)
        self.dst, self.timeout = dst, timeout
        if not 0 <= self.rank < self.world:
            raise OutputError(f"--rank {self.rank} is outside 0..{self.world - 1} (--world-size {self.world})")
        if self.dist:
            import torch.distributed as td

            if not td.is_initialized():
                td.init_process_group("gloo")

    def barrier(self, ready: Callable[[], bool]) -> None:
        """Wait for every rank (torchrun), or until ``ready()`` holds (ranks sharing only the disk)."""
        if self.dist:
            import torch.distributed as td

            td.barrier()
            return
        deadline = time.monotonic() + self.timeout
        while not ready():
            if time.monotonic() > deadline:
                raise OutputError(f"{self.dst}: rank {self.rank} waited {self.timeout:.0f} s for the other ranks; "
                                  f"start every rank (0..{self.world - 1}) with the same settings")
            time.sleep(0.5)


def finish(ckpt: Checkpoint, plan: Plan, dst: Path, settings: dict, kept: dict[str, dict]) -> None:
    """Manifest, carried files and config, then the index last: its presence marks a complete checkpoint."""
    state = dst / STATE_DIR
    records = kept | shard_records(state)
    missing = [n for n in plan.shard_names if n not in records]
    collect([f"{dst}: shard {n} has no completion record; run again with --resume" for n in missing], OutputError)
    shards.write_json(dst / MANIFEST, {"settings": settings,
                                       "shards": {n: {k: records[n][k] for k in ("inputs", "sha256", "bytes")}
                                                  for n in plan.shard_names}})
    _copy_other_files(ckpt, dst)
    shards.write_json(dst / CONFIG, plan.config)
    write_index(plan, dst)
    shutil.rmtree(state, ignore_errors=True)
