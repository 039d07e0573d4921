"""``k2quant qat``: train a K2-class model with fake-quant routed experts, then export it to INT4.

Dtypes (train = serve): targeted weights (routed experts by default) are fp32 masters that the
forward fake-quantizes straight to the bf16 weight it multiplies by; every other parameter is held
in bf16 for compute with an fp32 master copy in the optimizer. Export writes the targeted fp32
masters and the bf16 rest to a temporary checkpoint and runs convert on it, whose INT4 codes come
from the same kernel the forward used, so the exported model computes what was trained.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from k2quant.errors import K2QuantError
from k2quant.formats import load, source
from k2quant.formats.checkpoint import Checkpoint
from k2quant.qat import dist, export, state, weights, wrap
from k2quant.qat.config import QatConfig, QatReport
from k2quant.qat.data import batch_indices, datasets
from k2quant.qat.losses import TopkTeacher, eval_batches, evaluate, losses
from k2quant.qat.masters import Masters
from k2quant.qat.model import build_models, check_teacher, load_teacher, stored_grid

log = logging.getLogger(__name__)


def schedule(cfg: QatConfig) -> Callable[[int], float]:
    """Linear warmup to ``lr``, then cosine down to ``min_lr_ratio * lr``."""
    warm = max(1, int(cfg.warmup * cfg.steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        p = min(1.0, (step - warm) / max(1, cfg.steps - warm))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return factor


class ExpertCounter:
    """Tokens routed to each expert, per MoE layer, since the last ``take()``.

    Counts only inside the model's own forward: activation checkpointing reruns the decoder layers
    (and their routers) in backward, outside it, and must not count the tokens twice."""

    def __init__(self, model: nn.Module):
        self.counts: dict[str, torch.Tensor] = {}
        self.armed = False
        # transformers' fused experts of any family receive (hidden_states, top_k_index [T, k], top_k_weights)
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in model.named_modules()
                        if wrap.is_fused_experts(m)]
        self.handles += [model.register_forward_pre_hook(lambda *_: setattr(self, "armed", True)),
                         model.register_forward_hook(lambda *_: setattr(self, "armed", False), always_call=True)]

    def _hook(self, name: str):
        def hook(module, args) -> None:
            if not self.armed:
                return
            c = torch.bincount(args[1].reshape(-1), minlength=module.gate_up_proj.shape[0])
            self.counts[name] = self.counts.get(name, 0) + c
        return hook

    def take(self, accelerator=None) -> dict[str, list[int]]:
        """The counts (summed over processes when ``accelerator`` runs several), and a fresh start."""
        if accelerator is not None and accelerator.num_processes > 1:
            self.counts = {n: accelerator.reduce(c.to(accelerator.device), "sum").cpu() for n, c in self.counts.items()}
        out = {n.removesuffix(".experts").removesuffix(".mlp"): c.tolist() for n, c in self.counts.items()}
        self.counts = {}
        return out


# -- the run -------------------------------------------------------------------------------------
Progress = Callable[[dict], None]


def run(cfg: QatConfig, resume: str | Path | None = None, progress: Progress | None = None,
        accelerator=None) -> QatReport:
    """Train ``cfg.src`` with fake-quant targets for ``cfg.steps`` steps, save state, and export INT4.

    ``accelerator``: an ``accelerate.Accelerator`` (default: one built from the environment, as
    ``accelerate launch`` sets it up)."""
    from accelerate import Accelerator

    t0 = time.perf_counter()
    scheme = cfg.scheme()
    out = Path(cfg.out)
    resume = Path(resume) if resume is not None else None
    check_teacher(cfg)  # before anything is written
    first = state.begin(cfg, resume)  # the step training starts at; a resume must use the saved settings
    src = Checkpoint(cfg.src)  # opened once: its format, INT4 audit and extra files
    audit = export.check_int4_source(cfg, scheme, src)
    torch.manual_seed(cfg.seed)
    tokenizer = load.load_tokenizer(cfg.tokenizer or cfg.src, fix="or pass --tokenizer DIR")
    train_seqs, held = datasets(cfg, tokenizer)
    # devices, processes, sharding; dtypes are k2quant's own (fp32 masters, bf16 compute)
    accelerator = accelerator or Accelerator()
    if cfg.batch_size % accelerator.num_processes:
        raise K2QuantError(f"--batch-size {cfg.batch_size} does not split over {accelerator.num_processes} "
                           f"processes; use a multiple of {accelerator.num_processes}")
    teacher = _topk_teacher(cfg, accelerator, train_seqs, held, first) if cfg.teacher_topk > 0 else None
    stored = load.stored_dtypes(cfg.src)  # the BF16 form's dtypes on disk (export names, the router's grid)
    student, model_teacher = build_models(cfg, scheme, with_teacher=teacher is None, stored=stored)  # before sharding
    student, model_teacher = dist.distribute(accelerator, student, model_teacher)
    teacher = teacher if teacher is not None else model_teacher
    model = accelerator.unwrap_model(student)  # names without a DDP prefix; FSDP2 shards in place
    masters = Masters(model, stored_grid(stored, model))
    opt = torch.optim.AdamW(masters.masters, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(cfg))
    step = state.load_state(resume, student, masters, opt, sched, accelerator) if resume else 0
    tied = load.tied_names(model)  # lm_head tied to the embeddings (SmolLM2, Llama 3.2): not saved twice
    counter = ExpertCounter(model)
    last_codes = _codes(model) if cfg.log_every else {}
    main = accelerator.is_main_process  # logs once, for all processes
    logf = open(cfg.json_log, "a" if step else "w") if cfg.json_log and main else None
    progress = progress if main else None
    try:
        while step < cfg.steps and (cfg.stop_after is None or step < cfg.stop_after):
            rec = train_step(cfg, accelerator, student, teacher, masters, opt, sched, train_seqs, step)
            step += 1
            if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps):
                codes = _codes(model)
                rec["flip_rate"] = weights.flip_rate(last_codes, codes, dist.sum_over(accelerator))
                last_codes = codes
            rec["expert_tokens"] = counter.take(accelerator)
            if cfg.eval_every and step % cfg.eval_every == 0:
                rec["eval"] = evaluate(student, teacher, held, cfg.batch_size, cfg.eval_batches)
                counter.take()
            _emit(rec, logf, progress)
            if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0) or step == cfg.stop_after:
                model_sd = masters.stored(accelerator.get_state_dict(student))  # gathered when sharded
                model_sd = {k: v for k, v in model_sd.items() if k not in tied}  # tied: stored once, as the source
                state.save_state(out / state.STATE, cfg, src, step, model_sd, masters, opt, sched, tokenizer,
                                 accelerator)
    finally:
        if logf:
            logf.close()
        for h in counter.handles:
            h.remove()
    result = evaluate(student, teacher, held, cfg.batch_size, cfg.eval_batches) if step == cfg.steps else {}
    exported = step == cfg.steps and cfg.export and accelerator.is_main_process
    if exported:
        export.export(out / state.STATE, out, replace=True)
    return QatReport(str(out), step, round(time.perf_counter() - t0, 3), source.detect(src).name,
                     cfg.scale_rule, audit, result, exported)


def _codes(model: nn.Module) -> dict[str, torch.Tensor]:
    """The int8 codes of the targeted weights this process holds."""
    return {k: q for k, (q, _) in weights.codes(model).items()}


def _rank_batch(cfg: QatConfig, accelerator, seqs: torch.Tensor, step: int) -> torch.Tensor:
    ids = seqs[batch_indices(len(seqs), cfg.batch_size, step, cfg.seed)]  # [B, T], the global batch
    return ids[accelerator.process_index::accelerator.num_processes].to(accelerator.device)  # this rank's share


def _topk_teacher(cfg: QatConfig, accelerator, seqs: torch.Tensor, held: torch.Tensor, first: int) -> TopkTeacher:
    """Run the teacher once over this rank's share of steps ``first..steps`` and the evaluation batches,
    keep their top-k log-probs, and free the teacher."""
    teacher = dist.distribute(accelerator, None, load_teacher(cfg))[1]
    cache = TopkTeacher(cfg.teacher_topk)
    for step in range(first, cfg.steps):
        cache.add(teacher, _rank_batch(cfg, accelerator, seqs, step))
    for ids in eval_batches(held, cfg.batch_size, cfg.eval_batches):
        cache.add(teacher, ids.to(accelerator.device))
    del teacher
    gc.collect()
    return cache


def train_step(cfg: QatConfig, accelerator, student: nn.Module, teacher, masters: Masters,
               opt: torch.optim.Optimizer, sched, seqs: torch.Tensor, step: int) -> dict:
    """One optimizer step on the batch of 0-based ``step``; returns its log record (without flips/experts)."""
    t0 = time.perf_counter()
    ids = _rank_batch(cfg, accelerator, seqs, step)
    loss, parts = losses(cfg, student, teacher, ids)
    accelerator.backward(loss)  # gradients averaged over ranks: the mean over the global batch
    masters.grads_to_masters()
    norm = torch.nn.utils.clip_grad_norm_(masters.masters, cfg.clip) if cfg.clip > 0 else torch.tensor(0.0)
    norm = dist.full_value(norm)
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    masters.masters_to_params()
    if accelerator.num_processes > 1:  # log the global batch's means
        vals = accelerator.reduce(torch.tensor([loss.item(), parts["kl"], parts["ce"]], device=accelerator.device),
                                  "mean").tolist()
        loss, parts = torch.tensor(vals[0]), {"kl": vals[1], "ce": vals[2]}
    dt = time.perf_counter() - t0
    return {"step": step + 1, "loss": loss.item(), **parts, "lr": lr, "grad_norm": float(norm),
            "step_s": dt, "tokens_per_s": ids.numel() * accelerator.num_processes / dt}


def _emit(rec: dict, logf, progress: Progress | None) -> None:
    if logf:
        logf.write(json.dumps(rec) + "\n")
        logf.flush()
    if progress:
        progress(rec)
    log.debug("step %d loss %.5f", rec["step"], rec["loss"])
