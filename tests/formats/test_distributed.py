"""Scale-out: two ranks (torchrun + gloo, or --rank/--world-size on shared storage) give the single-process bytes."""
import hashlib
import os
import socket
import subprocess
import sys
import time

import pytest

from k2quant.formats import convert, output
from k2quant.formats.checkpoint import Checkpoint
from k2quant.formats.plan import make_plan
from k2quant.quant import scheme as qscheme

pytestmark = pytest.mark.slow  # processes / a model trained or evaluated end to end

ARGS = ["--to", "int4", "--max-shard-size", "700000"]


def tree(path):
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single(src, dst):
    convert.convert(src, dst, "int4", qscheme.for_target("int4"), max_shard_size=700_000)
    return tree(dst)


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def test_torchrun_two_ranks_gloo(tiny_dirs, tmp_path):
    want = single(tiny_dirs["fp8"], tmp_path / "single")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "k2quant", "convert", str(tiny_dirs["fp8"]),
           str(tmp_path / "dist"), *ARGS, "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '"world_size": 2' in res.stdout and '"rank": 1' in res.stdout
    assert tree(tmp_path / "dist") == want


def test_rank_flags_on_shared_storage(tiny_dirs, tmp_path):
    want = single(tiny_dirs["fp8"], tmp_path / "single")
    base = [sys.executable, "-m", "k2quant", "convert", str(tiny_dirs["fp8"]), str(tmp_path / "shared"), *ARGS,
            "--world-size", "2", "--json"]
    procs = [subprocess.Popen(base + ["--rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env()) for r in (1, 0)]  # rank 1 starts first and waits
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in procs:
        p.kill()
    errs = {r: p.communicate()[1] for r, p in zip((1, 0), procs)}
    for r, p in zip((1, 0), procs):
        assert p.returncode == 0, f"rank {r} (exit {p.returncode}): " + "; ".join(
            f"rank {k} stderr: {e[-1500:]}" for k, e in errs.items())
    assert tree(tmp_path / "shared") == want


def test_a_rank_that_looks_again_after_rank_0_finished_is_done(tiny_dirs, tmp_path):
    """The race that hung rank 1 of the test above for its whole timeout: rank 1 looks for every shard record
    and misses one; rank 0 sees them all, writes the index and removes the records; rank 1's next look must
    see a finished run, not wait for records that no longer exist."""
    scheme = qscheme.for_target("int4")
    dst = tmp_path / "o"
    convert.convert(tiny_dirs["fp8"], dst, "int4", scheme, max_shard_size=700_000)  # finished: records removed
    plan = make_plan(Checkpoint(tiny_dirs["fp8"]), "int4", scheme, 700_000)
    assert (dst / "model.safetensors.index.json").is_file() and not (dst / output.STATE_DIR).exists()
    assert output.all_recorded(dst, plan, {}, rank=1)
    assert not output.all_recorded(dst, plan, {}, rank=0)  # rank 0 writes the index: it never reads it as done
    (dst / output.STATE_DIR).mkdir()  # a run under way there again (an index left from before): not done
    assert not output.all_recorded(dst, plan, {}, rank=1)
