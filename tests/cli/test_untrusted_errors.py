"""Issue 12's list of tracebacks and silently accepted input: each is now one clear K2QuantError naming the
file (exit 2, nothing written), or, where the input is valid, a correct result."""
import json
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from k2quant.cli import main
from k2quant.qat import config as qat_config
from k2quant.qat import train as qat_train

INDEX, FIRST = "model.safetensors.index.json", "model-00001-of-00003.safetensors"


def cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)  # no traceback
    return res.exit_code, " ".join(res.output.split())


def copy(tiny_dirs, tmp_path, fmt="bf16"):
    dst = tmp_path / "src"
    shutil.copytree(tiny_dirs[fmt], dst)
    return dst


def refused(src, tmp_path, *want, args=("--to", "int4")):
    out = tmp_path / "o"
    code, msg = cli("convert", src, out, *args)
    assert code == 2, msg
    for w in want:
        assert w in msg, msg
    assert not out.exists() or not any(out.iterdir())  # nothing written
    return msg


def test_zero_dim_tensor_converts(tiny_dirs, tmp_path):
    src = copy(tiny_dirs, tmp_path)
    f = src / FIRST
    sd = load_file(str(f)) | {"model.layers.1.mlp.scalar": torch.tensor(2.5, dtype=torch.float32)}
    save_file(sd, str(f), metadata={"format": "pt"})
    idx = json.loads((src / INDEX).read_text())
    idx["weight_map"]["model.layers.1.mlp.scalar"] = FIRST
    (src / INDEX).write_text(json.dumps(idx))
    code, msg = cli("convert", src, tmp_path / "o", "--to", "int4")
    assert code == 0, msg
    out = {}
    for p in (tmp_path / "o").glob("*.safetensors"):
        out |= load_file(str(p))
    assert out["model.layers.1.mlp.scalar"].shape == () and out["model.layers.1.mlp.scalar"].item() == 2.5


@pytest.mark.parametrize("value", ["", "..", "sub", "d.safetensors", 5, None, ["a"], "../outside.safetensors"])
def test_bad_weight_map_values(tiny_dirs, tmp_path, value):
    src = copy(tiny_dirs, tmp_path)
    (src / "sub").mkdir()
    (src / "d.safetensors").mkdir()
    idx = json.loads((src / INDEX).read_text())
    idx["weight_map"][next(iter(idx["weight_map"]))] = value
    (src / INDEX).write_text(json.dumps(idx))
    if value == "d.safetensors":  # a plain name, but a directory
        refused(src, tmp_path, f"{src / 'd.safetensors'}: shard is a directory, not a regular file")
    else:
        refused(src, tmp_path, f"{src / INDEX}: weight_map names {value!r}; every value must be the file name")


def _edit_header(f: Path, fn):
    raw = f.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    fn(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + hlen:])


def _first(header):
    return next(v for k, v in header.items() if k != "__metadata__")


@pytest.mark.parametrize("case", ["str_offsets", "float_offsets", "negative_dim", "huge_offset", "overlap",
                                  "no_tensors"])
def test_bad_header_fields(tiny_dirs, tmp_path, case):
    src = copy(tiny_dirs, tmp_path)
    f = src / FIRST

    def edit(h):
        e = _first(h)
        if case == "str_offsets":
            e["data_offsets"] = [str(x) for x in e["data_offsets"]]
        elif case == "float_offsets":
            e["data_offsets"] = [float(x) for x in e["data_offsets"]]
        elif case == "negative_dim":
            e["shape"] = [-e["shape"][0], *e["shape"][1:]]
        elif case == "huge_offset":
            e["data_offsets"] = [2**63, 0]
        elif case == "overlap":
            second = [v for k, v in h.items() if k != "__metadata__"][1]
            second["data_offsets"] = list(e["data_offsets"])
            second["dtype"], second["shape"] = e["dtype"], e["shape"]
        elif case == "no_tensors":
            for k in [k for k in h if k != "__metadata__"]:
                del h[k]

    _edit_header(f, edit)
    want = {"overlap": "the safetensors library refuses such a file", "no_tensors": "holds no tensors",
            "huge_offset": "spans bytes 9223372036854775808..0 but"}
    refused(src, tmp_path, f"{f}:", want.get(case, "malformed header entry"))


