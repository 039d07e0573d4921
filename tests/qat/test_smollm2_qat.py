"""QAT on a real pretrained model (SmolLM2-135M-Instruct, weights nobody here trained), every Linear but lm_head,
with the command's defaults for the loss (top-k cached teacher): the export is exact, resume is bit-identical,
and a run can start from an INT4 checkpoint while distilling from the BF16 one (``--teacher``).

Oracles: compressed-tensors' own decompressor and the exported checkpoint loaded back; the uninterrupted run.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import ct_int4_decompress, read_all
from safetensors.torch import load_file

from k2quant import qat
from k2quant.cli import main
from k2quant.errors import K2QuantError
from k2quant.eval import smollm2
from k2quant.eval.tasks import sources
from k2quant.formats import convert, load
from k2quant.formats import inspect as finspect
from k2quant.qat import config as qat_config
from k2quant.qat import model as qat_model
from k2quant.qat import state as qat_state
from k2quant.qat import train as qat_train
from k2quant.quant import scheme as qscheme

pytestmark = pytest.mark.slow
PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def smol() -> Path:
    return smollm2.path()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qat-smol")
    (root / "data").mkdir()
    (root / "data" / "plays.txt").write_text(sources.text_documents(None)[0]["text"][:6000])
    return root


def _cfg(smol: Path, root: Path, out: str, **kw) -> qat_config.QatConfig:
    base = dict(src=str(smol), data=[str(root / "data")], out=str(root / out), steps=4, seq_len=32, batch_size=2,
                lr=1e-4, targets=["Linear"], ignore=["lm_head"], eval_batches=1, save_every=2)
    return qat_config.QatConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(smol, root):
    cfg = _cfg(smol, root, "full")
    assert cfg.teacher_topk > 0  # the default loss: the teacher's top-k, cached before training
    recs: list[dict] = []
    report = qat_train.run(cfg, progress=recs.append)
    return cfg, report, recs


def test_export_is_what_the_student_computed(smol, root, trained):
    """compressed-tensors' decompress of every exported module equals the fake-quant weight the student multiplied
    by, and the exported checkpoint's logits equal the fake-quant student's."""
    cfg, report, recs = trained
    assert report.exported and len(recs) == 4 and sum(r["flip_rate"] for r in recs) > 0  # the codes moved
    out = Path(cfg.out)
    student, _ = qat_model.build_models(cfg, cfg.scheme(), with_teacher=False)
    saved = load_file(str(out / qat_state.STATE / qat_state.MODEL_FILE))
    assert "lm_head.weight" not in saved  # tied to the embeddings: stored once, as in the source
    missing, unknown = student.load_state_dict(saved, strict=False)
    assert missing == ["lm_head.weight"] and not unknown
    student.eval()
    fq = qat.fake_quant_weights(student)
    assert len(fq) == 30 * len(PROJS)
    got = read_all(out)
    for name, w in fq.items():
        dec = ct_int4_decompress(got[f"{name}.weight_packed"], got[f"{name}.weight_scale"], got[f"{name}.weight_shape"])
        assert torch.equal(dec, w), name
    served = load.load_model(out)
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(student(ids).logits, served(ids).logits)
    src = read_all(smol)  # --train targets (the default): every other tensor is the source's, byte for byte
    plain = [k for k in got if not k.rsplit(".", 1)[0].endswith(PROJS)]
    assert len(plain) == 2 * 30 + 2 and all(torch.equal(got[k], src[k]) for k in plain)


def test_resume_is_bit_identical(smol, root, trained):
    cfg, _, recs = trained
    qat_train.run(_cfg(smol, root, "stopped", stop_after=2))
    resumed: list[dict] = []
    qat_train.run(_cfg(smol, root, "stopped"), resume=root / "stopped" / "state", progress=resumed.append)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in recs[2:]]
    a = load_file(str(Path(cfg.out) / "state" / qat_state.MODEL_FILE))
    b = load_file(str(root / "stopped" / "state" / qat_state.MODEL_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta, tb = read_all(Path(cfg.out)), read_all(root / "stopped")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_cli_starts_from_int4_and_distills_from_the_bf16_teacher(smol, root):
    """`qat INT4 --teacher BF16 --recipe linear`: step 0 is the INT4 checkpoint itself (kimi rule), the KL is to the
    BF16 model (not to the INT4 start, which would be 0 at step 0)."""
    start = root / "rtn"
    scheme = qscheme.for_target("int4", scale_rule="kimi", targets=["Linear"], ignore=["lm_head"])
    convert.convert(smol, start, "int4", scheme)
    audit = finspect.audit_int4(start, scheme)  # what qat checks before it starts: selected by class (Linear) too
    assert audit["tensors"] == 210 and audit["kimi"] == {"codes": 1.0, "scales": 1.0}
    out = root / "from-int4"
    res = CliRunner().invoke(main, ["qat", str(start), "--teacher", str(smol), "--recipe", "linear", "--data",
                                    str(root / "data"), "--out", str(out), "--steps", "1", "--seq-len", "32",
                                    "--batch-size", "2", "--lr", "1e-12", "--log-jsonl", str(root / "i.jsonl")])
    assert res.exit_code == 0, res.output
    first = qat_config.QatConfig(**qat_state.read_run(out / "state")[0].__dict__)
    assert first.teacher == str(smol) and first.targets == ["Linear"] and first.ignore == ["lm_head"]
    kl = float(next(iter((root / "i.jsonl").read_text().splitlines())).split('"kl": ')[1].split(",")[0])
    assert kl > 1e-3  # RTN INT4 against BF16
    a, b = read_all(start), read_all(out)  # lr 1e-12 moves nothing: the export reproduces the start
    packed = [k for k in a if k.endswith("weight_packed")]
    assert len(packed) == 210 and all(torch.equal(a[k], b[k]) for k in packed)


def test_teacher_with_another_vocabulary_is_refused(smol, root, tmp_path):
    from helpers import qat_workdir  # the tiny K2, vocabulary 1024

    _, tiny_src = qat_workdir(tmp_path, 1)
    with pytest.raises(K2QuantError, match="vocabulary has 1024 tokens, the source .* has 49152"):
        qat_train.run(_cfg(smol, root, "bad-teacher", teacher=str(tiny_src)))
    assert not (root / "bad-teacher").exists()
