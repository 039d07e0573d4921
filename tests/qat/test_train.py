"""k2quant qat end to end: export equals the trained fake quant, logits identical, resume, INT4 step 0, data, CLI."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from helpers import qat_workdir, read_all
from safetensors import safe_open
from safetensors.torch import load_file

from k2quant import qat
from k2quant.cli import qat as cli_qat
from k2quant.errors import FormatError, K2QuantError, OutputError
from k2quant.formats import inspect as finspect
from k2quant.formats import load, tiny
from k2quant.qat import config as qat_config
from k2quant.qat import data as qat_data
from k2quant.qat import losses as qat_losses
from k2quant.qat import model as qat_model
from k2quant.qat import state as qat_state
from k2quant.qat import train as qat_train
from k2quant.quant import int4_group
from k2quant.quant import scheme as qscheme

pytestmark = pytest.mark.slow  # processes / a model trained or evaluated end to end


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny bf16 K2 checkpoint with a tokenizer, and a text corpus."""
    return qat_workdir(tmp_path_factory.mktemp("qatrun"), parts=4)


def _cfg(root: Path, src: Path, out_name: str, **kw) -> qat_config.QatConfig:
    base = dict(src=str(src), data=[str(root / "data")], out=str(root / out_name), steps=6, lr=3e-3, seq_len=32,
                batch_size=2, loss="ce+kl", warmup=0.2, eval_batches=2, log_every=1, train="all",
                teacher_topk=0)
    return qat_config.QatConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(work):
    root, src = work
    recs = []
    cfg = _cfg(root, src, "full", json_log=str(root / "full.jsonl"))
    report = qat_train.run(cfg, progress=recs.append)
    return cfg, report, recs


def _ct_decompress(path: Path, module: str, group_size: int = 32) -> torch.Tensor:
    """compressed-tensors' own unpack + dequantize of one module of an exported checkpoint."""
    idx = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    parts = {}
    for part in ("weight_packed", "weight_scale", "weight_shape"):
        with safe_open(str(path / idx[f"{module}.{part}"]), "pt") as f:
            parts[part] = f.get_tensor(f"{module}.{part}")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size))
    return PackedQuantizationCompressor.decompress(parts, scheme)["weight"]


def _student_from_state(cfg: qat_config.QatConfig, state: Path):
    student, _ = qat_model.build_models(cfg, cfg.scheme())
    student.load_state_dict(load_file(str(state / qat_state.MODEL_FILE)))
    return student.eval()


