"""The output directory of a conversion: safety checks, resume state, ranks, and the final files.

Each finished shard leaves a record (its inputs, digest, size) under ``.k2q-state/``; a resumed run keeps
shards whose record and digest match. Rank 0 writes the manifest, carried files, config and, last, the index.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import shutil
import time
from pathlib import Path
from typing import Callable

from k2quant.errors import FormatError, OutputError, collect
from k2quant.formats import shards
from k2quant.formats.checkpoint import CONFIG, INDEX, MANIFEST, Checkpoint, source_file
from k2quant.formats.plan import Plan

STATE_DIR = ".k2q-state"


SAMPLES, SAMPLE_BYTES = 16, 1 << 16


def _fingerprint(ckpt: Checkpoint) -> dict:
    """What identifies the source's content, cheaply at 1 TB: per shard its size, mtime and the sha256 of its
    header plus ``SAMPLES`` chunks of ``SAMPLE_BYTES`` spread evenly over its data (~1 MB read per shard);
    config.json and the index hashed whole. Rewritten weights change the mtime, and the samples catch a
    rewrite that kept it (cp -p, rsync -t) wherever they land."""
    files = {}
    for f in ckpt.files:
        st = f.stat()
        files[f.name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sampled_sha256": _sampled_sha(f, st.st_size)}
    small = {n: shards.sha256_file(ckpt.path / n) for n in (CONFIG, INDEX) if (ckpt.path / n).is_file()}
    return {"files": files, "tensors": len(ckpt.tensors), "sha256": small}


def _sampled_sha(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        (hlen,) = struct.unpack("<Q", fh.read(8))
        h.update(fh.read(min(hlen, size)))
        base = 8 + hlen
        span = max(0, size - base - SAMPLE_BYTES)
        for i in range(SAMPLES):
            fh.seek(base + span * i // max(1, SAMPLES - 1))
            h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()


def run_settings(plan: Plan, ckpt: Checkpoint) -> dict:
    """What must be equal for a resumed run to continue an interrupted one."""
    return plan.settings() | {"source": str(ckpt.path.resolve()), "source_files": _fingerprint(ckpt)}


LOCK = ".k2q-lock"


def prepare_output(src: Path, dst: Path, need_bytes: int, force: bool, resume: bool = False,
                   writes: tuple[str, ...] = ()) -> None:
    """Refuse unsafe outputs before anything is written; with ``force`` remove what k2quant's manifest says it
    wrote there, and nothing else.

    ``writes`` are the paths (relative to ``dst``) this run will write: a file of that name that k2quant did
    not write (a user's config.json, another model's shard) is refused, with or without ``force``/``resume``.
    """
    s, d = src.resolve(), dst.resolve()
    if d == s or d.is_relative_to(s):
        raise OutputError(f"{dst}: the output directory is the source directory or inside it; the source must "
                          f"never be modified: choose a directory outside {src}")
    if d.exists() and not d.is_dir():
        raise OutputError(f"{dst}: exists and is not a directory; choose a directory path")
    entries = sorted(p.name for p in d.iterdir() if not p.name.startswith(LOCK)) if d.exists() else []
    ours = (d / STATE_DIR).is_dir() or (d / MANIFEST).is_file()
    if entries and not force and not (resume and ours):
        hint = " (it holds an interrupted k2quant run: pass --resume to continue it)" if ours else ""
        if resume:
            raise OutputError(f"{dst}: --resume found no k2quant run state ({STATE_DIR}/ or {MANIFEST}) in a "
                              f"non-empty directory ({', '.join(entries[:5])}); k2quant did not write it: choose "
                              f"an empty directory")
        raise OutputError(f"{dst}: output directory is not empty ({len(entries)} entries){hint}; choose an empty "
                          f"directory or pass --force to replace k2quant outputs in it")
    through_links = [w for w in writes if not _inside(d, w)]
    if through_links:
        raise OutputError(f"{dst}: writing {', '.join(through_links[:3])} would go through a link inside the output "
                          f"directory, i.e. outside it; k2quant writes only inside {dst}: remove the link")
    owned = owned_files(d) if entries else set()
    foreign = sorted(w for w in writes if w not in owned and ((d / w).exists() or (d / w).is_symlink()))
    if foreign:
        raise OutputError(f"{dst}: holds {', '.join(foreign[:5])}, which this run would overwrite but k2quant did "
                          f"not write (not in its {MANIFEST}); move them away or choose another directory")
    if force and entries:
        _remove_owned(d, owned)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / (".k2q-probe" + shards.TMP_SUFFIX)
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_EXCL | os.O_NOFOLLOW, 0o644))
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{dst}: cannot write to the output directory ({exc.strerror}); choose a writable "
                          f"directory") from None
    free = shutil.disk_usage(d).free
    if free < need_bytes:
        raise OutputError(f"{dst}: not enough free disk: the output needs {need_bytes / 1e9:.2f} GB but "
                          f"{free / 1e9:.2f} GB are free; free space or choose another disk")


def owned_files(d: Path) -> set[str]:
    """Paths (relative to ``d``) that k2quant's manifest, or an interrupted run's state, says it wrote."""
    fix = f"delete {d / MANIFEST} and {d / STATE_DIR} only if k2quant wrote this directory, or choose another"
    own: set[str] = set()
    if (d / MANIFEST).is_file() or (d / MANIFEST).is_symlink():
        man = shards.read_json(d / MANIFEST, "k2quant manifest", fix)
        recs, files = man.get("shards", {}), man.get("files", [CONFIG, INDEX])  # older manifests: no "files"
        if not isinstance(recs, dict) or not _strings(files):
            raise FormatError(f"{d / MANIFEST}: 'shards' must be an object and 'files' a list of paths; {fix}")
        own |= {MANIFEST, *recs, *files}
    settings = d / STATE_DIR / "settings.json"
    if settings.is_file():
        names = shards.read_json(settings, "k2quant run state", fix).get("shards", [])
        if not _strings(names):
            raise FormatError(f"{settings}: 'shards' must be a list of file names; {fix}")
        own |= set(names)
    bad = [n for n in own if not _inside(d, n)]
    if bad:
        raise FormatError(f"{d / MANIFEST}: names {bad[:3]}, not a plain path inside {d}; k2quant never wrote "
                          f"that: {fix}")
    return own


def _strings(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _inside(d: Path, rel: object) -> bool:
    """A relative path with no '..', no absolute part and no link on the way (so it names a file in ``d``)."""
    if not isinstance(rel, str) or not rel or "\0" in rel or rel.startswith("/") or ".." in rel.split("/"):
        return False
    parent = d
    for part in Path(rel).parts[:-1]:
        parent = parent / part
        if parent.is_symlink():
            return False
    return True


def _remove_owned(d: Path, owned: set[str]) -> None:
    for rel in sorted(owned):
        p = d / rel
        if p.is_dir() and not p.is_symlink():
            raise OutputError(f"{p}: is a directory, but k2quant wrote a file of that name; move it away")
        p.unlink(missing_ok=True)
    for p in d.glob("*" + shards.TMP_SUFFIX):
        if p.is_file() or p.is_symlink():
            p.unlink()
    shutil.rmtree(d / STATE_DIR, ignore_errors=True)


class Lock:
    """One run per output directory (per rank): ``DST/.k2q-lock[.rankR]`` holds the owner's pid and host.

    A lock left by a process that died on this host is taken over; any other is refused, naming its owner.
    """

    def __init__(self, dst: Path, rank: int = 0):
        self.path = Path(dst) / (LOCK if rank == 0 else f"{LOCK}.rank{rank}")
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self.held = False

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                if not self._stale():
                    return self._refuse()
                self.path.unlink(missing_ok=True)
                continue
            except OSError as exc:
                raise OutputError(f"{self.path.parent}: cannot write to the output directory ({exc.strerror}); "
                                  f"choose a writable directory") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(self.me, fh)
            self.held = True
            return None
        self._refuse()

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError, RecursionError):
            return {}

    def _stale(self) -> bool:
        owner = self._owner()
        if owner.get("host") != self.me["host"] or type(owner.get("pid")) is not int:
            return False
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    def _refuse(self) -> None:
        o = self._owner()
        raise OutputError(f"{self.path.parent}: another k2quant run (pid {o.get('pid', '?')} on host "
                          f"{o.get('host', '?')}) is writing this directory; one directory, one run: wait for it "
                          f"to finish or choose another directory (if that run is gone, delete {self.path})")

    def release(self) -> None:
        if self.held and self._owner().get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)
        self.held = False


RESUME_FIX = "pass --force instead of --resume to start over"


def _record(rec: object, where: Path) -> dict:
    """A shard's completion record, checked field by field (it is read back from a shared directory)."""
    ok = isinstance(rec, dict) and isinstance(rec.get("shard"), str) and shards.record_digest(rec) is not None \
        and type(rec.get("bytes")) is int and isinstance(rec.get("inputs"), list)
    if not ok:
        raise FormatError(f"{where}: corrupt shard record {rec!r:.120} (expected shard, {shards.DIGEST_KEY}, bytes, "
                          f"inputs); {RESUME_FIX}")
    return rec


