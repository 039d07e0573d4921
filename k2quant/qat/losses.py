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


#: rows of logits turned into fp32 at a time by ``logz_gather`` (bounds the fp32 copy: 256 x V)
LOGZ_ROWS = 256


class _LogZGather(torch.autograd.Function):
    """``(logsumexp(x), x.gather(idx))`` of logits ``x [N, V]`` in fp32, ``LOGZ_ROWS`` rows at a time.

    The backward writes ``softmax(x) * g_lse + scatter(g_picked)`` straight into the logits' dtype, so
    neither pass keeps a full-vocabulary fp32 tensor (a full ``log_softmax`` keeps one of ``N x V``)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, idx: torch.Tensor):  # type: ignore[override]
        n, v = logits.shape
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        picked = torch.empty(idx.shape, dtype=torch.float32, device=logits.device)
        buf = torch.empty(min(n, LOGZ_ROWS), v, dtype=torch.float32, device=logits.device)  # reused: no page faults
        for r in range(0, n, LOGZ_ROWS):
            x = buf[:min(LOGZ_ROWS, n - r)]
            x.copy_(logits[r:r + LOGZ_ROWS])
            torch.logsumexp(x, dim=-1, out=lse[r:r + LOGZ_ROWS])
            torch.gather(x, 1, idx[r:r + LOGZ_ROWS], out=picked[r:r + LOGZ_ROWS])
        ctx.save_for_backward(logits, idx, lse)
        return lse, picked

    @staticmethod
    def backward(ctx, g_lse: torch.Tensor | None, g_picked: torch.Tensor | None):  # type: ignore[override]
        logits, idx, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        n = logits.shape[0]
        buf = torch.empty(min(n, LOGZ_ROWS), logits.shape[1], dtype=torch.float32, device=logits.device)
        for r in range(0, n, LOGZ_ROWS):
            rows = slice(r, r + LOGZ_ROWS)
            g = buf[:min(LOGZ_ROWS, n - r)]
            if g_lse is None:
                g.zero_()
            else:
                g.copy_(logits[rows]).sub_(lse[rows, None]).exp_().mul_(g_lse[rows, None])
            if g_picked is not None:
                g.scatter_add_(1, idx[rows], g_picked[rows])
            grad[rows] = g
        return grad, None


def logz_gather(logits: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse [N], picked [N, m])``: fp32 log-partition of each row of ``logits [N, V]`` and its logits at
    ``idx [N, m]`` (so ``picked - lse`` are log-probs), without a full fp32 log-softmax."""
    return _LogZGather.apply(logits, idx.long())


def topk_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor, vocab: int) -> torch.Tensor:
    """Per-token KL(teacher || student) over the teacher's top-k tokens plus the rest as one bucket.

    ``teacher_logp``/``student_logp`` ``[N, k]``: both models' log-probs of the teacher's top k tokens.
    The ``k + 1`` buckets (k tokens, "any other token") are a coarsening of the vocabulary, so this is a
    true divergence (>= 0, zero when they agree) and a lower bound of the full KL; with k = ``vocab``
    it is the full KL."""
    pt = teacher_logp.exp()
    kl = (pt * (teacher_logp - student_logp)).sum(-1)
    if teacher_logp.shape[-1] >= vocab:
        return kl
    tail_t = (1 - pt.sum(-1)).clamp_min(0)
    tail_s = (1 - student_logp.exp().sum(-1)).clamp_min(1e-9)
    return kl + torch.where(tail_t > 0, tail_t * (tail_t.clamp_min(1e-30).log() - tail_s.log()), 0.0)


class TopkTeacher:
    """The teacher's top-k log-probs of every batch a run will use, computed before training, so that
    no teacher model stays in memory while the student trains (``--teacher-topk K``).

    The loss is ``topk_kl``: KL over the teacher's top k tokens and one bucket for all others, with the
    student's log-probs from ``logz_gather`` (one fp32 log-partition, no full log-softmax). With k the
    vocabulary size it is the full KL. Batches are found by their token ids."""

    def __init__(self, k: int):
        self.k = k
        self.store: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _key(ids: torch.Tensor) -> bytes:
        return hashlib.sha1(ids.detach().cpu().numpy().tobytes() + bytes(str(tuple(ids.shape)), "ascii")).digest()

    @torch.no_grad()
    def add(self, teacher: nn.Module, ids: torch.Tensor) -> None:
        logits = teacher(ids, use_cache=False).logits  # [B, T, V]; no KV cache to build
        lse, _ = logz_gather(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1, 1))
        v, i = logits.topk(min(self.k, logits.shape[-1]), dim=-1)  # [B, T, k]: the top logits are the top log-probs
        logp = v.float() - lse.reshape(*ids.shape, 1)
        self.store[self._key(ids)] = (logp.cpu(), i.to(torch.int32).cpu())

    def get(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self.store.get(self._key(ids))
        if hit is None:
            raise K2QuantError("internal: a batch reached the loss without cached teacher log-probs")
        return hit


def _student_terms(teacher, logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kl, ce)`` of student ``logits [B, T, V]``: mean per-token KL to the teacher and next-token CE."""
    b, t, v = logits.shape
    flat = logits.reshape(b * t, v)
    nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1).reshape(-1, 1)  # next token (the last column is unused)
    if isinstance(teacher, TopkTeacher):
        lt, idx = (x.to(logits.device) for x in teacher.get(ids))
        k = lt.shape[-1]
        lse, picked = logz_gather(flat, torch.cat([idx.reshape(b * t, k).long(), nxt], dim=1))
        kl = topk_kl(lt.reshape(b * t, k), picked[:, :k] - lse[:, None], v).mean()
        ce_tok = (lse - picked[:, k]).reshape(b, t)
    else:
        with torch.no_grad():
            t_logits = teacher(ids, use_cache=False).logits
        kl = kl_to_teacher(logits, t_logits)
        lse, picked = logz_gather(flat, nxt)
        ce_tok = (lse - picked[:, 0]).reshape(b, t)
    return kl, ce_tok[:, :-1].mean()


def losses(cfg: QatConfig, student: nn.Module, teacher, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The training loss and its parts (``kl``, ``ce``) for one batch ``[B, T]``; ``teacher`` a model or a
    ``TopkTeacher``."""
    kl, ce = _student_terms(teacher, student(ids, use_cache=False).logits, ids)
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
        kl, ce = _student_terms(teacher, student(ids, use_cache=False).logits, ids)
        kls.append(float(kl))
        ces.append(float(ce))
    student.train(was)
    if not ces:
        return {}
    ce = sum(ces) / len(ces)
    return {"ce": ce, "ppl": math.exp(ce), "kl": sum(kls) / len(kls), "sequences": min(len(seqs), len(ces) * batch_size)}
