"""A QAT run's state directory: save (atomically, per process under FSDP), read back, resume.

``OUT/state`` holds the gathered model (``model.safetensors``: fp32 fake-quantized masters, the rest in
its stored dtype), config, tokenizer, ``run.json`` (settings and step) and the trainer state (fp32
masters of the bf16 weights, optimizer, scheduler, RNG): ``trainer.pt``, or one file per process.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from k2quant.errors import K2QuantError, OutputError
from k2quant.formats import load, shards
from k2quant.formats.checkpoint import CONFIG, Checkpoint
from k2quant.qat import dist
from k2quant.qat.config import RESULT_FIELDS, QatConfig
from k2quant.qat.masters import Masters

STATE = "state"
MODEL_FILE, TRAINER_FILE, RUN_FILE = "model.safetensors", "trainer.pt", "run.json"


def _rng_state() -> dict:
    """The RNG states as tensors and plain values only, so the trainer file loads with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def save_state(state_dir: Path, cfg: QatConfig, ckpt: Checkpoint, step: int, model_sd: dict[str, torch.Tensor], masters: Masters,
               opt: torch.optim.Optimizer, sched, tokenizer, accelerator) -> None:
    """Write the whole run state next to ``state_dir`` and swap it in (the old state survives a crash).

    Collective: every process calls it. The main one writes the gathered model, config and tokenizer;
    each writes its own masters, optimizer state and RNG (shards of them under FSDP)."""
    tmp = state_dir.with_name(state_dir.name + ".k2q-tmp")
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for p in ckpt.other_files():  # generation config, tokenizer, chat template, ...
            (tmp / p.relative_to(ckpt.path)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, tmp / p.relative_to(ckpt.path))
        tokenizer.save_pretrained(str(tmp))
        save_file({k: v.detach().contiguous() for k, v in model_sd.items()}, str(tmp / MODEL_FILE))
        cfg_src = {k: v for k, v in ckpt.config.items() if k not in ("quantization_config", "compression_config")}
        (tmp / CONFIG).write_text(json.dumps(cfg_src, indent=2))
        (tmp / RUN_FILE).write_text(json.dumps({"config": dataclasses.asdict(cfg), "step": step,
                                                "processes": world}, indent=2))
    accelerator.wait_for_everyone()
    torch.save(dist.to_local_tree({"step": step, "masters": masters.state_dict(), "optimizer": opt.state_dict(),
                                       "scheduler": sched.state_dict(), "rng": _rng_state()}),
               trainer_file(tmp, rank, world))
    accelerator.wait_for_everyone()
    if main:
        old = state_dir.with_name(state_dir.name + ".k2q-old")
        if state_dir.exists():
            os.replace(state_dir, old)
        os.replace(tmp, state_dir)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def read_run(state_dir: str | Path) -> tuple[QatConfig, int]:
    """The config and step saved in a state directory."""
    p = Path(state_dir) / RUN_FILE
    if not p.is_file():
        raise K2QuantError(f"{state_dir}: not a k2quant qat state directory (no {RUN_FILE}); pass the `state` "
                           f"directory inside a qat --out directory")
    fix = "the state is corrupt: resume from an intact state or start a new run"
    run = shards.read_json(p, "qat run record", fix)
    cfg, step = run.get("config"), run.get("step")
    problems = [] if isinstance(cfg, dict) else [f"'config' is {type(cfg).__name__}, expected an object"]
    if type(step) is not int or step < 0:
        problems.append(f"'step' is {step!r}, expected a non-negative integer")
    fields = {f.name: f for f in dataclasses.fields(QatConfig)}
    for key, value in (cfg if isinstance(cfg, dict) else {}).items():
        if key not in fields:
            problems.append(f"config has unknown key {key!r}")
        elif not _fits(value, str(fields[key].type)):
            problems.append(f"config {key!r} is {value!r}, expected {fields[key].type}")
    if isinstance(cfg, dict):
        problems += [f"config lacks {k!r}" for k, f in fields.items() if k not in cfg
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if problems:
        raise K2QuantError(f"{p}: not a valid qat run record ({'; '.join(problems[:5])}); {fix}")
    return QatConfig(**cfg), step


def _fits(value: object, annotation: str) -> bool:
    """Does a JSON value fit a QatConfig field's annotation (``int``, ``list[str] | None``, ...)?"""
    for alt in annotation.split("|"):
        alt = alt.strip()
        if alt == "None" and value is None:
            return True
        if alt == "bool" and isinstance(value, bool):
            return True
        if alt == "int" and type(value) is int:
            return True
        if alt == "float" and type(value) in (int, float):
            return True
        if alt == "str" and isinstance(value, str):
            return True
        if alt == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return True
    return False


def begin(cfg: QatConfig, resume: Path | None) -> int:
    """Before a run: a resume must use the saved settings; ``cfg.out`` must be empty or hold this run's state.
    Returns the step training starts at (the saved one, or 0)."""
    saved, step = read_run(resume) if resume is not None else (None, 0)
    if saved is not None:
        check_resume(saved, cfg, resume)
    prepare_out(Path(cfg.out), resume is not None)
    return step


def check_resume(saved: QatConfig, cfg: QatConfig, state_dir: str | Path) -> None:
    """A resumed run must use the settings that decide the result; name each one that differs."""
    diff = [f"{f}: saved {getattr(saved, f)!r}, given {getattr(cfg, f)!r}" for f in RESULT_FIELDS
            if getattr(saved, f) != getattr(cfg, f)]
    if diff:
        raise K2QuantError(f"{state_dir}: cannot resume with different settings ({'; '.join(diff)}); "
                           f"rerun with the saved settings or start a new run")


def load_state(state_dir: Path, student: nn.Module, masters: Masters, opt, sched, accelerator) -> int:
    rank, world = accelerator.process_index, accelerator.num_processes
    trainer = trainer_file(state_dir, rank, world)
    if not trainer.is_file():
        saved = shards.read_json(state_dir / RUN_FILE, "qat run record", "start a new run").get("processes", 1)
        raise K2QuantError(f"{state_dir}: saved by {saved} process(es), resumed with {world}; the optimizer state "
                           f"is stored per process: resume with {saved} process(es)")
    sd = _load_model_file(state_dir / MODEL_FILE)
    if dist.is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(student, sd, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        accelerator.unwrap_model(student).load_state_dict(sd, strict=False)
    model = accelerator.unwrap_model(student)
    missing = set(model.state_dict()) - set(sd) - load.tied_names(model)
    unknown = set(sd) - set(model.state_dict())
    if missing or unknown:
        raise K2QuantError(f"{state_dir / MODEL_FILE}: does not fit this model (missing {sorted(missing)[:3]}, unknown "
                           f"{sorted(unknown)[:3]}); the state is from another run: resume from an intact state or "
                           f"start a new run")
    tr = read_trainer(trainer)
    try:
        masters.load_state_dict(tr["masters"])
        opt.load_state_dict(tr["optimizer"])
        dist.optimizer_state_to_dtensor(opt)
        sched.load_state_dict(tr["scheduler"])
        _set_rng_state(tr["rng"])
        return int(tr["step"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as exc:
        raise K2QuantError(f"{trainer}: trainer state does not fit this run ({type(exc).__name__}: {exc}); the "
                           f"state is corrupt or from another run: resume from an intact state or start a new "
                           f"run") from None


def _load_model_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise K2QuantError(f"{path}: cannot read the saved model ({exc}); the state is corrupt: resume from an "
                           f"intact state or start a new run") from None


def read_trainer(path: Path) -> dict:
    """A trainer state file, loaded without pickle code execution (``weights_only=True``: tensors and plain
    containers only; a file that needs anything else is refused, never run)."""
    try:
        tr = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many types; all mean "not a safe state file"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise K2QuantError(f"{path}: cannot be loaded as a k2quant trainer state with weights_only=True ({first}); "
                           f"k2quant never unpickles code. The file is corrupt, crafted, or from a k2quant that "
                           f"saved numpy objects: start a new run") from None
    if not isinstance(tr, dict) or not {"step", "masters", "optimizer", "scheduler", "rng"} <= set(tr):
        raise K2QuantError(f"{path}: not a k2quant trainer state (expected a dict with step, masters, optimizer, "
                           f"scheduler and rng); resume from an intact state or start a new run")
    return tr


def prepare_out(out: Path, resuming: bool) -> None:
    """The output may be empty or hold only this run's state and logs (a resume)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; choose a directory for --out")
    extra = sorted(p.name for p in out.iterdir() if p.name != STATE and not p.name.startswith(STATE + ".k2q")) \
        if out.exists() else []
    if extra and not resuming:
        raise OutputError(f"{out}: output directory is not empty ({', '.join(extra[:5])}); choose an empty "
                          f"directory, or pass --resume --out {out} to continue the run in it")
    out.mkdir(parents=True, exist_ok=True)


def trainer_file(state_dir: Path, rank: int, world: int) -> Path:
    """A process's trainer state: ``trainer.pt`` alone, ``trainer.rankR-of-W.pt`` among W processes."""
    return state_dir / (TRAINER_FILE if world == 1 else TRAINER_FILE.replace(".pt", f".rank{rank}-of-{world}.pt"))


def is_trainer_file(name: str) -> bool:
    stem = TRAINER_FILE.removesuffix(".pt")
    return name == TRAINER_FILE or (name.startswith(stem + ".rank") and name.endswith(".pt"))
