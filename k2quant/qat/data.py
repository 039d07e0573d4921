"""QAT training data: text and jsonl files packed into fixed-length token sequences, and which of
them each step trains on (a pure function of the step, so a resumed run sees the same batches)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from k2quant.errors import FormatError, K2QuantError, collect
from k2quant.qat.config import QatConfig

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def _files(paths: list[str]) -> list[Path]:
    out, missing = [], []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            missing.append(f"{p}: data file not found; pass existing .txt/.md/.jsonl files or directories to --data")
    collect(missing, K2QuantError)
    if not out:
        raise K2QuantError(f"{', '.join(paths)}: no .txt, .md or .jsonl files found; pass text or jsonl data")
    return out


def _jsonl_texts(path: Path, tokenizer) -> list[str]:
    texts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{path}:{i}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            texts.append(row["text"])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            if not getattr(tokenizer, "chat_template", None):
                raise FormatError(f"{path}:{i}: chat `messages` need a chat template, but the tokenizer has none; "
                                  f"use a tokenizer with a chat template (--tokenizer) or `text` rows")
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        else:
            raise FormatError(f"{path}:{i}: expected a `text` string or a `messages` list, found keys "
                              f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
    return texts


def load_texts(paths: list[str], tokenizer) -> list[str]:
    """Documents from text files (one per file) and jsonl rows (``text`` or chat ``messages``)."""
    texts: list[str] = []
    for f in _files(paths):
        texts += _jsonl_texts(f, tokenizer) if f.suffix == ".jsonl" else [f.read_text(encoding="utf-8")]
    return texts


def pack(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Token ids ``[S, seq_len]``: documents + eos, concatenated and cut (the tail is dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)  # [S, seq_len]


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
