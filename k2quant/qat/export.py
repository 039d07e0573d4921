"""From a QAT state to INT4: the audit of an INT4 source, and the export through the convert writer."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from k2quant.errors import K2QuantError
from k2quant.formats import convert, inspect, plan, source, tiny
from k2quant.formats.checkpoint import Checkpoint
from k2quant.qat import wrap
from k2quant.qat.config import QatConfig
from k2quant.qat.state import CONFIG, MODEL_FILE, RUN_FILE, is_trainer_file, prepare_out, read_run
from k2quant.quant.names import INT4_RULES
from k2quant.quant.scheme import QuantScheme


def check_int4_source(cfg: QatConfig, scheme: QuantScheme, ckpt: Checkpoint) -> dict | None:
    """For an INT4 source: the audit, refusing a scale rule that would not reproduce it at step 0."""
    if source.detect(ckpt).name != "int4":
        return None
    audit = inspect.audit_int4(ckpt, scheme)
    exact = [r for r in INT4_RULES if audit[r]["codes"] == 1.0 and audit[r]["scales"] == 1.0]
    if audit["tensors"] and cfg.scale_rule not in exact and not cfg.requantize:
        found = f"the {exact[0]} rule" if exact else "neither scale rule"
        shares = ", ".join(f"{r}: {audit[r]['codes']:.2%} of codes, {audit[r]['scales']:.2%} of scales"
                           for r in INT4_RULES)
        fix = f"pass --scale-rule {exact[0]}" if exact else "pass --requantize to start from its dequantized weights"
        raise K2QuantError(f"{cfg.src}: INT4 checkpoint is reproduced exactly by {found}, not by --scale-rule "
                           f"{cfg.scale_rule} ({shares}), so step 0 would not equal the shipped model; {fix}")
    return audit


def per_expert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused expert tensors split into Kimi's per-expert ``.weight`` names; the rest as is."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        holder, _, param = name.rpartition(".")
        if param not in wrap.EXPERT_PROJ or t.dim() != 3:
            out[name] = t
            continue
        projs = wrap.EXPERT_PROJ[param]
        rows = t.shape[1] // len(projs)
        for e in range(t.shape[0]):
            for i, proj in enumerate(projs):
                out[f"{holder}.{e}.{proj}.weight"] = t[e, i * rows:(i + 1) * rows].contiguous()  # [N, K]
    return out


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
            if p.is_file() and p.name not in (MODEL_FILE, RUN_FILE, CONFIG) and not is_trainer_file(p.name):
                shutil.copy2(p, Path(tmp) / p.name)
        # one process writes the export, even inside a multi-process (torchrun) training run
        return convert.convert(tmp, out, "int4", cfg.scheme(), force=True, progress=progress, rank=0, world_size=1)
