"""A Hugging Face checkpoint directory: config, index, every shard's validated header.

Opening a checkpoint reads headers only (a few MB for a 1 TB model). Tensors are read one at
a time with ``read``. Scales are resolved through the index, so a scale may sit in another
shard than its weight.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from k2quant.errors import FormatError, collect
from k2quant.formats import shards

INDEX = "model.safetensors.index.json"
CONFIG = "config.json"


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
        if not p.exists():
            raise FormatError(f"{p}: missing; a checkpoint directory needs its config.json "
                              f"(copy it from the model's release)")
        try:
            cfg = json.loads(p.read_text())
        except ValueError as exc:
            raise FormatError(f"{p}: not valid JSON ({exc}); restore it from the model's release") from None
        if not isinstance(cfg, dict):
            raise FormatError(f"{p}: expected a JSON object, found {type(cfg).__name__}")
        return cfg

    def _shard_files(self) -> list[Path]:
        idx = self.path / INDEX
        found = sorted(self.path.glob("*.safetensors"))
        if idx.exists():
            try:
                index = json.loads(idx.read_text())
                self.weight_map: dict[str, str] | None = dict(index["weight_map"])
            except (ValueError, KeyError, TypeError) as exc:
                raise FormatError(f"{idx}: not a valid index (need a 'weight_map' object: {exc}); "
                                  f"delete it if the directory has a single model.safetensors") from None
            names = sorted(set(self.weight_map.values()))
            missing = [n for n in names if not (self.path / n).exists()]
            if missing:
                raise FormatError(f"{idx}: names shard file(s) {missing[:5]} that do not exist in {self.path}; "
                                  f"copy the missing shards or re-download the checkpoint")
            return [self.path / n for n in names]
        self.weight_map = None
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

    def other_files(self) -> list[Path]:
        """Files to carry over unchanged: everything but shards, the index and config.json."""
        out = []
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path)
            if p.is_dir() or rel.parts[0].startswith(".k2q") or p.name.endswith(shards.TMP_SUFFIX):
                continue
            if p.suffix == ".safetensors" or rel.as_posix() in (INDEX, CONFIG):
                continue
            out.append(p)
        return out