def test_run_logs_every_step(trained):
    cfg, report, recs = trained
    assert report.steps_done == 6 and report.exported and report.source_format == "bf16"
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all(set(r) >= {"loss", "kl", "ce", "lr", "tokens_per_s", "flip_rate", "expert_tokens"} for r in recs)
    assert all(math.isclose(r["loss"], r["kl"] + r["ce"], rel_tol=1e-6) for r in recs)
    # top-2 over 8 experts: every token is counted twice in each MoE layer
    assert all(sum(c) == 2 * 2 * 32 for r in recs for c in r["expert_tokens"].values())
    assert sum(r["flip_rate"] for r in recs) > 0  # lr 3e-3 moves codes
    lines = [json.loads(x) for x in Path(cfg.json_log).read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert recs[0]["lr"] == pytest.approx(3e-3) and recs[-1]["lr"] < recs[1]["lr"]


def test_export_equals_fake_quant_of_final_weights(trained):
    cfg, report, _ = trained
    out = Path(cfg.out)
    sd = load_file(str(out / qat_state.STATE / qat_state.MODEL_FILE))
    scheme = cfg.scheme()
    assert scheme.scale_rule == "kimi"
    n = mismatches = 0
    for li in (1, 2):
        gate_up, down = sd[f"model.layers.{li}.mlp.experts.gate_up_proj"], sd[f"model.layers.{li}.mlp.experts.down_proj"]
        assert gate_up.dtype == torch.float32  # the masters the forward fake-quantized
        for e in range(8):
            for proj, w in (("gate_proj", gate_up[e, :96]), ("up_proj", gate_up[e, 96:]), ("down_proj", down[e])):
                got = _ct_decompress(out, f"model.layers.{li}.mlp.experts.{e}.{proj}")
                want = int4_group.dequantize(*int4_group.quantize_weight(w, scheme), scheme, torch.bfloat16)
                assert got.dtype == torch.bfloat16
                mismatches += int((got != want).sum())
                n += 1
    assert n == 48 and mismatches == 0


def test_exported_model_logits_equal_fake_quant_model(trained):
    cfg, _, _ = trained
    out = Path(cfg.out)
    student = _student_from_state(cfg, out / qat_state.STATE)
    served = load.load_model(out)
    ids = torch.randint(3, 1024, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(student(ids).logits, served(ids).logits)
    # and the per-module weights the forward used are what convert wrote
    fq = qat.fake_quant_weights(student)
    assert len(fq) == 48
    assert torch.equal(fq["model.layers.2.mlp.experts.5.up_proj"],
                       _ct_decompress(out, "model.layers.2.mlp.experts.5.up_proj"))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == list(qscheme.KIMI_INT4_IGNORE)
    assert config["model_type"] == "kimi_k2" and (out / "tokenizer.json").is_file()


def test_export_keeps_every_unquantized_tensor_in_its_source_dtype(work, trained):
    """transformers 5.24+ holds the router (``mlp.gate.weight``) in fp32; the checkpoint stores it BF16. QAT
    keeps it on the BF16 grid, so the export writes BF16 again, holding exactly what the student trained."""
    cfg, _, _ = trained
    root, src = work
    out, src_t = Path(cfg.out), read_all(src)
    got = read_all(out)
    plain = [k for k in got if k in src_t and ".experts." not in k]
    assert len(plain) > 20 and "model.layers.1.mlp.gate.weight" in plain
    assert {k: got[k].dtype for k in plain} == {k: src_t[k].dtype for k in plain}
    student = _student_from_state(cfg, out / qat_state.STATE)
    router = student.get_parameter("model.layers.1.mlp.gate.weight")
    assert torch.equal(router.to(torch.bfloat16), got["model.layers.1.mlp.gate.weight"])
    assert torch.equal(router, router.to(torch.bfloat16).to(router.dtype))  # trained on the BF16 grid
    assert not torch.equal(got["model.layers.1.mlp.gate.weight"], src_t["model.layers.1.mlp.gate.weight"])  # trained


def test_resume_gives_the_same_final_weights(work, trained):
    root, src = work
    full_cfg, _, full_recs = trained
    cfg = _cfg(root, src, "stopped", save_every=3, stop_after=3)
    first = qat_train.run(cfg)
    assert first.steps_done == 3 and not first.exported and not (root / "stopped" / "config.json").exists()
    recs = []
    second = qat_train.run(_cfg(root, src, "stopped", save_every=3), resume=root / "stopped" / "state", progress=recs.append)
    assert second.steps_done == 6 and [r["step"] for r in recs] == [4, 5, 6]
    assert [r["loss"] for r in recs] == [r["loss"] for r in full_recs[3:]]
    a = load_file(str(Path(full_cfg.out) / "state" / qat_state.MODEL_FILE))
    b = load_file(str(root / "stopped" / "state" / qat_state.MODEL_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta = torch.load(Path(full_cfg.out) / "state" / qat_state.TRAINER_FILE, weights_only=True)
    tb = torch.load(root / "stopped" / "state" / qat_state.TRAINER_FILE, weights_only=True)
    assert all(torch.equal(ta["masters"][k], tb["masters"][k]) for k in ta["masters"])


def test_resume_with_other_settings_is_refused(work, trained):
    root, src = work
    with pytest.raises(K2QuantError) as exc:
        qat_train.run(_cfg(root, src, "full", lr=1e-3), resume=root / "full" / "state")
    assert "cannot resume with different settings (lr: saved 0.003, given 0.001)" in str(exc.value)


def test_export_command_matches_run_export(work, trained):
    root, _ = work
    cfg, _, _ = trained
    res = CliRunner().invoke(cli_qat.qat, ["export", str(root / "full" / "state"), str(root / "exported")])
    assert res.exit_code == 0, res.output
    for f in (root / "full").glob("*.safetensors"):
        a, b = load_file(str(f)), load_file(str(root / "exported" / f.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _int4_source(root: Path, name: str, rule: str) -> Path:
    path = tiny.build(root / name, "int4", seed=2, scheme=qscheme.get("int4-g32", scale_rule=rule))
    for f in (root / "src").glob("tokenizer*"):
        shutil.copy2(f, path / f.name)
    return path


def test_int4_source_step0_reproduces_codes_and_scales(work):
    root, _ = work
    src = _int4_source(root, "int4-kimi", "kimi")
    cfg = _cfg(root, src, "unused")
    audit = finspect.audit_int4(src, cfg.scheme())
    assert audit["tensors"] == 48 and audit["kimi"] == {"codes": 1.0, "scales": 1.0}
    student, _ = qat_model.build_models(cfg, cfg.scheme())
    stored = load_file(str(next(src.glob("*00001*.safetensors")))) | {
        k: v for f in src.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    codes = qat.codes(student)
    assert len(codes) == 48
    for module, (q, scale) in codes.items():
        assert torch.equal(q, int4_group.unpack(stored[f"{module}.weight_packed"], q.shape[-1]))
        assert torch.equal(scale, stored[f"{module}.weight_scale"])


def test_library_rule_int4_source_is_refused_without_requantize(work):
    root, _ = work
    src = _int4_source(root, "int4-lib", "library")
    audit = finspect.audit_int4(src, qscheme.get("int4-g32"))
    assert audit["library"]["scales"] < 1.0 and audit["kimi"]["scales"] < 1.0  # amax/7.5 is not idempotent
    with pytest.raises(K2QuantError) as exc:
        qat_train.run(_cfg(root, src, "lib-out"))
    msg = str(exc.value)
    assert msg.startswith(f"{src}: INT4 checkpoint is reproduced exactly by neither scale rule, not by --scale-rule "
                          f"kimi (library: ")
    assert msg.endswith("so step 0 would not equal the shipped model; pass --requantize to start from its "
                        "dequantized weights")


def test_fp8_source_trains_from_k2quants_own_dequant(work):
    root, _ = work
    src = tiny.build(root / "fp8", "fp8", seed=4)
    for f in (root / "src").glob("tokenizer*"):
        shutil.copy2(f, src / f.name)
    cfg = _cfg(root, src, "from-fp8", steps=1, export=False)
    student, teacher = qat_model.build_models(cfg, cfg.scheme())
    ref = load.dequantized_state_dict(src)  # the convert path's FP8 dequant, per-expert names
    gate_up = teacher.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(gate_up[3, :96], ref["model.layers.1.mlp.experts.3.gate_proj.weight"])
    assert torch.equal(student.model.layers[1].mlp.experts.gate_up_proj, gate_up.float())  # fp32 masters
    report = qat_train.run(cfg)
    assert report.source_format == "fp8" and report.steps_done == 1


# -- data ----------------------------------------------------------------------------------------
def test_jsonl_text_and_chat_messages(work, tmp_path):
    _, src = work
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "the king"}) + "\n\n" +
                 json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}))
    assert qat_data.load_texts([str(f)], tok) == ["the king", "<user>hi<assistant>yo"]
    seqs = qat_data.pack(["the king", "wine"], tok, 2)
    ids = tok("the king")["input_ids"] + [2] + tok("wine")["input_ids"] + [2]
    assert seqs.tolist() == [ids[i:i + 2] for i in range(0, len(ids) // 2 * 2, 2)]


@pytest.mark.parametrize("content, message", [
    ("{not json", "d.jsonl:1: not valid JSON (Expecting property name enclosed in double quotes); each line must be "
                  "one JSON object"),
    ('{"prompt": "x"}', "d.jsonl:1: expected a `text` string or a `messages` list, found keys ['prompt']"),
    ('{"messages": []}', "d.jsonl:1: chat `messages` need a chat template, but the tokenizer has none; use a "
                         "tokenizer with a chat template (--tokenizer) or `text` rows"),
])
def test_bad_jsonl_is_reported_with_file_and_line(work, tmp_path, content, message):
    _, src = work
    from transformers import AutoTokenizer

    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(FormatError) as exc:
        qat_data.load_texts([str(tmp_path / "d.jsonl")], AutoTokenizer.from_pretrained(str(src)))
    assert str(exc.value) == f"{tmp_path}/{message}"


def test_batches_cover_each_epoch_once():
    n, bs = 10, 4
    seen = torch.cat([qat_data.batch_indices(n, bs, s, seed=3) for s in range(5)])  # 20 = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])  # a new order per epoch
    assert torch.equal(qat_data.batch_indices(n, bs, 3, seed=3), seen[12:16])


def test_schedule_warmup_then_cosine():
    f = qat_train.schedule(qat_config.QatConfig(src="", data=[], out="", steps=10, warmup=0.2))
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0]
    assert f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)


# -- CLI and user errors --------------------------------------------------------------------------
def test_cli_trains_and_exports(work):
    root, src = work
    out = root / "cli-out"
    res = CliRunner().invoke(cli_qat.qat, [str(src), "--data", str(root / "data"), "--out", str(out), "--steps", "2",
                                           "--seq-len", "32", "--batch-size", "2", "--loss", "ce",
                                           "--json", str(root / "cli.jsonl")])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors.index.json").is_file() and (out / "state" / "run.json").is_file()
    run = json.loads((out / "state" / "run.json").read_text())
    assert run["step"] == 2 and run["config"]["loss"] == "ce" and run["config"]["scale_rule"] == "kimi"
    assert len((root / "cli.jsonl").read_text().splitlines()) == 2


def test_cli_missing_data_is_a_k2quant_error(work, tmp_path):
    _, src = work
    res = CliRunner().invoke(cli_qat.qat, [str(src), "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, K2QuantError)
    assert str(res.exception) == "qat: missing --data; usage: k2quant qat SRC --data FILE --out DIR"


def test_missing_data_file_and_nonempty_out(work, tmp_path):
    root, src = work
    with pytest.raises(K2QuantError) as exc:
        qat_train.run(_cfg(root, src, "x", data=[str(tmp_path / "nope.txt")], out=str(tmp_path / "o")))
    assert str(exc.value) == (f"{tmp_path}/nope.txt: data file not found; pass existing .txt/.md/.jsonl files or "
                              f"directories to --data")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(OutputError) as exc:
        qat_train.run(_cfg(root, src, "x", out=str(tmp_path / "busy")))
    assert str(exc.value) == (f"{tmp_path}/busy: output directory is not empty (notes.txt); choose an empty "
                              f"directory, or pass --resume --out {tmp_path}/busy to continue the run in it")


def test_too_little_data(work, tmp_path):
    root, src = work
    (tmp_path / "short.txt").write_text("the king")
    with pytest.raises(K2QuantError, match=r"too little text for one training sequence of --seq-len 32 tokens"):
        qat_train.run(_cfg(root, src, "x", data=[str(tmp_path / "short.txt")], out=str(tmp_path / "o")))


def test_gradient_checkpointing_and_train_experts(work):
    root, src = work
    ids = torch.randint(3, 1024, (2, 16), generator=torch.Generator().manual_seed(2))
    grads, counts = [], []
    for gc in (False, True):
        cfg = _cfg(root, src, "unused", grad_checkpointing=gc, train="experts")
        student, teacher = qat_model.build_models(cfg, cfg.scheme())
        assert {n for n, p in student.named_parameters() if p.requires_grad} == {
            f"model.layers.{li}.mlp.experts.{p}" for li in (1, 2) for p in ("gate_up_proj", "down_proj")}
        counter = qat_train.ExpertCounter(student)
        loss, _ = qat_losses.losses(cfg, student, teacher, ids)
        loss.backward()  # with checkpointing, the layers (and routers) run again here
        grads.append(student.model.layers[2].mlp.experts.down_proj.grad)
        counts.append(counter.take())
    assert torch.equal(grads[0], grads[1]) and bool(grads[0].abs().sum() > 0)
    # each token counted once per MoE layer and top-k slot, not again by the recompute
    assert counts[0] == counts[1] and all(sum(c) == 2 * 16 * 2 for c in counts[1].values())


def test_topk_teacher_with_the_whole_vocabulary_is_the_teacher(work, trained):
    """--teacher-topk >= vocabulary caches the teacher's log-probs of every token: the same loss as the live teacher
    up to float summation order (step 1, before any update, to 1e-5; later steps drift apart because Adam's first
    updates are sign-like, so rounding-level gradient differences flip tiny components); a small k trains too, and
    its resume recomputes the cache to the same bits."""
    root, src = work
    full_cfg, _, full_recs = trained
    recs = []
    qat_train.run(_cfg(root, src, "topk-all", teacher_topk=10**6), progress=recs.append)  # k capped at the vocabulary
    assert recs[0]["kl"] == pytest.approx(full_recs[0]["kl"], rel=1e-5)
    assert recs[0]["ce"] == pytest.approx(full_recs[0]["ce"], rel=1e-6)
    assert [r["kl"] for r in recs] == pytest.approx([r["kl"] for r in full_recs], rel=0.1)
    a = load_file(str(Path(full_cfg.out) / "state" / qat_state.MODEL_FILE))
    b = load_file(str(root / "topk-all" / "state" / qat_state.MODEL_FILE))
    start = read_all(src)
    common = [k for k in a if k in start and start[k].shape == a[k].shape]
    assert len(common) > 20
    moved = sum(float((a[k].float() - start[k].float()).abs().sum()) for k in common)
    apart = sum(float((a[k].float() - b[k].float()).abs().sum()) for k in common)
    assert apart < 0.2 * moved  # the two runs stay far closer to each other than to the start

    small: list[dict] = []
    qat_train.run(_cfg(root, src, "topk8", teacher_topk=8), progress=small.append)
    # only the top-8 terms of the KL: another loss than the whole one
    assert all(math.isfinite(r["kl"]) and r["kl"] != f["kl"] for r, f in zip(small, full_recs))
    qat_train.run(_cfg(root, src, "topk8-stop", teacher_topk=8, stop_after=3, save_every=3))
    resumed: list[dict] = []
    qat_train.run(_cfg(root, src, "topk8-stop", teacher_topk=8, save_every=3), resume=root / "topk8-stop" / "state",
                progress=resumed.append)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in small[3:]]
    c = load_file(str(root / "topk8" / "state" / qat_state.MODEL_FILE))
    d = load_file(str(root / "topk8-stop" / "state" / qat_state.MODEL_FILE))
    assert all(torch.equal(c[k], d[k]) for k in c)
