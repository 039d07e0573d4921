"""k2quant qat over two processes on CPU (torchrun, gloo): FSDP2 as examples/fsdp.yaml sets it up, and DDP.

The same run in one process is the reference: the global batch is split over the ranks and the gradients
averaged, so the two agree up to float summation order (not bit for bit: the MoE groups tokens per rank).
What must hold exactly: the export equals the fake quant of the final (gathered) weights, and a resume
continues to the same bits as the uninterrupted multi-process run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ct_int4_decompress, qat_workdir
from safetensors import safe_open
from safetensors.torch import load_file

from k2quant.errors import K2QuantError
from k2quant.qat import config as qat_config
from k2quant.qat import model as qat_model
from k2quant.qat import state as qat_state
from k2quant.qat import train as qat_train
from k2quant.quant import int4_group

pytestmark = pytest.mark.slow  # processes / a model trained or evaluated end to end

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return qat_workdir(tmp_path_factory.mktemp("qatdist"), parts=2)


def _cfg(root: Path, src: Path, out: str, **kw) -> qat_config.QatConfig:
    base = dict(src=str(src), data=[str(root / "data")], out=str(root / out), steps=4, lr=1e-3, seq_len=32,
                batch_size=4, loss="ce+kl", warmup=0.25, eval_batches=1, log_every=1, train="all", save_every=2,
                teacher_topk=0)
    return qat_config.QatConfig(**{**base, **kw})


def _torchrun(cfg: qat_config.QatConfig, mode: str, resume: Path | None = None) -> list[dict]:
    cfg_file = Path(cfg.out + f".{mode}.json")
    cfg_file.write_text(json.dumps(dataclasses.asdict(cfg)))
    path = os.pathsep.join([str(WORKER.parents[1]), str(WORKER.parents[2])])  # tests/ and this checkout's k2quant
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           str(WORKER), str(cfg_file), mode] + ([str(resume)] if resume else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((Path(cfg.out) / f"records.{mode}.json").read_text())["records"]


@pytest.fixture(scope="module")
def runs(work):
    root, src = work
    torch.set_num_threads(1)
    single: list[dict] = []
    qat_train.run(_cfg(root, src, "single"), progress=single.append)
    fsdp = _torchrun(_cfg(root, src, "fsdp", json_log=str(root / "fsdp.jsonl")), "fsdp")
    return single, fsdp


def _update_cosine(a: torch.Tensor, b: torch.Tensor, init: torch.Tensor) -> float:
    da, db = a.double() - init.double(), b.double() - init.double()
    return float((da * db).sum() / (da.norm() * db.norm()))


def test_fsdp_trains_what_one_process_trains(work, runs):
    root, src = work
    single, fsdp = runs
    assert [r["step"] for r in fsdp] == [1, 2, 3, 4]
    assert [json.loads(x)["step"] for x in (root / "fsdp.jsonl").read_text().splitlines()] == [1, 2, 3, 4]  # once
    # step 1: same weights, same global batch: loss and gradient norm agree to float noise; a rank training
    # on the whole batch, or gradients summed instead of averaged, would be far off
    assert fsdp[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-5)
    assert fsdp[0]["grad_norm"] == pytest.approx(single[0]["grad_norm"], rel=1e-3)
    # later steps drift apart by bf16 gradient rounding (reduce-scattered per rank vs summed in one), which Adam
    # amplifies on small coordinates: 0.5% after 4 steps at lr 1e-3
    assert [f["loss"] for f in fsdp] == pytest.approx([s["loss"] for s in single], rel=1e-2)
    # tokens are counted over both ranks: 4 sequences x 32 tokens x top-2 per MoE layer
    assert all(sum(c) == 4 * 32 * 2 for r in fsdp for c in r["expert_tokens"].values())
    assert fsdp[0]["flip_rate"] == pytest.approx(single[0]["flip_rate"], abs=2e-3) and fsdp[0]["flip_rate"] > 0
    cfg = _cfg(root, src, "single")
    init = {k: v.detach() for k, v in qat_model.build_models(cfg, cfg.scheme())[0].state_dict().items()}
    a = load_file(str(root / "single" / "state" / qat_state.MODEL_FILE))
    b = load_file(str(root / "fsdp" / "state" / qat_state.MODEL_FILE))
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a)
    for k in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.2.mlp.experts.down_proj",
              "model.layers.1.self_attn.q_b_proj.weight", "lm_head.weight"):
        assert _update_cosine(a[k], b[k], init[k]) > 0.97, k


def test_fsdp_export_equals_fake_quant_of_final_weights(work, runs):
    root, src = work
    out = root / "fsdp"
    scheme = _cfg(root, src, "fsdp").scheme()
    sd = load_file(str(out / "state" / qat_state.MODEL_FILE))
    idx = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    n = mismatches = 0
    for li in (1, 2):
        gate_up, down = sd[f"model.layers.{li}.mlp.experts.gate_up_proj"], sd[f"model.layers.{li}.mlp.experts.down_proj"]
        for e in range(8):
            for proj, w in (("gate_proj", gate_up[e, :96]), ("up_proj", gate_up[e, 96:]), ("down_proj", down[e])):
                name = f"model.layers.{li}.mlp.experts.{e}.{proj}"
                with safe_open(str(out / idx[f"{name}.weight_packed"]), "pt") as f:
                    parts = [f.get_tensor(f"{name}.weight_{p}") for p in ("packed", "scale", "shape")]
                got = ct_int4_decompress(*parts)
                want = int4_group.dequantize(*int4_group.quantize_weight(w, scheme), scheme, torch.bfloat16)
                mismatches += int((got != want).sum())
                n += 1
    assert n == 48 and mismatches == 0
    assert not list(out.glob("trainer*"))  # the per-rank trainer state stays in state/


def test_fsdp_resume_continues_to_the_same_bits(work, runs):
    root, src = work
    _, fsdp = runs
    _torchrun(_cfg(root, src, "fsdp-stopped", stop_after=2), "fsdp")
    state = root / "fsdp-stopped" / "state"
    assert sorted(p.name for p in state.glob("trainer*")) == ["trainer.rank0-of-2.pt", "trainer.rank1-of-2.pt"]
    with pytest.raises(K2QuantError, match=r"saved by 2 process\(es\), resumed with 1; .* resume with 2 process"):
        qat_train.run(_cfg(root, src, "fsdp-stopped"), resume=state)
    resumed = _torchrun(_cfg(root, src, "fsdp-stopped"), "fsdp", resume=state)
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in fsdp[2:]]
    a = load_file(str(root / "fsdp" / "state" / qat_state.MODEL_FILE))
    b = load_file(str(state / qat_state.MODEL_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for r in (0, 1):
        ta = torch.load(root / "fsdp" / "state" / f"trainer.rank{r}-of-2.pt", weights_only=True)
        tb = torch.load(state / f"trainer.rank{r}-of-2.pt", weights_only=True)
        assert ta["masters"].keys() == tb["masters"].keys() and len(ta["masters"]) > 0
        assert all(torch.equal(ta["masters"][k], tb["masters"][k]) for k in ta["masters"])


def test_fsdp_with_topk_teacher_is_the_fsdp_run(work, runs):
    """--teacher-topk >= vocabulary under FSDP: the teacher is sharded alone, run over each rank's share
    of every batch, and freed; the run matches the live sharded teacher's."""
    root, src = work
    _, fsdp = runs
    topk = _torchrun(_cfg(root, src, "fsdp-topk", teacher_topk=10**6), "fsdp")
    # step 1 (before any update) to float summation order; later steps drift apart a little: Adam's first updates
    # are sign-like, so rounding-level gradient differences (gathered log-partition vs log-softmax) flip tiny
    # components
    assert topk[0]["kl"] == pytest.approx(fsdp[0]["kl"], rel=1e-5, abs=1e-7)
    assert topk[0]["loss"] == pytest.approx(fsdp[0]["loss"], rel=1e-5)
    assert [r["loss"] for r in topk] == pytest.approx([r["loss"] for r in fsdp], rel=2e-2)
    assert (root / "fsdp-topk" / "config.json").is_file()


def test_ddp_trains_what_one_process_trains(work, runs):
    root, src = work
    single, _ = runs
    ddp = _torchrun(_cfg(root, src, "ddp"), "ddp")
    assert ddp[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-5)
    assert ddp[0]["grad_norm"] == pytest.approx(single[0]["grad_norm"], rel=1e-3)
    assert [d["loss"] for d in ddp] == pytest.approx([s["loss"] for s in single], rel=1e-2)
    assert (root / "ddp" / "config.json").is_file()


def test_batch_must_split_over_processes(work):
    root, src = work

    class TwoProcesses:  # what run() reads of an Accelerator before it touches the model
        num_processes, process_index = 2, 0

    with pytest.raises(K2QuantError, match=r"--batch-size 3 does not split over 2 processes; use a multiple of 2"):
        qat_train.run(_cfg(root, src, "odd", batch_size=3), accelerator=TwoProcesses())
