"""What a QAT run reads and writes besides its data: the INT4 source audit, the state directory
(save, resume) and the INT4 export.

``OUT/state`` holds the gathered model (``model.safetensors``: fp32 fake-quantized masters, the rest in
its compute dtype), config, tokenizer, ``run.json`` (settings and step) and the trainer state (fp32
masters of the bf16 weights, optimizer, scheduler, RNG): ``trainer.pt``, or one file per process.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from k2quant import qat, qat_dist
from k2quant.errors import K2QuantError, OutputError
from k2quant.formats import convert, plan, source, tiny
from k2quant.formats.checkpoint import CONFIG, Checkpoint
from k2quant.quant import int4_group
from k2quant.quant.scheme import QuantScheme

if TYPE_CHECKING:
    from k2quant.qat_run import Masters, QatConfig

STATE = "state"
MODEL_FILE, TRAINER_FILE, RUN_FILE = "model.safetensors", "trainer.pt", "run.json"
#: settings that decide the trained weights: a resume must use the same ones
RESULT_FIELDS = ("src", "data", "steps", "lr", "seq_len", "batch_size", "loss", "scale_rule", "group_size", "targets",
                 "ignore", "train", "warmup", "min_lr_ratio", "clip", "seed", "eval_fraction", "fake_quant", "teacher_topk")


def audit_int4(path: str | Path, scheme: QuantScheme) -> dict:
    """For every targeted INT4 tensor of ``path``: do its dequantized weights re-quantize to the stored
    codes and scales under each scale rule? ``{rule: {"codes": share, "scales": share}, "tensors": n}``."""
    ckpt = Checkpoint(path)
    src = source.detect(ckpt)
    mods, _ = source.modules(ckpt, src)
    same = {r: [0, 0] for r in int4_group.DIVISOR}  # rule -> [codes equal, scales equal]
    n_codes = n_scales = n = 0
    for mod in mods.values():
        if mod.rep != source.INT4 or not scheme.matches(mod.name, ("Linear",)):
            continue
        q = int4_group.unpack(ckpt.read(mod.parts["packed"].name), mod.shape[-1])
        scale = ckpt.read(mod.parts["scale"].name)
        w = int4_group.dequantize(q, scale, src.scheme, torch.bfloat16)  # what the loader gives the model
        for rule in same:
            q2, s2 = int4_group.quantize_weight(w, src.scheme.with_(scale_rule=rule))
            same[rule][0] += int((q2 == q).sum())
            same[rule][1] += int((s2 == scale).sum())
        n_codes, n_scales, n = n_codes + q.numel(), n_scales + scale.numel(), n + 1
    out: dict = {r: {"codes": c / max(1, n_codes), "scales": s / max(1, n_scales)} for r, (c, s) in same.items()}
    out["tensors"] = n
    return out


def check_int4_source(cfg: QatConfig, scheme: QuantScheme) -> dict | None:
    if source.detect(Checkpoint(cfg.src)).name != "int4":
        return None
    audit = audit_int4(cfg.src, scheme)
    exact = [r for r in int4_group.DIVISOR if audit[r]["codes"] == 1.0 and audit[r]["scales"] == 1.0]
    if audit["tensors"] and cfg.scale_rule not in exact and not cfg.requantize:
        found = f"the {exact[0]} rule" if exact else "neither scale rule"
        shares = ", ".join(f"{r}: {audit[r]['codes']:.2%} of codes, {audit[r]['scales']:.2%} of scales"
                           for r in int4_group.DIVISOR)
        fix = f"pass --scale-rule {exact[0]}" if exact else "pass --requantize to start from its dequantized weights"
        raise K2QuantError(f"{cfg.src}: INT4 checkpoint is reproduced exactly by {found}, not by --scale-rule "
                           f"{cfg.scale_rule} ({shares}), so step 0 would not equal the shipped model; {fix}")
    return audit


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])


def save_state(state_dir: Path, cfg: QatConfig, step: int, model_sd: dict[str, torch.Tensor], masters: Masters,
               opt: torch.optim.Optimizer, sched, tokenizer, accelerator) -> None:
    """Write the whole run state next to ``state_dir`` and swap it in (the old state survives a crash).

    Collective: every process calls it. The main one writes the gathered model, config and tokenizer;
    each writes its own masters, optimizer state and RNG (shards of them under FSDP)."""
    tmp = state_dir.with_name(state_dir.name + ".k2q-tmp")
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ckpt = Checkpoint(cfg.src)
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
    torch.save(qat_dist.to_local_tree({"step": step, "masters": masters.state_dict(), "optimizer": opt.state_dict(),
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
    from k2quant.qat_run import QatConfig

    run = json.loads(p.read_text())
    return QatConfig(**run["config"]), int(run["step"])


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
        saved = json.loads((state_dir / RUN_FILE).read_text()).get("processes", 1)
        raise K2QuantError(f"{state_dir}: saved by {saved} process(es), resumed with {world}; the optimizer state "
                           f"is stored per process: resume with {saved} process(es)")
    sd = load_file(str(state_dir / MODEL_FILE))
    if qat_dist.is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(student, sd, options=StateDictOptions(full_state_dict=True))
    else:
        accelerator.unwrap_model(student).load_state_dict(sd)
    tr = torch.load(trainer, weights_only=False)
    masters.load_state_dict(tr["masters"])
    opt.load_state_dict(tr["optimizer"])
    qat_dist.optimizer_state_to_dtensor(opt)
    sched.load_state_dict(tr["scheduler"])
    _set_rng_state(tr["rng"])
    return int(tr["step"])


def prepare_out(out: Path, resuming: bool) -> None:
    """The output may be empty or hold only this run's state and logs (a resume)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; choose a directory for --out")
    extra = sorted(p.name for p in out.iterdir() if p.name != STATE and not p.name.startswith(STATE + ".k2q")) \
        if out.exists() else []
    if extra and not resuming:
        raise OutputError(f"{out}: output directory is not empty ({', '.join(extra[:5])}); choose an empty "
                          f"directory, or pass --resume {out / STATE} to continue a run")
    out.mkdir(parents=True, exist_ok=True)


