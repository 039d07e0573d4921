"""``k2quant qat``: train a K2-class model with fake-quant routed experts, then export it to INT4.

Dtypes (train = serve): targeted weights (routed experts by default) are fp32 masters that the
forward fake-quantizes straight to the bf16 weight it multiplies by; every other parameter is held
in bf16 for compute with an fp32 master copy in the optimizer. Export writes the targeted fp32
masters and the bf16 rest to a temporary checkpoint and runs convert on it, whose INT4 codes come
from the same kernel the forward used, so the exported model computes what was trained.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from k2quant import qat, qat_dist, qat_io
from k2quant.errors import K2QuantError
from k2quant.formats import load, plan, source
from k2quant.formats.checkpoint import Checkpoint
from k2quant.qat_data import batch_indices, datasets
from k2quant.quant.scheme import QuantScheme

log = logging.getLogger(__name__)

LOSSES = ("kl", "ce", "ce+kl")
TRAIN = ("all", "experts")


@dataclasses.dataclass
class QatConfig:
    """Everything a run needs; saved as ``state/run.json``."""

    src: str
    data: list[str]
    out: str
    steps: int = 2000
    lr: float = 1e-5
    seq_len: int = 4096
    batch_size: int = 8
    loss: str = "kl"
    scale_rule: str = "kimi"
    group_size: int = 32
    targets: list[str] | None = None
    ignore: list[str] | None = None
    train: str = "all"
    warmup: float = 0.1  # share of steps
    min_lr_ratio: float = 0.0
    clip: float = 1.0
    grad_checkpointing: bool = False
    save_every: int = 0  # 0: only at the end
    eval_every: int = 0
    eval_fraction: float = 0.05
    eval_data: list[str] | None = None
    eval_batches: int = 8
    log_every: int = 1
    json_log: str | None = None
    seed: int = 0
    tokenizer: str | None = None
    fake_quant: bool = True  # False: the same run without fake quant (for measurements)
    teacher_topk: int = 0  # >0: the teacher's top-k log-probs computed up front, the teacher model freed
    requantize: bool = False  # accept an INT4 source whose codes the scale rule does not reproduce
    stop_after: int | None = None  # stop (after saving) at this step, as a crash would
    export: bool = True

    def scheme(self) -> QuantScheme:
        return plan.target_scheme("int4", group_size=self.group_size, scale_rule=self.scale_rule,
                                  targets=self.targets, ignore=self.ignore)


@dataclasses.dataclass
class QatReport:
    out: str
    steps_done: int
    seconds: float
    source_format: str
    scale_rule: str
    int4_audit: dict | None
    eval: dict
    exported: bool


# -- model ---------------------------------------------------------------------------------------
def load_teacher(cfg: QatConfig) -> nn.Module:
    """The source as loaded: frozen, bf16."""
    teacher = load.load_model(cfg.src, dtype=torch.bfloat16)
    teacher.requires_grad_(False)
    return teacher


def build_models(cfg: QatConfig, scheme: QuantScheme, with_teacher: bool = True) -> tuple[nn.Module, nn.Module | None]:
    """``(student, teacher)``: the source as loaded (teacher, frozen bf16) and a prepared copy
    (``teacher`` None when ``with_teacher`` is False: the student alone, loaded once)."""
    teacher = load_teacher(cfg)
    student = copy.deepcopy(teacher) if with_teacher else teacher
    teacher = teacher if with_teacher else None
    holders = qat.prepare(student, scheme)
    if not holders:
        raise K2QuantError(f"{cfg.src}: no weight matches the targets {list(scheme.targets)} minus ignore "
                           f"{list(scheme.ignore)}; nothing would be fake-quantized: check --targets/--ignore")
    _check_export_names(cfg.src, student)
    for h in holders:  # targeted holders keep fp32 masters; the forward casts through fake quant
        module = student.get_submodule(h.name)
        for p in (qat.wrap.EXPERT_PROJ if h.experts else ("weight",)):
            setattr(module, p, nn.Parameter(getattr(module, p).detach().float()))
    qat.set_enabled(student, cfg.fake_quant)
    trained = {id(p) for _, p in _targeted_params(student)} if cfg.train == "experts" else None
    for p in student.parameters():
        p.requires_grad_(trained is None or id(p) in trained)
    if cfg.grad_checkpointing:
        student.config.use_cache = False
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    return student, teacher


def _check_export_names(src: str, model: nn.Module) -> None:
    """The export writes each targeted weight under its module name (fused experts split as
    ``<experts>.<e>.{gate,up,down}_proj``): refuse a family whose checkpoint stores them otherwise (Mixtral's
    ``block_sparse_moe.experts.<e>.w1``), before training, rather than export names no loader reads."""
    stored = load.stored_dtypes(src)
    odd = [name for name, _, _ in qat.targeted(model) if name + ".weight" not in stored]
    if odd:
        raise K2QuantError(f"{src}: qat would export {odd[0]!r} (and {len(odd) - 1} more), but the checkpoint stores "
                           f"no such tensor: {type(model).__name__} names its weights on disk otherwise, which qat "
                           f"export does not map back yet; narrow --targets to modules stored under their own names "
                           f"(e.g. --targets Linear --ignore lm_head --ignore 're:.*experts.*')")


def _targeted_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    out = []
    for h in qat.holders(model):
        module = model.get_submodule(h.name)
        out += [(f"{h.name}.{p}", getattr(module, p)) for p in (qat.wrap.EXPERT_PROJ if h.experts else ("weight",))]
    return out


class Masters:
    """fp32 master copies of the compute parameters.

    A bf16 parameter gets a separate fp32 master and is rounded to nearest bf16 after each step. A
    parameter that transformers holds wider in memory than the checkpoint stores it (``grid``: name ->
    stored dtype, e.g. transformers 5.24's fp32 router over a BF16 tensor on disk) is treated the same
    way: a separate fp32 master, the parameter kept on the stored dtype's grid, so that the checkpoint
    written holds exactly what the forward computed with. Other fp32 parameters (the fake-quantized
    targets) are their own master."""

    def __init__(self, model: nn.Module, grid: dict[str, torch.dtype] | None = None):
        self.grid = dict(grid or {})
        self.names, self.params, self.masters = [], [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                own = p.dtype == torch.float32 and name not in self.grid
                m = p if own else p.detach().float().clone().requires_grad_(True)
                self.names.append(name)
                self.params.append(p)
                self.masters.append(m)

    def grads_to_masters(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    def masters_to_params(self) -> None:
        with torch.no_grad():
            for n, p, m in zip(self.names, self.params, self.masters):
                if m is not p:
                    p.copy_(m.to(self.grid.get(n, p.dtype)))  # round to nearest bf16 (or the stored dtype)

    def stored(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A model state dict with the ``grid`` parameters in their stored dtype (exact: they lie on its grid)."""
        return {k: v.to(self.grid[k]) if k in self.grid else v for k, v in sd.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The separate fp32 masters (their local shards under FSDP) by parameter name."""
        return {n: qat.local_rows(m.detach())[0] for n, p, m in zip(self.names, self.params, self.masters) if m is not p}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p, m in zip(self.names, self.params, self.masters):
                if m is not p:
                    qat.local_rows(m)[0].copy_(sd[n])  # a rank's own shard under FSDP
        self.masters_to_params()


def stored_grid(src: str, model: nn.Module) -> dict[str, torch.dtype]:
    """``{parameter: stored dtype}`` for the non-targeted parameters that the model holds in a wider dtype
    than the checkpoint ``src`` stores them (transformers 5.24+ keeps DeepSeek-V3's BF16 router in fp32)."""
    stored = load.stored_dtypes(src)
    targeted = {n for n, _ in _targeted_params(model)}
    out = {}
    for name, p in model.named_parameters():
        want = stored.get(name)
        if name not in targeted and want is not None and want != p.dtype and want.itemsize < p.dtype.itemsize:
            out[name] = want
    return out


def schedule(cfg: QatConfig) -> Callable[[int], float]:
    """Linear warmup to ``lr``, then cosine down to ``min_lr_ratio * lr``."""
    warm = max(1, int(cfg.warmup * cfg.steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        p = min(1.0, (step - warm) / max(1, cfg.steps - warm))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return factor


# -- loss ----------------------------------------------------------------------------------------
def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), in fp32. Logits ``[B, T, V]``."""
    lt = F.log_softmax(teacher_logits.float(), dim=-1)
    ls = F.log_softmax(student_logits.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, in fp32. ``logits [B, T, V]``, ``ids [B, T]``."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class TopkTeacher:
    """The teacher's top-k log-probs of every batch a run will use, computed before training, so that
    no teacher model stays in memory while the student trains (``--teacher-topk K``).

    KL over the teacher's top k tokens: ``sum_k p_t(k) (log p_t(k) - log p_s(k))`` with the teacher's
    full-vocabulary log-probs; with k = vocabulary size it is the full KL. Batches are found by their
    token ids."""

    def __init__(self, k: int):
        self.k = k
        self.store: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _key(ids: torch.Tensor) -> bytes:
        return hashlib.sha1(ids.detach().cpu().numpy().tobytes() + bytes(str(tuple(ids.shape)), "ascii")).digest()

    @torch.no_grad()
    def add(self, teacher: nn.Module, ids: torch.Tensor) -> None:
        logp = F.log_softmax(teacher(ids).logits.float(), dim=-1)  # [B, T, V]
        v, i = logp.topk(min(self.k, logp.shape[-1]), dim=-1)  # [B, T, k]
        self.store[self._key(ids)] = (v.cpu(), i.to(torch.int32).cpu())

    def kl(self, student_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        hit = self.store.get(self._key(ids))
        if hit is None:
            raise K2QuantError("internal: a batch reached the loss without cached teacher log-probs")
        lt, idx = (t.to(student_logits.device) for t in hit)
        ls = F.log_softmax(student_logits.float(), dim=-1).gather(-1, idx.long())
        return (lt.exp() * (lt - ls)).sum(-1).mean()


def teacher_kl(teacher, student_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(teacher, TopkTeacher):
        return teacher.kl(student_logits, ids)
    with torch.no_grad():
        t_logits = teacher(ids).logits
    return kl_to_teacher(student_logits, t_logits)


def losses(cfg: QatConfig, student: nn.Module, teacher, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The training loss and its parts (``kl``, ``ce``) for one batch ``[B, T]``; ``teacher`` a model or a
    ``TopkTeacher``."""
    logits = student(ids).logits
    kl, ce = teacher_kl(teacher, logits, ids), next_token_ce(logits, ids)
    total = {"kl": kl, "ce": ce, "ce+kl": ce + kl}[cfg.loss]
    return total, {"kl": kl.item(), "ce": ce.item()}


def eval_batches(seqs: torch.Tensor, batch_size: int, max_batches: int | None = None) -> Iterator[torch.Tensor]:
    """The held-out batches ``[b, T]`` that ``evaluate`` scores: the first ``max_batches`` (all when None)."""
    for b, i in enumerate(range(0, len(seqs), batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield seqs[i:i + batch_size]


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module, seqs: torch.Tensor, batch_size: int,
             max_batches: int | None = None) -> dict:
    """Held-out mean CE (and perplexity) of the student and its mean KL to the teacher."""
    was = student.training
    student.eval()
    kls, ces = [], []
    for ids in eval_batches(seqs, batch_size, max_batches):
        logits = student(ids).logits
        kls.append(float(teacher_kl(teacher, logits, ids)))
        ces.append(float(next_token_ce(logits, ids)))
    student.train(was)
    if not ces:
        return {}
    ce = sum(ces) / len(ces)
    return {"ce": ce, "ppl": math.exp(ce), "kl": sum(kls) / len(kls), "sequences": min(len(seqs), len(ces) * batch_size)}


# -- logging helpers -----------------------------------------------------------------------------
class ExpertCounter:
    """Tokens routed to each expert, per MoE layer, since the last ``take()``.

    Counts only inside the model's own forward: activation checkpointing reruns the decoder layers
    (and their routers) in backward, outside it, and must not count the tokens twice."""

    def __init__(self, model: nn.Module):
        self.counts: dict[str, torch.Tensor] = {}
        self.armed = False
        # transformers' fused experts of any family receive (hidden_states, top_k_index [T, k], top_k_weights)
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in model.named_modules()
                        if qat.wrap.is_fused_experts(m)]
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


def load_tokenizer(cfg: QatConfig):
    from transformers import AutoTokenizer

    where = cfg.tokenizer or cfg.src
    try:
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as exc:
        raise K2QuantError(f"{where}: no loadable tokenizer ({str(exc).splitlines()[0][:200]}); put the tokenizer "
                           f"files in the checkpoint directory or pass --tokenizer DIR") from None


def run(cfg: QatConfig, resume: str | Path | None = None, progress: Progress | None = None,
        accelerator=None) -> QatReport:
    """Train ``cfg.src`` with fake-quant targets for ``cfg.steps`` steps, save state, and export INT4.

    ``accelerator``: an ``accelerate.Accelerator`` (default: one built from the environment, as
    ``accelerate launch`` sets it up)."""
    from accelerate import Accelerator

    t0 = time.perf_counter()
    scheme = cfg.scheme()
    out = Path(cfg.out)
    saved, first = qat_io.read_run(resume) if resume is not None else (None, 0)  # first: the step to resume at
    if saved is not None:
        qat_io.check_resume(saved, cfg, resume)
    qat_io.prepare_out(out, resume is not None)
    audit = qat_io.check_int4_source(cfg, scheme)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    train_seqs, held = datasets(cfg, tokenizer)
    # devices, processes, sharding; dtypes are k2quant's own (fp32 masters, bf16 compute)
    accelerator = accelerator or Accelerator()
    if cfg.batch_size % accelerator.num_processes:
        raise K2QuantError(f"--batch-size {cfg.batch_size} does not split over {accelerator.num_processes} "
                           f"processes; use a multiple of {accelerator.num_processes}")
    teacher = _topk_teacher(cfg, accelerator, train_seqs, held, first) if cfg.teacher_topk > 0 else None
    student, model_teacher = build_models(cfg, scheme, with_teacher=teacher is None)  # wrappers before sharding
    student, model_teacher = qat_dist.distribute(accelerator, student, model_teacher)
    teacher = teacher if teacher is not None else model_teacher
    model = accelerator.unwrap_model(student)  # names without a DDP prefix; FSDP2 shards in place
    masters = Masters(model, stored_grid(cfg.src, model))
    opt = torch.optim.AdamW(masters.masters, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(cfg))
    step = qat_io.load_state(Path(resume), student, masters, opt, sched, accelerator) if resume is not None else 0
    counter = ExpertCounter(model)
    last_codes = _codes(model) if cfg.log_every else {}
    main = accelerator.is_main_process  # logs once, for all processes
    logf = open(cfg.json_log, "a" if resume is not None else "w") if cfg.json_log and main else None
    progress = progress if main else None
    try:
        while step < cfg.steps and (cfg.stop_after is None or step < cfg.stop_after):
            rec = train_step(cfg, accelerator, student, teacher, masters, opt, sched, train_seqs, step)
            step += 1
            if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps):
                codes = _codes(model)
                rec["flip_rate"] = qat_dist.flip_rate(accelerator, last_codes, codes)
                last_codes = codes
            rec["expert_tokens"] = counter.take(accelerator)
            if cfg.eval_every and step % cfg.eval_every == 0:
                rec["eval"] = evaluate(student, teacher, held, cfg.batch_size, cfg.eval_batches)
                counter.take()
            _emit(rec, logf, progress)
            if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0) or step == cfg.stop_after:
                model_sd = masters.stored(accelerator.get_state_dict(student))  # gathered when sharded
                qat_io.save_state(out / qat_io.STATE, cfg, step, model_sd, masters, opt, sched, tokenizer, accelerator)
    finally:
        if logf:
            logf.close()
        for h in counter.handles:
            h.remove()
    result = evaluate(student, teacher, held, cfg.batch_size, cfg.eval_batches) if step == cfg.steps else {}
    exported = step == cfg.steps and cfg.export and accelerator.is_main_process
    if exported:
        qat_io.export(out / qat_io.STATE, out, replace=True)
    return QatReport(str(out), step, round(time.perf_counter() - t0, 3), source.detect(Checkpoint(cfg.src)).name,
                     cfg.scale_rule, audit, result, exported)


def _codes(model: nn.Module) -> dict[str, torch.Tensor]:
    """The int8 codes of the targeted weights this process holds."""
    return {k: q for k, (q, _) in qat.codes(model).items()}


def _rank_batch(cfg: QatConfig, accelerator, seqs: torch.Tensor, step: int) -> torch.Tensor:
    ids = seqs[batch_indices(len(seqs), cfg.batch_size, step, cfg.seed)]  # [B, T], the global batch
    return ids[accelerator.process_index::accelerator.num_processes].to(accelerator.device)  # this rank's share


def _topk_teacher(cfg: QatConfig, accelerator, seqs: torch.Tensor, held: torch.Tensor, first: int) -> TopkTeacher:
    """Run the teacher once over this rank's share of steps ``first..steps`` and the evaluation batches,
    keep their top-k log-probs, and free the teacher."""
    teacher = qat_dist.distribute(accelerator, None, load_teacher(cfg))[1]
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
    norm = qat_dist.full_value(norm)
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
