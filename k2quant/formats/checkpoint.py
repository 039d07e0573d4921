"""A Hugging Face checkpoint directory: config, index, every shard's validated header.

Opening a checkpoint reads headers only (a few MB for a 1 TB model). Tensors are read one at
a time with ``read``. Scales are resolved through the index, so a scale may sit in another
shard than its weight.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from k2quant.errors import FormatError, collect
from k2quant.formats import shards

INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
#: what a k2quant run records about its own output (written by ``output``; never carried into another output)
MANIFEST = "k2quant_manifest.json"


class Checkpoint:
    """Read-only view of a checkpoint directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            if self.path.is_file() and self.path.suffix == ".safetensors":
                raise FormatError(f"{self.path}: expected a checkpoint directory (config.json + *.safetensors), "
                                  f"got a single file; pass the directory that holds it")
            raise FormatError(f"{self.path}: no such checkpoint directory")
        self.config = self._read_config()
        self.files = self._shard_files()
        self.tensors: dict[str, shards.TensorInfo] = {}
        self._read_headers()

    # -- loading -----------------------------------------------------------------------------
    def _read_config(self) -> dict:
        p = self.path / CONFIG
        if not p.exists() and not p.is_symlink():
            raise FormatError(f"{p}: missing; a checkpoint directory needs its config.json "
                              f"(copy it from the model's release)")
        source_file(p, self.path, "config")
        cfg = shards.read_json(p, "config", "restore it from the model's release")
        _check_config(cfg, p)
        return cfg

    def _shard_files(self) -> list[Path]:
        idx = self.path / INDEX
        found = sorted(self.path.glob("*.safetensors"))
        if idx.exists() or idx.is_symlink():
            source_file(idx, self.path, "index")
            fix = "restore the index json that came with the checkpoint"
            index = shards.read_json(idx, "index", fix)
            wm = index.get("weight_map")
            if not isinstance(wm, dict):
                raise FormatError(f"{idx}: not a valid index (need a 'weight_map' object, found "
                                  f"{type(wm).__name__}); {fix}, or delete it if the directory has a single "
                                  f"model.safetensors")
            if not wm:
                raise FormatError(f"{idx}: weight_map is empty (the index lists no tensor); {fix}, or delete it if "
                                  f"the directory has a single model.safetensors")
            bad = sorted({repr(v) for v in wm.values() if not _plain_shard_name(v)})
            if bad:
                raise FormatError(f"{idx}: weight_map names {', '.join(bad[:5])}; every value must be the file name "
                                  f"of a *.safetensors shard in {self.path} (no directories, no '..'); {fix}")
            self.weight_map: dict[str, str] | None = wm
            names = sorted(set(wm.values()))
            missing = [n for n in names if not (self.path / n).exists() and not (self.path / n).is_symlink()]
            if missing:
                raise FormatError(f"{idx}: names shard file(s) {missing[:5]} that do not exist in {self.path}; "
                                  f"copy the missing shards or re-download the checkpoint")
            files = [self.path / n for n in names]
        else:
            self.weight_map = None
            files = found
        for f in files:
            source_file(f, self.path, "shard")
        if self.weight_map is not None:
            return files
        if not found:
            bins = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
            if bins:
                raise FormatError(
                    f"{self.path}: holds pickle checkpoint files ({', '.join(bins[:3])}); k2quant reads only "
                    f"safetensors (pickle can run arbitrary code). Convert first: load with transformers and "
                    f"call save_pretrained(dir, safe_serialization=True)")
            raise FormatError(f"{self.path}: no *.safetensors files and no {INDEX}")
        if len(found) > 1:
            raise FormatError(f"{self.path}: {len(found)} safetensors files but no {INDEX}; "
                              f"restore the index json that came with the checkpoint")
        return found

    def _read_headers(self) -> None:
        problems: list[str] = []
        for f in self.files:
            infos, _ = shards.read_header(f)
            for name, info in infos.items():
                if name in self.tensors:
                    problems.append(f"tensor {name!r} is in two shards: {self.tensors[name].file.name} and "
                                    f"{f.name}; remove the stale copy")
                    continue
                self.tensors[name] = info
        if self.weight_map is not None:
            idx = self.path / INDEX
            for name, fname in self.weight_map.items():
                info = self.tensors.get(name)
                if info is None:
                    problems.append(f"{idx}: names tensor {name!r} in {fname}, but no shard holds it; "
                                    f"the checkpoint is incomplete: re-copy {fname}")
                elif info.file.name != fname:
                    problems.append(f"{idx}: maps {name!r} to {fname}, but it is in {info.file.name}; "
                                    f"fix the index")
            for name, info in self.tensors.items():
                if name not in self.weight_map:
                    problems.append(f"{info.file}: holds {name!r}, which {INDEX} does not list; fix the index")
        collect(problems)

    # -- access ------------------------------------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        return shards.read_tensor(self.tensors[name])

    def source_order(self) -> list[str]:
        """Tensor names in file order, then offset order within each file (sequential reads)."""
        order = {f: i for i, f in enumerate(self.files)}
        return sorted(self.tensors, key=lambda n: (order[self.tensors[n].file], self.tensors[n].start))

    @property
    def quantization_config(self) -> dict | None:
        qc = self.config.get("quantization_config")
        if qc is None and isinstance(self.config.get("text_config"), dict):
            qc = self.config["text_config"].get("quantization_config")
        return qc

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    def other_files(self, remote_code: bool = False) -> list[Path]:
        """Files to carry over unchanged: everything but shards, the index, config.json and k2quant's manifest.

        Every one passes ``source_file`` (regular files; links only when they resolve inside the checkpoint),
        so a bad entry fails here, before anything is written. ``*.py`` (remote code that loaders run with
        ``trust_remote_code``) is carried only when ``remote_code`` is set.
        """
        out = []
        for p in sorted(self._walk()):
            rel = p.relative_to(self.path)
            if rel.parts[0].startswith(".k2q") or p.name.endswith(shards.TMP_SUFFIX):
                continue
            if p.suffix == ".safetensors" or rel.as_posix() in (INDEX, CONFIG, MANIFEST):
                continue
            if p.suffix == ".py" and not remote_code:
                continue
            source_file(p, self.path, "file to carry over")
            out.append(p)
        return out

    def remote_code_files(self) -> list[Path]:
        """``*.py`` files a conversion leaves behind unless asked to carry them."""
        return [p for p in self.other_files(remote_code=True) if p.suffix == ".py"]

    def _walk(self) -> list[Path]:
        """Every non-directory entry under the checkpoint, without following directory links (refused)."""
        found = []
        for root, dirs, files in os.walk(self.path):
            for d in dirs:
                if os.path.islink(os.path.join(root, d)) and not d.startswith(".k2q"):
                    raise FormatError(f"{Path(root) / d}: is a link to a directory; k2quant copies regular files "
                                      f"only: replace the link with a copy of the directory")
            found += [Path(root) / f for f in files]
        return found