def test_duplicate_header_keys(tiny_dirs, tmp_path):
    src = copy(tiny_dirs, tmp_path)
    f = src / FIRST
    raw = f.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    text = raw[8:8 + hlen].decode().rstrip()
    key = next(k for k in json.loads(text) if k != "__metadata__")
    entry = json.dumps(json.loads(text)[key])
    new = (text[:-1] + f',"{key}":{entry}}}').encode()
    new += b" " * (-len(new) % 8)
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + hlen:])
    refused(src, tmp_path, f"{f}: corrupt safetensors header", f"duplicate key {key!r}")


@pytest.mark.parametrize("where", ["header", "config", "index"])
def test_hundred_thousand_deep_json(tiny_dirs, tmp_path, where):
    src = copy(tiny_dirs, tmp_path)
    deep = b"[" * 100_000 + b"]" * 100_000
    if where == "header":
        f = src / FIRST
        raw = f.read_bytes()
        (hlen,) = struct.unpack("<Q", raw[:8])
        new = b'{"x":' + deep + b"}"
        f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + hlen:])
        refused(src, tmp_path, f"{f}: corrupt safetensors header (not valid JSON: nested too deeply)")
    else:
        f = src / (INDEX if where == "index" else "config.json")
        f.write_bytes(b'{"x":' + deep + b"}")
        refused(src, tmp_path, f"{f}:", "is not valid JSON (nested too deeply)")


@pytest.mark.parametrize("edit,want", [
    (lambda c: c["quantization_config"].update(weight_block_size=["a", "b"]),
     "quantization_config.weight_block_size is ['a', 'b'], expected 2 positive integer(s)"),
    (lambda c: c.update(quantization_config="fp8"), "'quantization_config' is 'fp8', expected an object"),
    (lambda c: c.update(num_hidden_layers="x"), "'num_hidden_layers' is 'x', expected a non-negative integer"),
])
def test_bad_config_fields(tiny_dirs, tmp_path, edit, want):
    src = copy(tiny_dirs, tmp_path, "fp8")
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (src / "config.json").write_text(json.dumps(cfg))
    refused(src, tmp_path, f"{src / 'config.json'}:", want)


def _interrupted(tiny_dirs, tmp_path):
    """An interrupted run: its state and shard records, no index."""
    dst = tmp_path / "o"
    code, msg = cli("convert", tiny_dirs["fp8"], dst, "--to", "int4", "--max-shard-size", "700000")
    assert code == 0, msg
    man = json.loads((dst / "k2quant_manifest.json").read_text())
    for name in (INDEX, "k2quant_manifest.json", "config.json", "generation_config.json"):  # written last
        (dst / name).unlink()
    state = dst / ".k2q-state"
    state.mkdir()
    (state / "settings.json").write_text(json.dumps(man["settings"]))
    for name, rec in man["shards"].items():
        (state / f"{name}.json").write_text(json.dumps(rec | {"shard": name}))
    return dst, state


@pytest.mark.parametrize("what", ["record", "settings", "deep"])
def test_corrupt_run_state(tiny_dirs, tmp_path, what):
    dst, state = _interrupted(tiny_dirs, tmp_path)
    rec = sorted(state.glob("model-*.json"))[0]
    f = {"record": rec, "settings": state / "settings.json", "deep": rec}[what]
    f.write_text({"record": '{"shard": "x", "sha256": 5}', "settings": "[1, 2",
                  "deep": "[" * 100_000 + "]" * 100_000}[what])
    code, msg = cli("convert", tiny_dirs["fp8"], dst, "--to", "int4", "--max-shard-size", "700000", "--resume")
    assert code == 2 and f"{f}:" in msg, msg
    assert not (dst / INDEX).exists()


def test_corrupt_manifest_with_force(tiny_dirs, tmp_path):
    dst = tmp_path / "o"
    assert cli("convert", tiny_dirs["bf16"], dst, "--to", "int4")[0] == 0
    (dst / "k2quant_manifest.json").write_text('{"shards": {"../../etc/x": {}}, "files": []}')
    code, msg = cli("convert", tiny_dirs["bf16"], dst, "--to", "int4", "--force")
    assert code == 2 and f"{dst / 'k2quant_manifest.json'}: names ['../../etc/x'], not a plain path inside" in msg


def test_directory_named_like_a_shard_in_dst_with_force(tiny_dirs, tmp_path):
    dst = tmp_path / "o"
    (dst / "old.safetensors").mkdir(parents=True)
    code, msg = cli("convert", tiny_dirs["bf16"], dst, "--to", "int4", "--force")
    assert code == 0, msg
    assert (dst / "old.safetensors").is_dir()  # not k2quant's: left alone


