"""Test helpers that read checkpoints with the safetensors library itself (not k2quant's reader)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import blake3
import torch
from safetensors.torch import load_file


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def index(path: Path) -> dict:
    return json.loads((Path(path) / "model.safetensors.index.json").read_text())


def ct_int4_compress(w: torch.Tensor, group_size: int = 32) -> dict[str, torch.Tensor]:
    """compressed-tensors 0.20's own scale computation and pack-quantized compressor (the oracle)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
    return PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                 QuantizationScheme(targets=["Linear"], weights=args))


def ct_int4_decompress(packed, scale, shape, group_size: int = 32) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    return PackedQuantizationCompressor.decompress(
        {"weight_packed": packed, "weight_scale": scale, "weight_shape": shape},
        QuantizationScheme(targets=["Linear"], weights=args))["weight"]


QAT_WORDS = ("the king doth wake tonight and all his court is merry with wine while "
             "cold winds blow over the castle walls where the guards keep watch").split()


def words_text(seed: int, n_words: int) -> str:
    """``n_words`` words drawn (seeded) from a small English vocabulary, one line."""
    rng = random.Random(seed)
    return " ".join(rng.choice(QAT_WORDS) for _ in range(n_words)) + "\n"


def qat_workdir(root: Path, parts: int) -> tuple[Path, Path]:
    """``(root, src)``: ``root/data`` holds ``parts`` text files, ``src`` a tiny bf16 K2 checkpoint with a
    1024-token tokenizer trained on the same vocabulary."""
    from k2quant.eval import data
    from k2quant.formats import tiny

    (root / "data").mkdir()
    for i in range(parts):
        (root / "data" / f"part{i}.txt").write_text(words_text(i, 900))
    src = tiny.build(root / "src", "bf16", seed=1)
    data.train_tokenizer([words_text(9, 3000)], 1024, src)
    return root, src


def b3(data: bytes) -> str:
    """A shard's digest computed directly: BLAKE3 of the whole file's bytes (what ``b3sum`` prints)."""
    return blake3.blake3(data).hexdigest()