#: config fields k2quant computes with: integers when present
INT_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
              "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace", "num_attention_heads",
              "num_key_value_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
              "vocab_size", "max_position_embeddings", "num_nextn_predict_layers")


def _check_config(cfg: dict, p: Path) -> None:
    """The fields k2quant uses have the JSON types it computes with (one message naming each bad field)."""
    problems = []
    for scope, c in (("", cfg), ("text_config.", cfg.get("text_config"))):
        if scope and c is None:
            continue
        if not isinstance(c, dict):
            problems.append(f"'text_config' is {type(c).__name__}, expected an object")
            continue
        for key in INT_FIELDS:
            v = c.get(key)
            if v is not None and (type(v) is not int or v < 0):
                problems.append(f"'{scope}{key}' is {v!r}, expected a non-negative integer")
        qc = c.get("quantization_config")
        if qc is not None and not isinstance(qc, dict):
            problems.append(f"'{scope}quantization_config' is {qc!r}, expected an object (or no key for BF16)")
    if problems:
        raise FormatError(f"{p}: {'; '.join(problems)}; restore config.json from the model's release")


def _plain_shard_name(v: object) -> bool:
    return (isinstance(v, str) and v.endswith(".safetensors") and "/" not in v and "\\" not in v
            and "\0" not in v and v not in (".", ".."))


def allowed_roots(ckpt_dir: Path) -> list[Path]:
    """Where a link inside a checkpoint may point: the checkpoint itself, and for a Hugging Face cache snapshot
    (``models--X/snapshots/REV``) the repository's ``blobs`` folder its links point into."""
    root = ckpt_dir.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def source_file(path: Path, ckpt_dir: Path, what: str) -> Path:
    """``path`` resolved, if it is a regular file that stays inside the checkpoint; else a ``FormatError``.

    A link that leaves the checkpoint (``tokenizer.json -> /etc/passwd``) would copy or read a file the
    checkpoint does not own; a FIFO or device would block or never end.
    """
    try:
        real = path.resolve(strict=True)
        st = os.stat(real)
    except (OSError, RuntimeError) as exc:
        raise FormatError(f"{path}: {what} cannot be opened ({getattr(exc, 'strerror', None) or exc}); a broken "
                          f"link or a file that vanished: restore it or remove it") from None
    if path.is_symlink() and not any(real.is_relative_to(r) for r in allowed_roots(ckpt_dir)):
        raise FormatError(f"{path}: {what} is a link to {real}, outside the checkpoint {ckpt_dir}; k2quant reads "
                          f"only files inside the checkpoint: replace the link with a copy of the file")
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{path}: {what} is {shards._kind(st.st_mode)}, not a regular file; k2quant reads only "
                          f"regular files: remove it or replace it with the file")
    return real