@pytest.mark.parametrize("args,want", [
    (("--workers", "0"), "--workers 0: must be at least 1"),
    (("--workers", "-4"), "--workers -4: must be at least 1"),
    (("--world-size", "0"), "--world-size 0: must be at least 1"),
    (("--world-size", "-3"), "--world-size -3: must be at least 1"),
    (("--max-shard-size", "0"), "--max-shard-size 0: must be at least 1 byte"),
    (("--device", "bogus"), "--device 'bogus': not a device"),
    (("--device", "cuda:7"), "--device 'cuda:7': this machine has"),
])
def test_bad_convert_options(tiny_dirs, tmp_path, args, want):
    if args[1].startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    refused(tiny_dirs["bf16"], tmp_path, want, args=("--to", "int4", *args))


@pytest.mark.parametrize("args,want", [
    (("--gpus", "99999999999999999999xH200"), "99999999999999999999 GPUs is more than"),
    (("--gpus", "8xH200", "--formats", ""), "--formats '' names no format"),
])
def test_bad_plan_options(tiny_dirs, args, want):
    code, msg = cli("plan", tiny_dirs["bf16"], *args)
    assert code == 2 and want in msg, msg


def test_diff_json_into_a_directory(tiny_dirs, tmp_path):
    code, msg = cli("diff", tiny_dirs["bf16"], tiny_dirs["fp8"], "--json", tmp_path)
    assert code == 2 and f"--json {tmp_path}: is a directory; give a file path" in msg


def test_make_tiny_into_an_unwritable_path(tmp_path):
    (tmp_path / "file").write_text("x")
    code, msg = cli("make-tiny", tmp_path / "file" / "k2")
    assert code == 2 and f"{tmp_path / 'file' / 'k2'}: cannot write the tiny checkpoint (Not a directory)" in msg


@pytest.mark.parametrize("args,want", [
    (("--limit", "-1"), "--limit '-1': must be a positive document count"),
    (("--tasks", "k2quant_nonexistent"), "--tasks: unknown task(s) ['k2quant_nonexistent']"),
])
def test_bad_eval_options(tiny_dirs, tmp_path, args, want):
    code, msg = cli("eval", tiny_dirs["bf16"], tiny_dirs["bf16"], *args)
    assert code == 2 and want in msg, msg


def test_header_with_too_many_tensors_is_refused_quickly(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    n = 250_000
    header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}
    raw = json.dumps(header).encode()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(n))
    t0 = time.perf_counter()
    code, msg = cli("inspect", src)
    assert time.perf_counter() - t0 < 10
    assert code == 2 and f"{src / 'model.safetensors'}: header lists more than 200000 tensors" in msg


def test_header_cost_is_linear(tmp_path):
    """20,000 Linear-named tensors in one header: inspect took 231 s (quadratic ignore list); now seconds. (The
    config is the tiny K2's: k2quant reads what each tensor is from the architecture config.json names.)"""
    from k2quant.formats import tiny

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(tiny.config_for("bf16")))
    n = 20_000
    header = {f"model.layers.{i % 61}.mlp.experts.{i}.down_proj.weight": {"dtype": "U8", "shape": [1, 1],
                                                                         "data_offsets": [i, i + 1]} for i in range(n)}
    raw = json.dumps(header).encode()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(n))
    t0 = time.perf_counter()
    code, msg = cli("inspect", src, "--json")
    assert code == 0, msg
    assert time.perf_counter() - t0 < 60
    assert json.loads(msg)["tensors"] == n


def test_qat_resume_without_eval_data(tmp_path):
    from helpers import qat_workdir

    root, src = qat_workdir(tmp_path, parts=2)
    cfg = qat_config.QatConfig(src=str(src), data=[str(root / "data")], out=str(root / "o"), steps=2, lr=1e-3,
                            seq_len=16, batch_size=2, eval_batches=1, save_every=1, stop_after=1)
    qat_train.run(cfg)
    code, msg = cli("qat", "--resume", root / "o" / "state", "--steps", "2", "--lr", "1e-3", "--seq-len", "16",
                    "--batch-size", "2")
    assert code == 0, msg
    assert json.loads((root / "o" / "state" / "run.json").read_text())["step"] == 2
