"""The QAT losses (KL to the teacher, next-token CE), the top-k cached teacher, and held-out evaluation."""
from __future__ import annotations

import hashlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from k2quant.errors import K2QuantError
from k2quant.qat.config import QatConfig


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