def shard_records(state: Path) -> dict[str, dict]:
    """The completion records finished shards left in the state directory, by shard name."""
    records = {}
    for f in state.glob("*.json"):
        if f.name not in ("settings.json", "run.json"):
            rec = _record(shards.read_json(f, "shard record", RESUME_FIX), f)
            records[rec["shard"]] = rec
    return records


def resume_state(dst: Path, settings: dict, plan: Plan) -> dict[str, dict]:
    """Records of shards an interrupted run finished and that are intact; refuse changed settings."""
    state = dst / STATE_DIR
    manifest = dst / MANIFEST
    saved, saved_from = None, state / "settings.json"
    if (state / "settings.json").exists():
        saved = shards.read_json(state / "settings.json", "k2quant run state", RESUME_FIX)
    elif manifest.exists():
        saved_from = manifest
        saved = shards.read_json(manifest, "k2quant manifest", RESUME_FIX).get("settings")
        if not isinstance(saved, dict):
            raise FormatError(f"{manifest}: has no 'settings' object; {RESUME_FIX}")
    if saved is None:
        if any(dst.glob("*.safetensors")):
            raise OutputError(f"{dst}: --resume found shards but no k2quant run state ({STATE_DIR}/ or {MANIFEST}); "
                              f"pass --force to start over")
        return {}
    diff = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
    if diff:
        details = "; ".join(_describe(k, saved.get(k), settings.get(k)) for k in diff)
        raise OutputError(f"{dst}: --resume with settings that differ from the interrupted run's ({details}); "
                          f"rerun with the same settings, or pass --force instead of --resume to start over "
                          f"(the interrupted run's settings are in {saved_from})")
    records = {}
    if manifest.exists():
        recs = shards.read_json(manifest, "k2quant manifest", RESUME_FIX).get("shards", {})
        if not isinstance(recs, dict):
            raise FormatError(f"{manifest}: 'shards' must be an object; {RESUME_FIX}")
        records = {n: _record(r | {"shard": n} if isinstance(r, dict) else r, manifest) for n, r in recs.items()}
    records |= shard_records(state)
    kept = {}
    for name in plan.shard_names:
        rec, path = records.get(name), dst / name
        if rec and path.is_file() and not path.is_symlink() and path.stat().st_size == rec["bytes"] \
                and shards.file_matches(path, rec):
            kept[name] = rec
    return kept


