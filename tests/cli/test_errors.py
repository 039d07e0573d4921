"""Bad input: one clear message (file, tensor, expected, found, fix), exit code 2, nothing written."""
import errno
import json
import os
import shutil
import struct

import torch
from click.testing import CliRunner

from k2quant.cli import main
from k2quant.formats import shards, tiny

FIRST = "model-00001-of-00003.safetensors"


def cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, " ".join(res.output.split())  # unwrap for matching


def copy(tiny_dirs, fmt, tmp_path):
    dst = tmp_path / f"src-{fmt}"
    shutil.copytree(tiny_dirs[fmt], dst)
    return dst


def rewrite(path, fn):
    """Rewrite a shard's tensors through fn(dict) -> dict, keeping the index consistent."""
    from safetensors.torch import load_file, save_file

    sd = fn(load_file(str(path)))
    save_file(sd, str(path), metadata={"format": "pt"})
    idx_path = path.parent / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    idx["weight_map"] = {n: f for n, f in idx["weight_map"].items() if f != path.name} | {n: path.name for n in sd}
    idx_path.write_text(json.dumps(idx))


def assert_nothing_written(out):
    assert not out.exists() or not (out / "model.safetensors.index.json").exists()
    assert not out.exists() or not list(out.glob("*" + shards.TMP_SUFFIX))


def test_missing_scale(tiny_dirs, tmp_path):
    src = copy(tiny_dirs, "fp8", tmp_path)
    name = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
    f = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]
    rewrite(src / f, lambda sd: {k: v for k, v in sd.items() if k != name})
    code, msg = cli("convert", src, tmp_path / "o", "--to", "bf16")
    assert code == 2
    assert ("FP8 weight 'model.layers.0.self_attn.q_a_proj.weight' has no scale "
            "'model.layers.0.self_attn.q_a_proj.weight_scale_inv' in any shard; every FP8 weight needs its scale "
            "(expected F32[2, 3]); restore the missing tensor") in msg
    assert_nothing_written(tmp_path / "o")


def test_scale_of_wrong_shape(tiny_dirs, tmp_path):
    src = copy(tiny_dirs, "fp8", tmp_path)
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    f = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]
    rewrite(src / f, lambda sd: sd | {name: torch.ones(2, 2)})
    code, msg = cli("convert", src, tmp_path / "o", "--to", "bf16")
    assert code == 2
    assert (f"{f}: scale 'model.layers.0.self_attn.o_proj.weight_scale_inv' is F32[2, 2] but weight [320, 128] "
            f"with block [128, 128] needs F32[3, 1]") in msg


def test_unknown_dtype(tiny_dirs, tmp_path):
    src = copy(tiny_dirs, "bf16", tmp_path)
    path = src / FIRST
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].replace(b'"dtype":"BF16"', b'"dtype":"F4E2"', 1)
    path.write_bytes(raw[:8] + header + raw[8 + n:])
    code, msg = cli("inspect", src)
    assert code == 2
    assert "has dtype 'F4E2', which k2quant does not handle; expected one of" in msg
    assert "convert that tensor to a supported dtype first" in msg and FIRST in msg


def test_dims_not_divisible_by_group_size(tiny_dirs, tmp_path):
    code, msg = cli("convert", tiny_dirs["bf16"], tmp_path / "o", "--to", "int4", "--targets", "re:.*experts.*",
                    "--group-size", "64")
    assert code == 2
    assert ("model.layers.1.mlp.experts.0.down_proj.weight has input dim 96, not divisible by group size 64; pick "
            "a --group-size that divides it or exclude it with --ignore model.layers.1.mlp.experts.0.down_proj") in msg
    assert "16 problems found" in msg
    assert_nothing_written(tmp_path / "o")


def test_output_is_source_or_inside_it(tiny_dirs, tmp_path):
    src = copy(tiny_dirs, "bf16", tmp_path)
    for out in (src, src / "sub"):
        code, msg = cli("convert", src, out, "--to", "fp8")
        assert code == 2
        assert "the output directory is the source directory or inside it; the source must never be modified" in msg
    assert not (src / "sub").exists()


