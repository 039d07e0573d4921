"""Direct measures from full next-token distributions, as ``llama-perplexity --kl-divergence`` reports.

Two passes, like llama.cpp: the baseline's log-probabilities over fixed token windows are kept
(float32, ``[T, V]`` per window), then each candidate is run on the very same windows and compared
position by position: KL(baseline || candidate), same top-1, perplexity ratio, delta-p of the true token.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Iterator

import torch

from k2quant.errors import K2QuantError


@dataclasses.dataclass(frozen=True)
class DirectMeasures:
    """Per-position statistics of a candidate against the baseline over ``tokens`` scored positions."""

    tokens: int
    kl_mean: float
    kl_se: float
    kl_p99: float
    kl_max: float
    top1_pct: float
    top1_se_pct: float
    ppl_base: float
    ppl_cand: float
    ppl_ratio: float
    ln_ppl_ratio: float
    dp_mean: float
    dp_rms: float

    def to_json(self) -> dict:
        return {k: (v if math.isfinite(v) else str(v)) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class Reference:
    """The baseline's log-probabilities ``[T, V]`` (float32) and next tokens ``[T]`` per window."""

    logprobs: list[torch.Tensor]
    targets: list[torch.Tensor]


def token_windows(tokenizer, texts: Iterable[str], window: int, max_tokens: int) -> list[torch.Tensor]:
    """Equal ``[window]`` id windows cut from the texts' concatenation (EOS between texts, BOS first).

    Each window scores ``window - 1`` positions; just enough windows to score ``max_tokens``.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [bos] if bos is not None else []
    body = window - len(head)
    need = -(-max_tokens // (window - 1)) * body + 1
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(stream) >= need:
            break
    if len(stream) < body:
        raise K2QuantError(f"measure text holds {len(stream)} tokens, fewer than one window of {body}; "
                           f"pass more text or a smaller --max-length")
    n = min(len(stream) // body, -(-max_tokens // (window - 1)))
    return [torch.tensor(head + stream[i * body:(i + 1) * body], dtype=torch.long) for i in range(n)]


@torch.no_grad()
def window_logprobs(model: torch.nn.Module, windows: list[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """float32 log-softmax ``[W-1, V]`` for each window, batched identically for every model."""
    for i in range(0, len(windows), batch_size):
        ids = torch.stack(windows[i:i + batch_size])  # [B, W]
        logits = model(input_ids=ids.to(model.device), use_cache=False).logits  # [B, W, V]
        yield from torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()


def reference(model: torch.nn.Module, windows: list[torch.Tensor], batch_size: int) -> Reference:
    lp = list(window_logprobs(model, windows, batch_size))
    return Reference(lp, [w[1:] for w in windows])


def compare(ref: Reference, model: torch.nn.Module, windows: list[torch.Tensor], batch_size: int) -> DirectMeasures:
    """The candidate ``model`` against the stored baseline on the same windows."""
    kl, same, nll_b, nll_q, dp = [], [], [], [], []
    for lb, lq, y in zip(ref.logprobs, window_logprobs(model, windows, batch_size), ref.targets):
        kl.append((lb.exp() * (lb - lq)).sum(-1))  # [T]: sum_v p_b (log p_b - log p_q)
        same.append(lb.argmax(-1) == lq.argmax(-1))
        yb, yq = lb.gather(-1, y[:, None])[:, 0], lq.gather(-1, y[:, None])[:, 0]
        nll_b.append(-yb)
        nll_q.append(-yq)
        dp.append(yq.exp() - yb.exp())
    return summarize(torch.cat(kl), torch.cat(same), torch.cat(nll_b), torch.cat(nll_q), torch.cat(dp))


def summarize(kl: torch.Tensor, same: torch.Tensor, nll_b: torch.Tensor, nll_q: torch.Tensor,
              dp: torch.Tensor) -> DirectMeasures:
    """Aggregate per-position values (float64) into the reported statistics."""
    kl, nll_b, nll_q, dp = (t.double() for t in (kl, nll_b, nll_q, dp))
    n = kl.numel()
    top1 = same.double().mean().item()
    ln_ratio = (nll_q.mean() - nll_b.mean()).item()
    return DirectMeasures(
        tokens=n, kl_mean=kl.mean().item(), kl_se=(kl.std() / math.sqrt(n)).item() if n > 1 else 0.0,
        kl_p99=torch.quantile(kl, 0.99).item(), kl_max=kl.max().item(),
        top1_pct=100 * top1, top1_se_pct=100 * math.sqrt(top1 * (1 - top1) / n),
        ppl_base=math.exp(nll_b.mean().item()), ppl_cand=math.exp(nll_q.mean().item()),
        ppl_ratio=math.exp(ln_ratio), ln_ppl_ratio=ln_ratio,
        dp_mean=dp.mean().item(), dp_rms=dp.square().mean().sqrt().item())
