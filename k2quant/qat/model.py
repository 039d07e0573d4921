"""The models of a QAT run: the teacher (the source as loaded, frozen) and the student (a copy with
fake-quant wrappers on the targeted weights, which are fp32 masters).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from k2quant.errors import K2QuantError
from k2quant.formats import load
from k2quant.qat import weights, wrap
from k2quant.qat.config import QatConfig
from k2quant.quant import int4_group
from k2quant.quant.scheme import QuantScheme


def load_teacher(cfg: QatConfig) -> nn.Module:
    """The model distilled from (``--teacher``, default the source) as loaded: frozen, bf16."""
    teacher = load.load_model(cfg.teacher or cfg.src, dtype=torch.bfloat16)
    teacher.requires_grad_(False)
    return teacher


def check_teacher(cfg: QatConfig) -> None:
    """``--teacher`` must predict over the source's vocabulary (its KL is taken token by token)."""
    if not cfg.teacher:
        return
    vocab = {p: load.hf_config(p).vocab_size for p in (cfg.src, cfg.teacher)}
    if vocab[cfg.src] != vocab[cfg.teacher]:
        raise K2QuantError(f"--teacher {cfg.teacher}: its vocabulary has {vocab[cfg.teacher]} tokens, the source "
                           f"{cfg.src} has {vocab[cfg.src]}; the KL needs the same tokenizer: pass a teacher of the "
                           f"same model family (typically the BF16 checkpoint the source was quantized from)")


def build_models(cfg: QatConfig, scheme: QuantScheme, with_teacher: bool = True,
                 stored: dict[str, torch.dtype] | None = None) -> tuple[nn.Module, nn.Module | None]:
    """``(student, teacher)``: the source as loaded (teacher, frozen bf16) and a prepared copy
    (``teacher`` None when ``with_teacher`` is False: the student alone, loaded once). ``stored``:
    ``load.stored_dtypes`` of the source, when the caller has it already."""
    if cfg.teacher:  # another checkpoint: the student is the source, loaded on its own
        check_teacher(cfg)
        student = load.load_model(cfg.src, dtype=torch.bfloat16)
        teacher = load_teacher(cfg) if with_teacher else None
    else:
        teacher = load_teacher(cfg)
        student = copy.deepcopy(teacher) if with_teacher else teacher
        teacher = teacher if with_teacher else None
    holders = wrap.prepare(student, scheme)
    if not holders:
        raise K2QuantError(f"{cfg.src}: no weight matches the targets {list(scheme.targets)} minus ignore "
                           f"{list(scheme.ignore)}; nothing would be fake-quantized: check --targets/--ignore")
    _check_export_names(cfg.src, student, load.stored_dtypes(cfg.src) if stored is None else stored)
    for h in holders:  # targeted holders keep fp32 masters; the forward casts through fake quant
        module = student.get_submodule(h.name)
        for p in (wrap.EXPERT_PROJ if h.experts else ("weight",)):
            setattr(module, p, nn.Parameter(getattr(module, p).detach().float()))
    if cfg.teacher and scheme.scale_rule == "kimi" and _is_int4(cfg.src):
        start_in_bins(student, teacher if teacher is not None else load_teacher(cfg), scheme)
    wrap.set_enabled(student, cfg.fake_quant)
    trained = {id(p) for _, p in targeted_params(student)} if cfg.train in ("targets", "experts") else None
    for p in student.parameters():
        p.requires_grad_(trained is None or id(p) in trained)
    if cfg.grad_checkpointing:
        student.config.use_cache = False
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    return student, teacher


def _is_int4(path: str) -> bool:
    from k2quant.formats import source
    from k2quant.formats.checkpoint import Checkpoint

    return source.detect(Checkpoint(path)).name == "int4"