def test_non_empty_output_needs_force(tiny_dirs, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, msg = cli("convert", tiny_dirs["bf16"], out, "--to", "fp8")
    assert code == 2
    assert f"{out}: output directory is not empty (1 entries); choose an empty directory or pass --force" in msg
    code, _ = cli("convert", tiny_dirs["bf16"], out, "--to", "fp8", "--force")
    assert code == 0 and (out / "model.safetensors.index.json").exists() and (out / "keep.txt").exists()


def test_truncated_shard(tiny_dirs, tmp_path):
    src = copy(tiny_dirs, "bf16", tmp_path)
    path = src / FIRST
    path.write_bytes(path.read_bytes()[:-1000])
    code, msg = cli("convert", src, tmp_path / "o", "--to", "fp8")
    assert code == 2
    assert f"{path}: tensor" in msg and "(truncated file or corrupt header); re-download or re-copy this file" in msg
    assert_nothing_written(tmp_path / "o")


def test_corrupt_header(tiny_dirs, tmp_path):
    src = copy(tiny_dirs, "bf16", tmp_path)
    path = src / FIRST
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"\xff\xfe{]"
    path.write_bytes(bytes(raw))
    code, msg = cli("inspect", src)
    assert code == 2 and f"{path}: corrupt safetensors header (not valid JSON" in msg


def test_header_length_beyond_file(tiny_dirs, tmp_path):
    src = copy(tiny_dirs, "bf16", tmp_path)
    path = src / FIRST
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    code, msg = cli("inspect", src)
    assert code == 2 and "corrupt or truncated safetensors header: header length" in msg


def test_index_names_missing_file_and_tensor(tiny_dirs, tmp_path):
    src = copy(tiny_dirs, "bf16", tmp_path)
    idx_path = src / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    idx["weight_map"]["model.layers.9.ghost.weight"] = FIRST
    idx_path.write_text(json.dumps(idx))
    code, msg = cli("inspect", src)
    assert code == 2
    assert f"names tensor 'model.layers.9.ghost.weight' in {FIRST}, but no shard holds it" in msg
    idx["weight_map"]["model.layers.9.ghost.weight"] = "model-00009-of-00009.safetensors"
    idx_path.write_text(json.dumps(idx))
    code, msg = cli("inspect", src)
    assert code == 2 and "names shard file(s) ['model-00009-of-00009.safetensors'] that do not exist" in msg


def test_tensor_in_two_shards(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    src = copy(tiny_dirs, "bf16", tmp_path)
    sd = load_file(str(src / "model-00003-of-00003.safetensors"))
    sd["model.embed_tokens.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    save_file(sd, str(src / "model-00003-of-00003.safetensors"))
    code, msg = cli("inspect", src)
    assert code == 2
    assert "tensor 'model.embed_tokens.weight' is in two shards: model-00001-of-00003.safetensors and " \
           "model-00003-of-00003.safetensors; remove the stale copy" in msg


def test_nan_in_weight_to_quantize(tiny_dirs, tmp_path):
    src = copy(tiny_dirs, "bf16", tmp_path)
    name = "model.layers.2.mlp.experts.3.up_proj.weight"
    f = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]

    def poison(sd):
        sd[name] = sd[name].clone()
        sd[name][0, 0] = float("nan")
        sd[name][1, 1] = float("inf")
        return sd

    rewrite(src / f, poison)
    code, msg = cli("convert", src, tmp_path / "o", "--to", "int4")
    assert code == 2
    assert f"weight {name} holds 2 NaN/Inf values and cannot be quantized; fix the source weights or keep this " \
           f"module unquantized with --ignore model.layers.2.mlp.experts.3.up_proj" in msg
    assert_nothing_written(tmp_path / "o")


def test_config_says_fp8_but_tensors_are_bf16_and_reverse(tiny_dirs, tmp_path):
    src = copy(tiny_dirs, "bf16", tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"quantization_config": tiny.config_for("fp8")["quantization_config"]}))
    code, msg = cli("convert", src, tmp_path / "o", "--to", "int4")
    assert code == 2
    assert "quantization_config says FP8 but no weight is F8_E4M3" in msg
    assert "if the weights are BF16, delete quantization_config from config.json" in msg
    src8 = copy(tiny_dirs, "fp8", tmp_path)
    cfg = json.loads((src8 / "config.json").read_text())
    del cfg["quantization_config"]
    (src8 / "config.json").write_text(json.dumps(cfg))
    code, msg = cli("convert", src8, tmp_path / "o2", "--to", "int4")
    assert code == 2
    assert "says BF16 but 72 weights are F8_E4M3" in msg and '"quant_method": "fp8"' in msg


def test_pickle_checkpoint_refused(tmp_path):
    src = tmp_path / "pt"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04")
    code, msg = cli("convert", src, tmp_path / "o", "--to", "int4")
    assert code == 2
    assert "holds pickle checkpoint files (pytorch_model.bin); k2quant reads only safetensors" in msg
    assert "save_pretrained(dir, safe_serialization=True)" in msg


def test_read_only_output(tiny_dirs, tmp_path, monkeypatch):
    real = os.open

    def deny(path, flags, *a, **kw):
        if str(path).startswith(str(tmp_path / "ro")) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real(path, flags, *a, **kw)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "open", deny)
    code, msg = cli("convert", tiny_dirs["bf16"], tmp_path / "ro", "--to", "fp8")
    assert code == 2
    assert f"{tmp_path / 'ro'}: cannot write to the output directory (Read-only file system); choose a writable " \
           f"directory" in msg


def test_not_enough_disk_checked_before_start(tiny_dirs, tmp_path, monkeypatch):
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    code, msg = cli("convert", tiny_dirs["fp8"], tmp_path / "o", "--to", "bf16")
    assert code == 2
    assert "not enough free disk: the output needs 0.01 GB but 0.00 GB are free; free space or choose another disk" in msg
    assert not list((tmp_path / "o").glob("*.safetensors"))


def test_disk_full_during_run_leaves_no_temp_and_no_index(tiny_dirs, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = shards.ShardWriter.write

    def write(self, name, t):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, t)

    monkeypatch.setattr(shards.ShardWriter, "write", write)
    code, msg = cli("convert", tiny_dirs["bf16"], tmp_path / "o", "--to", "int4", "--max-shard-size", "1MB")
    assert code == 2
    assert "disk full while writing model-0000" in msg and "the partial file was removed and no index was written" in msg
    assert_nothing_written(tmp_path / "o")
    assert not (tmp_path / "o" / "config.json").exists()
