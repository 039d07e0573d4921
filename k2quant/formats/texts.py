"""Text for training and calibration: text and jsonl files, and token sequences packed from them.

Shared by ``qat`` (training data) and ``formats.calibrate`` (GPTQ calibration data). ``flag`` names the
command-line option the paths came from, so messages point at it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from k2quant.errors import FormatError, K2QuantError, collect

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def _files(paths: list[str], flag: str = "--data") -> list[Path]:
    out, missing = [], []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            missing.append(f"{p}: data file not found; pass existing .txt/.md/.jsonl files or directories to {flag}")
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


def load_texts(paths: list[str], tokenizer, flag: str = "--data") -> list[str]:
    """Documents from text files (one per file) and jsonl rows (``text`` or chat ``messages``)."""
    texts: list[str] = []
    for f in _files(paths, flag):
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
