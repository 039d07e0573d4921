"""Kill a conversion with SIGKILL at several points, resume it, and get the uninterrupted run's bytes."""
import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from k2quant.cli import main

ARGS = ["--to", "int4", "--max-shard-size", "800000"]
KILLER = textwrap.dedent("""
    import json, os, signal, sys
    from k2quant.formats import convert, shards
    from k2quant.quant import scheme as qscheme
    mode, src, dst, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    count = {"n": 0}
    if mode == "between":  # right after the k-th shard is renamed into place, before its record
        real = shards.ShardWriter.commit
        def commit(self):
            h = real(self)
            count["n"] += 1
            if count["n"] == k:
                die()
            return h
        shards.ShardWriter.commit = commit
    elif mode == "mid":  # inside a shard: after k modules, with a partial temp file on disk
        real = shards.ShardWriter.write_raw
        def write_raw(self, name, data):
            real(self, name, data)
            count["n"] += 1
            if count["n"] == k:
                self.fh.flush()
                die()
        shards.ShardWriter.write_raw = write_raw
    elif mode == "index":  # during the index write: half a temp index on disk
        real = shards.write_json
        def write_json(path, obj):
            if path.name == "model.safetensors.index.json":
                path.with_name(path.name + shards.TMP_SUFFIX).write_text(json.dumps(obj)[:200])
                die()
            return real(path, obj)
        shards.write_json = write_json
    convert.convert(src, dst, "int4", qscheme.for_target("int4"), max_shard_size=800000)
    sys.exit(3)  # not reached: the process is killed
""")


def tree(path):
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "o"
    res = CliRunner().invoke(main, ["convert", str(tiny_dirs["fp8"]), str(out), *ARGS])
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("mode,k", [("between", 1), ("between", 3), ("mid", 170), ("index", 0)])
def test_kill_and_resume_is_byte_identical(tiny_dirs, reference, tmp_path, mode, k):
    src = tiny_dirs["fp8"]
    before = tree(src)
    dst = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-c", KILLER, mode, str(src), str(dst), str(k)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]  # SIGKILL
    assert not (dst / "model.safetensors.index.json").exists()  # nothing looks complete
    if mode == "mid":
        assert list(dst.glob("*.k2q-tmp"))  # the crash left a partial file behind
    res = CliRunner().invoke(main, ["convert", str(src), str(dst), *ARGS])
    assert res.exit_code == 2 and "pass --resume to continue it" in res.output
    res = CliRunner().invoke(main, ["convert", str(src), str(dst), *ARGS, "--resume"])
    assert res.exit_code == 0, res.output
    assert tree(dst) == tree(reference)  # every shard, config, index and manifest byte-identical
    assert tree(src) == before  # the source is never modified
    kept = {"between": k - 1, "index": 7}.get(mode)  # a shard killed before its record is redone
    if kept:
        assert f"7 shard(s) ({kept} kept from the interrupted run)" in " ".join(res.output.split())


def test_resume_refuses_changed_settings(tiny_dirs, tmp_path):
    dst = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-c", KILLER, "between", str(tiny_dirs["fp8"]), str(dst), "2"])
    assert proc.returncode == -9
    res = CliRunner().invoke(main, ["convert", str(tiny_dirs["fp8"]), str(dst), *ARGS, "--resume",
                                    "--scale-rule", "kimi"])
    msg = " ".join(res.output.split())
    assert res.exit_code == 2
    assert "--resume with settings that differ from the interrupted run's (scheme: was" in msg
    assert "'scale_rule': 'library'" in msg and "'scale_rule': 'kimi'" in msg
    assert "pass --force instead of --resume to start over" in msg


def test_resume_of_a_finished_run_keeps_everything(tiny_dirs, reference, tmp_path):
    import shutil

    dst = tmp_path / "o"
    shutil.copytree(reference, dst)
    res = CliRunner().invoke(main, ["convert", str(tiny_dirs["fp8"]), str(dst), *ARGS, "--resume", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["shards_kept"] == rep["shards"] > 1
    assert tree(dst) == tree(reference)