def _describe(key: str, was: object, now: object) -> str:
    if key == "source_files" and isinstance(was, dict) and isinstance(now, dict):
        wf, nf = was.get("files"), now.get("files") or {}
        wf = wf if isinstance(wf, dict) else {}
        changed = sorted(n for n in set(wf) | set(nf) if wf.get(n) != nf.get(n))
        if changed or was.get("sha256") != now.get("sha256"):
            what = ", ".join(changed[:5]) or "config.json / index"
            return f"source_files: the source content changed since the interrupted run ({what})"
    return f"{key}: was {was!r:.300}, now {now!r:.300}"


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


def _copy_other_files(ckpt: Checkpoint, dst: Path, carried: list[Path]) -> None:
    for p in carried:
        rel = p.relative_to(ckpt.path)
        copy_into(source_file(p, ckpt.path, "file to carry over"), dst, rel)


def copy_into(src_file: Path, dst: Path, rel: Path) -> None:
    """Copy a regular file to ``dst/rel`` without ever writing outside ``dst``: no directory on the way may be
    a link, the temp file is created fresh (never through a link), and the rename replaces a link, not its
    target."""
    parent = dst
    for part in rel.parts[:-1]:
        parent = parent / part
        if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
            raise OutputError(f"{parent}: is a link or not a directory; k2quant writes only inside {dst}: remove it "
                              f"or choose another output directory")
        parent.mkdir(exist_ok=True)
    out = dst / rel
    if out.is_dir() and not out.is_symlink():
        raise OutputError(f"{out}: is a directory, but the checkpoint carries a file of that name; move it away")
    tmp = out.with_name(out.name + shards.TMP_SUFFIX)
    tmp.unlink(missing_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as fo, open(src_file, "rb") as fi:
            shutil.copyfileobj(fi, fo, 1 << 20)
        shutil.copymode(src_file, tmp)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{out}: cannot write ({exc.strerror})") from None


def written_files(plan: Plan, ckpt: Checkpoint, carried: list[Path]) -> tuple[str, ...]:
    """Every path a run writes in DST, relative to it: shards, manifest, carried files, config, index."""
    return (*plan.shard_names, MANIFEST, *(p.relative_to(ckpt.path).as_posix() for p in carried), CONFIG, INDEX)


def write_index(plan: Plan, dst: Path) -> None:
    weight_map = {e.name: name for name, idx in zip(plan.shard_names, plan.shards)
                  for i in idx for e in plan.items[i].entries}
    shards.write_json(dst / INDEX, {"metadata": {"total_size": plan.dst_bytes},
                                    "weight_map": dict(sorted(weight_map.items()))})


#: how long a rank other than 0 waits for rank 0 to start the run (the final wait uses the full timeout)
START_WAIT = 600.0


class Group:
    """Ranks converting one checkpoint together: torch.distributed (torchrun) or shared-storage polling."""

    def __init__(self, rank: int | None, world_size: int | None, dst: Path, timeout: float,
                 on_wait: Callable[[str], None] | None = None):
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        self.dist = world_size is None and env_world > 1
        self.rank = int(os.environ.get("RANK", "0")) if self.dist else (rank or 0)
        self.world = env_world if self.dist else (world_size or 1)
        self.dst, self.timeout, self.on_wait = dst, timeout, on_wait
        if not 0 <= self.rank < self.world:
            raise OutputError(f"--rank {self.rank} is outside 0..{self.world - 1} (--world-size {self.world})")
        if self.dist:
            import torch.distributed as td

            if not td.is_initialized():
                td.init_process_group("gloo")

    def barrier(self, ready: Callable[[], bool], what: str = "the other ranks", first: bool = False) -> None:
        """Wait for every rank (torchrun), or until ``ready()`` holds (ranks sharing only the disk).

        After a few seconds it says what it waits for (``on_wait``); it gives up after the timeout
        (``START_WAIT`` at most for the first wait, for rank 0 to start) with a message naming it."""
        if self.dist:
            import torch.distributed as td

            td.barrier()
            return
        timeout = min(self.timeout, START_WAIT) if first else self.timeout
        start = time.monotonic()
        told = False
        while not ready():
            waited = time.monotonic() - start
            if waited > timeout:
                raise OutputError(f"{self.dst}: rank {self.rank} of {self.world} waited {timeout:.0f} s for {what}; "
                                  f"start every rank (0..{self.world - 1}) with the same settings and the same DST"
                                  + (", rank 0 first" if first else ""))
            if not told and waited > 2 and self.on_wait:
                self.on_wait(f"rank {self.rank} of {self.world}: waiting for {what} (gives up after {timeout:.0f} s)")
                told = True
            time.sleep(0.2 if waited < 5 else 0.5)


def all_recorded(dst: Path, plan: Plan, kept: dict[str, dict], rank: int) -> bool:
    """Whether every shard of the run has its record (or was kept), so rank 0 may finish the output.

    A rank other than 0 is also done once rank 0 has finished: the index is written, and rank 0 then removes
    the records. Without that, a rank that looked just before rank 0 saw the last record, and again after it
    removed them all, waited out its whole --wait-timeout (seen: a rank hung in the test suite)."""
    state = dst / STATE_DIR
    if all((state / f"{n}.json").exists() or n in kept for n in plan.shard_names):
        return True
    return rank != 0 and (dst / INDEX).is_file() and not state.exists()


def check_joined_run(dst: Path, run: dict) -> None:
    """A rank joining rank 0's run must have the same settings and world size, or shards would mix schemes."""
    where = dst / STATE_DIR / "run.json"
    saved = shards.read_json(where, "k2quant run state", "start every rank with the same settings")
    diff = [k for k in ("settings", "world_size") if saved.get(k) != run.get(k)]
    if "settings" in diff:
        s, r = saved.get("settings") or {}, run["settings"]
        keys = sorted(k for k in set(s) | set(r) if s.get(k) != r.get(k))
        details = "; ".join(_describe(k, s.get(k), r.get(k)) for k in keys)
    else:
        details = ""
    if "world_size" in diff:
        details += f"{'; ' if details else ''}world size: rank 0 has {saved.get('world_size')!r}, this rank {run['world_size']}"
    if diff:
        raise OutputError(f"{dst}: this rank's settings differ from the run rank 0 started there ({details}); "
                          f"every rank of one run needs the same SRC, options and --world-size: restart this rank "
                          f"with rank 0's settings")


def finish(ckpt: Checkpoint, plan: Plan, dst: Path, settings: dict, kept: dict[str, dict],
           carried: list[Path]) -> None:
    """Manifest, carried files and config, then the index last: its presence marks a complete checkpoint.

    The manifest comes first and lists every file the run writes, so ``--force`` and ``--resume`` later
    touch only those."""
    state = dst / STATE_DIR
    records = kept | shard_records(state)
    missing = [n for n in plan.shard_names if n not in records]
    collect([f"{dst}: shard {n} has no completion record; run again with --resume" for n in missing], OutputError)
    files = [f for f in written_files(plan, ckpt, carried) if f not in plan.shard_names and f != MANIFEST]
    shards.write_json(dst / MANIFEST, {"settings": settings,
                                       "shards": {n: {k: records[n][k] for k in ("inputs", shards.DIGEST_KEY,
                                                                                  "sha256", "bytes") if k in records[n]}
                                                  for n in plan.shard_names},
                                       "files": files})
    _copy_other_files(ckpt, dst, carried)
    shards.write_json(dst / CONFIG, plan.config)
    write_index(plan, dst)
    shutil.rmtree(state, ignore_errors=True)