def in_bins(start: torch.Tensor, target: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Latent weights for a start ``[..., N, K]`` that lies on the kimi INT4 grid: ``target`` (the teacher's
    weights) moved into the bin of the start's code, so fake quant still gives exactly the start.

    A start read from an INT4 checkpoint sits on grid points, half a step from every rounding boundary: small
    updates never change a code, and QAT from it would barely move. In its bin, each weight keeps the start's
    code and scale at step 0 but sits where the unquantized model has it, so updates can move it across the
    boundary it is near. Each group's largest start element stays as it is (it sets the scale: amax / 7 must
    give the same bf16 scale); the others stay within ``[-7s, 7s]`` and a hair inside their bin edges. Groups
    whose fake quant would still differ keep the start (none in practice; the caller checks the result)."""
    q, scale = int4_group.quantize_weight(start, scheme)
    g = scheme.group_size
    s = scale.float().repeat_interleave(g, dim=-1)
    qf = q.float()
    groups = start.float().reshape(*start.shape[:-1], -1, g)
    amax = groups.abs().amax(-1, keepdim=True).expand_as(groups).reshape(start.shape)  # no latent goes beyond
    eps = s * 1e-3  # inside the bin: rint's half-even ties are never reached
    lo = torch.where(qf <= -7, -amax, (qf - 0.5) * s + eps)
    hi = torch.where(qf >= 7, amax, (qf + 0.5) * s - eps)
    out = torch.minimum(torch.maximum(target.float(), lo), hi)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().argmax(-1, keepdim=True), True)
    out = torch.where(keep.reshape(start.shape), start.float(), out)
    same = int4_group.fake_quantize(out, scheme, torch.bfloat16) == int4_group.fake_quantize(start.float(), scheme,
                                                                                              torch.bfloat16)
    ok = same.reshape(groups.shape).all(-1, keepdim=True).expand_as(groups).reshape(start.shape)
    return torch.where(ok, out, start.float())


@torch.no_grad()
def start_in_bins(student: nn.Module, teacher: nn.Module, scheme: QuantScheme) -> None:
    """``in_bins`` for every targeted weight of a student loaded from INT4, with the teacher's same-named weights."""
    t_params = dict(teacher.named_parameters())
    for name, p in targeted_params(student):
        t = t_params.get(name)
        if t is None or t.shape != p.shape:
            raise K2QuantError(f"--teacher: has no weight {name!r} of shape {list(p.shape)} to start the student's "
                               f"latent weights from; use the BF16 checkpoint the INT4 source was made from")
        p.copy_(in_bins(p.detach(), t.detach(), scheme))


def _check_export_names(src: str, model: nn.Module, stored: dict[str, torch.dtype]) -> None:
    """The export writes each targeted weight under its module name (fused experts split as
    ``<experts>.<e>.{gate,up,down}_proj``): refuse a family whose checkpoint stores them otherwise (Mixtral's
    ``block_sparse_moe.experts.<e>.w1``), before training, rather than export names no loader reads."""
    odd = [name for name, _, _ in weights.targeted(model) if name + ".weight" not in stored]
    if odd:
        raise K2QuantError(f"{src}: qat would export {odd[0]!r} (and {len(odd) - 1} more), but the checkpoint stores "
                           f"no such tensor: {type(model).__name__} names its weights on disk otherwise, which qat "
                           f"export does not map back yet; narrow --targets to modules stored under their own names "
                           f"(e.g. --targets Linear --ignore lm_head --ignore 're:.*experts.*')")


def targeted_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    out = []
    for h in wrap.holders(model):
        module = model.get_submodule(h.name)
        out += [(f"{h.name}.{p}", getattr(module, p)) for p in (wrap.EXPERT_PROJ if h.experts else ("weight",))]
    return out


def stored_grid(stored: dict[str, torch.dtype], model: nn.Module) -> dict[str, torch.dtype]:
    """``{parameter: stored dtype}`` for the non-targeted parameters that the model holds in a wider dtype
    than the checkpoint stores them (``stored``: ``load.stored_dtypes`` of the source; transformers 5.24+ keeps
    DeepSeek-V3's BF16 router in fp32)."""
    targeted = {n for n, _ in targeted_params(model)}
    out = {}
    for name, p in model.named_parameters():
        want = stored.get(name)
        if name not in targeted and want is not None and want != p.dtype and want.itemsize < p.dtype.itemsize:
            out[name] = want
    return out