def per_expert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused expert tensors split into Kimi's per-expert ``.weight`` names; the rest as is."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        holder, _, param = name.rpartition(".")
        if param not in qat.wrap.EXPERT_PROJ or t.dim() != 3:
            out[name] = t
            continue
        projs = qat.wrap.EXPERT_PROJ[param]
        rows = t.shape[1] // len(projs)
        for e in range(t.shape[0]):
            for i, proj in enumerate(projs):
                out[f"{holder}.{e}.{proj}.weight"] = t[e, i * rows:(i + 1) * rows].contiguous()  # [N, K]
    return out


def trainer_file(state_dir: Path, rank: int, world: int) -> Path:
    """A process's trainer state: ``trainer.pt`` alone, ``trainer.rankR-of-W.pt`` among W processes."""
    return state_dir / (TRAINER_FILE if world == 1 else TRAINER_FILE.replace(".pt", f".rank{rank}-of-{world}.pt"))


def _is_trainer_file(name: str) -> bool:
    stem = TRAINER_FILE.removesuffix(".pt")
    return name == TRAINER_FILE or (name.startswith(stem + ".rank") and name.endswith(".pt"))


def export(state_dir: str | Path, out: str | Path, replace: bool = False,
           progress: convert.Progress | None = None) -> convert.ConvertReport:
    """The INT4 checkpoint of a qat state: targeted fp32 masters through convert, config and tokenizer kept."""
    state_dir, out = Path(state_dir), Path(out)
    cfg, _ = read_run(state_dir)
    if not replace:
        prepare_out(out, resuming=False)
    sd = per_expert_state_dict(load_file(str(state_dir / MODEL_FILE)))
    config = json.loads((state_dir / CONFIG).read_text())
    with tempfile.TemporaryDirectory(prefix=".k2q-export-", dir=out) as tmp:
        total = sum(t.numel() * t.element_size() for t in sd.values())
        tiny.write_checkpoint(tmp, sd, config, num_shards=max(1, -(-total // plan.DEFAULT_MAX_SHARD)),
                              move_scale=False)
        for p in state_dir.iterdir():  # tokenizer, generation config, ... (not the trainer's own files)
            if p.is_file() and p.name not in (MODEL_FILE, RUN_FILE, CONFIG) and not _is_trainer_file(p.name):
                shutil.copy2(p, Path(tmp) / p.name)
        # one process writes the export, even inside a multi-process (torchrun) training run
        return convert.convert(tmp, out, "int4", cfg.scheme(), force=True, progress=progress, rank=0, world_size=1)
