"""QAT training data: text and jsonl files packed into fixed-length token sequences, and which of
them each step trains on (a pure function of the step, so a resumed run sees the same batches)."""
from __future__ import annotations

import torch

from k2quant.errors import K2QuantError
from k2quant.formats.texts import load_texts, pack  # noqa: F401 - the data readers live in formats
from k2quant.qat.config import QatConfig


def datasets(cfg: QatConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held-out)`` packed sequences: ``--eval-data``, else the last ``eval_fraction`` of the stream."""
    seqs = pack(load_texts(cfg.data, tokenizer), tokenizer, cfg.seq_len)
    if cfg.eval_data:
        held = pack(load_texts(cfg.eval_data, tokenizer), tokenizer, cfg.seq_len)
    else:
        n_eval = max(1, round(len(seqs) * cfg.eval_fraction)) if cfg.eval_fraction > 0 else 0
        seqs, held = seqs[: len(seqs) - n_eval], seqs[len(seqs) - n_eval:]
    if len(seqs) < 1:
        raise K2QuantError(f"{', '.join(cfg.data)}: too little text for one training sequence of --seq-len "
                           f"{cfg.seq_len} tokens after holding out evaluation data; add data or lower --seq-len")
    return seqs, held


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The sequences of 0-based ``step``: a fixed permutation per epoch, so the position is just the step."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    out = torch.empty_like(pos)
    for epoch in pos.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        sel = pos.div(n, rounding_mode="floor") == epoch
        out[sel] = perm[pos[sel] % n]
    return out
