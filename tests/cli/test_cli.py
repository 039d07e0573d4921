"""The CLI end to end: inspect and convert, tables and --json, on the tiny checkpoints."""
import json

from click.testing import CliRunner
from helpers import read_all

from k2quant.cli import main
from k2quant.cli.options import parse_size
from k2quant.formats.checkpoint import Checkpoint


def invoke(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def test_inspect_json_sizes_are_exact(tiny_dirs, tmp_path):
    rep = json.loads(invoke("inspect", tiny_dirs["fp8"], "--json"))
    assert rep["format"] == "fp8" and rep["shards"] == 3
    assert rep["stored_bytes"] == Checkpoint(tiny_dirs["fp8"]).total_bytes()
    for fmt in ("bf16", "fp8", "int4"):
        invoke("convert", tiny_dirs["fp8"], tmp_path / fmt, "--to", fmt)
        written = sum(t.numel() * t.element_size() for t in read_all(tmp_path / fmt).values())
        assert rep["sizes"][fmt] == written, fmt
    assert rep["classes"]["routed_expert"]["params"] == 2 * 8 * 3 * 96 * 320


def test_inspect_tells_the_int4_scale_rule(tiny_dirs, tmp_path):
    rep = json.loads(invoke("inspect", tiny_dirs["int4"], "--json"))
    assert rep["int4_rule"]["rule"] == "library"
    invoke("convert", tiny_dirs["int4"], tmp_path / "bf16", "--to", "bf16")
    invoke("convert", tmp_path / "bf16", tmp_path / "kimi", "--to", "int4", "--scale-rule", "kimi")
    rep = json.loads(invoke("inspect", tmp_path / "kimi", "--json", "--check-rule", "0"))
    assert rep["int4_rule"] == {"rule": "kimi", "modules_checked": 48, "modules_with_code_-8": 0,
                                "reproduced_by_kimi_rule": 48, "reproduced_by_library_rule": 0}
    text = invoke("inspect", tmp_path / "kimi")
    assert "INT4 scale rule: kimi" in text and "routed_expert" in text


def test_convert_json_summary(tiny_dirs, tmp_path):
    rep = json.loads(invoke("convert", tiny_dirs["bf16"], tmp_path / "o", "--to", "int4", "--json"))
    assert rep["source_format"] == "bf16" and rep["target"] == "int4" and rep["shards"] == 1
    assert rep["by_class"]["routed_expert"]["count"] == 48
    assert rep["bytes_out"] == sum(t.numel() * t.element_size() for t in read_all(tmp_path / "o").values())


def test_convert_table(tiny_dirs, tmp_path):
    text = invoke("convert", tiny_dirs["int4"], tmp_path / "o", "--to", "bf16")
    assert "int4 → bf16" in text and "routed_expert" in text and "shard(s)" in text


def test_int4_options_refused_for_other_targets(tiny_dirs, tmp_path):
    res = CliRunner().invoke(main, ["convert", str(tiny_dirs["bf16"]), str(tmp_path / "o"), "--to", "fp8",
                                    "--group-size", "64"])
    assert res.exit_code == 2 and "--group-size/--scale-rule/--targets/--ignore apply to --to int4 only" in res.output


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1000") == 1000


def test_the_console_entry_point_quick_exit_loses_nothing(tiny_dirs, tmp_path):
    """``python -m k2quant`` ends convert/verify without the interpreter's teardown (``cli.main.run``): what
    they print to a file or a pipe is all there, the output is complete, and the exit code is the command's;
    a command outside the quick list exits through the interpreter as before."""
    import subprocess
    import sys

    k2q = [sys.executable, "-m", "k2quant"]
    with open(tmp_path / "out.json", "w") as fh:  # a file: stdout is block-buffered
        res = subprocess.run([*k2q, "convert", str(tiny_dirs["fp8"]), str(tmp_path / "o"), "--to", "int4",
                              "--json", "-"], stdout=fh, stderr=subprocess.PIPE, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["target"] == "int4" and report["tensors_out"] == len(Checkpoint(tmp_path / "o").tensors)
    res = subprocess.run([*k2q, "verify", str(tiny_dirs["fp8"]), str(tmp_path / "o")], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip(), res.stderr
    res = subprocess.run([*k2q, "convert", str(tmp_path / "missing"), str(tmp_path / "o2"), "--to", "int4"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "no such checkpoint directory" in res.stderr
    res = subprocess.run([*k2q, "qat", "--help"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "Usage:" in res.stdout
