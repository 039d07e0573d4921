"""The QAT loss pieces against plain autograd formulations: the chunked log-partition and its gradient,
and the top-k KL with its tail bucket (a true divergence, a lower bound of the full KL, the full KL at k = V)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from k2quant.qat import losses


def _logits(n=300, v=97, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * 3).to(dtype)


def test_logz_gather_equals_log_softmax_and_its_gradient():
    """n > LOGZ_ROWS, so the row chunks and their seams are exercised."""
    x = _logits(n=losses.LOGZ_ROWS + 44)
    idx = torch.randint(0, x.shape[1], (x.shape[0], 5), generator=torch.Generator().manual_seed(1))
    w_lse, w_pick = torch.randn(x.shape[0]), torch.randn(x.shape[0], 5)
    a = x.clone().requires_grad_(True)
    lse, picked = losses.logz_gather(a, idx)
    ((lse * w_lse).sum() + (picked * w_pick).sum()).backward()
    b = x.clone().double().requires_grad_(True)
    ref_lse = torch.logsumexp(b, -1)
    ((ref_lse * w_lse.double()).sum() + (b.gather(1, idx) * w_pick.double()).sum()).backward()
    torch.testing.assert_close(lse.double(), ref_lse.detach(), rtol=1e-6, atol=1e-5)
    assert torch.equal(picked, x.gather(1, idx))
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-6)


def test_logz_gather_keeps_the_logits_dtype_in_backward():
    x = _logits(dtype=torch.bfloat16).requires_grad_(True)
    lse, _ = losses.logz_gather(x, torch.zeros(x.shape[0], 1, dtype=torch.long))
    lse.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    # d lse / d x = softmax(x): rows sum to 1 (up to bf16 rounding of each entry)
    torch.testing.assert_close(x.grad.float().sum(-1), torch.ones(x.shape[0]), rtol=0, atol=2e-2)


def _full_kl(t, s):
    lt, ls = F.log_softmax(t.double(), -1), F.log_softmax(s.double(), -1)
    return (lt.exp() * (lt - ls)).sum(-1)


def test_topk_kl_is_a_lower_bound_and_the_full_kl_at_k_equal_vocabulary():
    t, s = _logits(seed=2), _logits(seed=3)
    v = t.shape[1]
    full = _full_kl(t, s)
    lt_all, ls_all = F.log_softmax(t, -1), F.log_softmax(s, -1)
    prev = torch.zeros(t.shape[0], dtype=torch.float64)
    for k in (1, 4, 16, 64, v):
        idx = lt_all.topk(k, -1).indices
        kl = losses.topk_kl(lt_all.gather(1, idx), ls_all.gather(1, idx), v).double()
        assert bool((kl >= -1e-6).all()) and bool((kl <= full + 1e-4).all()), k
        assert bool((kl >= prev - 1e-4).all()), k  # a finer coarsening never loses divergence
        prev = kl
    torch.testing.assert_close(prev, full, rtol=1e-4, atol=1e-6)
    # equal distributions: zero for every k
    idx = lt_all.topk(8, -1).indices
    same = losses.topk_kl(lt_all.gather(1, idx), lt_all.gather(1, idx), v)
    assert float(same.abs().max()) < 1e-6


def test_topk_kl_is_positive_where_the_head_terms_alone_go_negative():
    """A student more confident than the teacher on its top tokens: the head terms alone (the top-k loss without
    the tail bucket) are negative and would reward it; the bucketed KL is positive, and at most the full KL."""
    t = torch.tensor([[4.0, 3.0, 0.0, 0.0, 0.0]])
    s = t.clone()
    s[0, :2] += 2.0  # the student takes mass from the other 3 tokens into the top 2
    lt, ls = F.log_softmax(t, -1), F.log_softmax(s, -1)
    idx = torch.tensor([[0, 1]])
    head_only = (lt.gather(1, idx).exp() * (lt.gather(1, idx) - ls.gather(1, idx))).sum(-1)
    kl = losses.topk_kl(lt.gather(1, idx), ls.gather(1, idx), 5)
    assert float(head_only) < 0 < float(kl) <= float(_full_kl(t, s)) + 1e-6
