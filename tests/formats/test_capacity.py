"""``k2quant plan``: hand-computed bytes, agreement with the converter's plan, Kimi K2's published facts.

Expected values are written as arithmetic from the dims, independently of ``capacity``'s code.
"""
from __future__ import annotations

import json
from math import ceil

import pytest
from click.testing import CliRunner

from k2quant.cli import options
from k2quant.cli.plan import plan
from k2quant.errors import FormatError, K2QuantError, SchemeError
from k2quant.formats import capacity, tiny
from k2quant.formats import plan as fplan
from k2quant.formats.checkpoint import Checkpoint
from k2quant.quant.names import FORMATS
from k2quant.quant import scheme as qscheme

MIB, GIB = 2**20, 2**30
H200 = 143771 * MIB  # nvidia-smi memory.total of an H200

# -- tiny config, by hand ---------------------------------------------------------------------------
# TINY_CONFIG: hidden 320, vocab 1024, 3 layers (layer 0 dense, intermediate 416), 8 routed + 1 shared
# experts of moe_intermediate 96, q_lora 192, kv_lora 128, heads 4 x (nope 32 + rope 32), v 32.
H, V = 320, 1024
NORMS = (H + H + 192 + 128) * 2  # input, post_attention, q_a_layernorm, kv_a_layernorm (BF16) per layer
Q_A, Q_B, KV_A, KV_B, O = 192 * H, 256 * 192, 160 * H, 256 * 128, H * 128  # params; q_b 4*(32+32), kv_a 128+32
DENSE = 3 * 416 * H
EXPERT = 3 * 96 * H
ROUTER = 8 * H * 2 + 8 * 4  # BF16 weight + FP32 e_score_correction_bias
EMBED = V * H * 2  # embed_tokens and lm_head each
FP8_SCALES = {  # F32 scale grids ceil(N/128) x ceil(K/128)
    "attn": 4 * (2 * 3 + 2 * 2 + 2 * 3 + 2 * 1 + 3 * 1),  # q_a 192x320, q_b 256x192, kv_a 160x320, kv_b 256x128, o 320x128
    "dense": 4 * (4 * 3 + 4 * 3 + 3 * 4),  # gate/up 416x320, down 320x416
    "expert": 4 * (1 * 3 + 1 * 3 + 3 * 1),  # gate/up 96x320, down 320x96
}
# INT4 g32 per routed expert: gate/up [96, 320] -> packed I32 [96, 40], scale BF16 [96, 10], shape I64 [2];
# down [320, 96] -> packed [320, 12], scale [320, 3], shape [2]
INT4_EXPERT = 2 * (96 * 40 * 4 + 96 * 10 * 2 + 16) + (320 * 12 * 4 + 320 * 3 * 2 + 16)
ATTN = Q_A + Q_B + KV_A + KV_B + O

TINY_BYTES = {
    "bf16": 2 * EMBED + H * 2 + 3 * (NORMS + 2 * ATTN) + 2 * DENSE + 2 * (ROUTER + 9 * 2 * EXPERT),
    "fp8": 2 * EMBED + H * 2 + 3 * (NORMS + ATTN + FP8_SCALES["attn"]) + DENSE + FP8_SCALES["dense"]
    + 2 * (ROUTER + 9 * (EXPERT + FP8_SCALES["expert"])),
    "int4": 2 * EMBED + H * 2 + 3 * (NORMS + 2 * ATTN) + 2 * DENSE + 2 * (ROUTER + 2 * EXPERT + 8 * INT4_EXPERT),
}
TINY_KV_PER_TOKEN = 3 * (128 + 32) * 2  # layers x (kv_lora_rank + qk_rope_head_dim) x BF16


@pytest.fixture
def tiny_config(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(tiny.TINY_CONFIG))
    return p


def test_tiny_weight_bytes_by_hand(tiny_config):
    model = capacity.read_model(tiny_config)
    assert {f: model.weights[f].total for f in TINY_BYTES} == TINY_BYTES
    assert model.weights["bf16"].scales == 0
    assert model.weights["fp8"].scales == 3 * FP8_SCALES["attn"] + FP8_SCALES["dense"] + 18 * FP8_SCALES["expert"]
    assert model.weights["int4"].scales == 16 * ((96 * 10 * 2 + 16) * 2 + 320 * 3 * 2 + 16)
    assert model.sizes_from == "config"
    assert model.params == V * H * 2 + H + 3 * (NORMS // 2 + ATTN) + DENSE + 2 * (8 * H + 8 + 9 * EXPERT)


def test_tiny_per_gpu_split_by_hand(tiny_config):
    """TP 2 x EP 2 = 4 GPUs; batch 3 -> the fullest EP group serves 2 requests."""
    model = capacity.read_model(tiny_config)
    cluster = capacity.make_cluster(4, capacity.Gpu("test", 8 * MIB), tp=2, ep=2)
    report = capacity.plan(model, cluster, context=1000, batch=3, reserve=0.25)
    # replicated: every norm, router weight + bias, q_a_proj and kv_a_proj_with_mqa
    replicated = 3 * NORMS + H * 2 + 2 * ROUTER + 3 * 2 * (Q_A + KV_A)
    # TP-split: q_b, kv_b, o, dense MLP, shared experts, embed_tokens, lm_head
    tp = 3 * 2 * (Q_B + KV_B + O) + 2 * DENSE + 2 * 2 * EXPERT + 2 * EMBED
    routed = 2 * 8 * 2 * EXPERT  # 8 experts over 4 GPUs: 2 per GPU -> a quarter
    weights = replicated + ceil(tp / 2) + routed // 4
    kv = TINY_KV_PER_TOKEN * 1000 * 2
    reserve = 2 * MIB
    bf16 = report.formats[0]
    assert bf16.format == "bf16"
    assert (bf16.weight_bytes_per_gpu, bf16.kv_bytes_per_gpu, bf16.reserve_bytes) == (weights, kv, reserve)
    assert bf16.total_bytes_per_gpu == weights + kv + reserve
    assert bf16.headroom_bytes == 8 * MIB - (weights + kv + reserve)
    assert bf16.fits
    free = 8 * MIB - reserve - weights
    assert bf16.max_context == free // (TINY_KV_PER_TOKEN * 2)
    assert bf16.max_batch == free // (TINY_KV_PER_TOKEN * 1000) * 2
    assert report.kv_bytes_per_token == TINY_KV_PER_TOKEN


def test_tiny_uneven_experts(tiny_config):
    """8 experts over 3 GPUs (TP 3): the fullest GPU holds ceil(8 / 3) = 3 experts of each MoE layer."""
    model = capacity.read_model(tiny_config, ("bf16",))
    r = capacity.plan(model, capacity.make_cluster(3, capacity.Gpu("test", 8 * MIB)), 10, formats=("bf16",))
    replicated = 3 * NORMS + H * 2 + 2 * ROUTER + 3 * 2 * (Q_A + KV_A)
    tp = 3 * 2 * (Q_B + KV_B + O) + 2 * DENSE + 2 * 2 * EXPERT + 2 * EMBED
    assert r.formats[0].weight_bytes_per_gpu == replicated + ceil(tp / 3) + 2 * 3 * 2 * EXPERT
    assert "8 routed experts do not split evenly over 3 GPUs; the fullest GPU holds 3 per MoE layer" in r.notes


def test_tiny_fp8_kv_and_dcp(tiny_config):
    """FP8 KV halves the per-token bytes; DCP 2 stores half of each request's tokens on a rank."""
    model = capacity.read_model(tiny_config, ("fp8",))
    cluster = capacity.make_cluster(2, capacity.Gpu("test", 8 * MIB), dcp=2)
    r = capacity.plan(model, cluster, context=1001, batch=3, formats=("fp8",), kv_dtype="fp8")
    assert r.kv_bytes_per_token == 3 * (128 + 32) * 1
    assert r.formats[0].kv_bytes_per_gpu == 3 * 160 * 1 * 501 * 3  # ceil(1001 / 2) tokens x 3 requests
    assert r.context == 1001 and (r.cluster.dcp, r.cluster.tp) == (2, 2)


def test_tiny_default_context_is_max_position_embeddings(tiny_config):
    r = capacity.estimate(tiny_config, capacity.make_cluster(1, capacity.GPUS["H100"]))
    assert r.context == tiny.TINY_CONFIG["max_position_embeddings"] == 4096


# -- agreement with the converter's plan and the written files, to the byte ---------------------------
@pytest.mark.parametrize("src", ["bf16", "fp8", "int4"])
def test_headers_agree_with_make_plan_and_files(tiny_dirs, src):
    """From each stored format: our weights == make_plan(...).dst_bytes (what inspect reports) for every
    target; the source's own format == the bytes actually stored; the config-only path agrees too."""
    ckpt = Checkpoint(tiny_dirs[src])
    from_headers = capacity.read_model(tiny_dirs[src])
    from_config = capacity.read_model(tiny_dirs[src] / "config.json")
    assert from_headers.sizes_from == "headers" and from_config.sizes_from == "config"
    for target in FORMATS:
        exact = fplan.make_plan(ckpt, target, qscheme.for_target(target)).dst_bytes
        assert from_headers.weights[target].total == exact == from_config.weights[target].total == TINY_BYTES[target]
    assert from_headers.weights[src].total == ckpt.total_bytes()


def test_mtp_layer_counted_in_size_not_per_gpu(tmp_path):
    """An MTP layer (index == num_hidden_layers) is in the checkpoint bytes but not loaded for serving."""
    import torch

    cfg = tiny.config_for("bf16", num_nextn_predict_layers=1)
    tensors = tiny.encode(tiny.random_weights(cfg), "bf16")
    mtp = {"model.layers.3.eh_proj.weight": torch.zeros(H, 2 * H, dtype=torch.bfloat16),
           "model.layers.3.enorm.weight": torch.ones(H, dtype=torch.bfloat16)}
    d = tiny.write_checkpoint(tmp_path / "mtp", tensors | mtp, cfg)
    cluster = capacity.make_cluster(1, capacity.Gpu("test", 64 * MIB))
    with_mtp = capacity.estimate(d, cluster, 10, formats=("bf16",))
    without = capacity.estimate(tiny_config_path(tmp_path), cluster, 10, formats=("bf16",))
    mtp_bytes = H * 2 * H * 2 + H * 2
    assert with_mtp.formats[0].weight_bytes == TINY_BYTES["bf16"] + mtp_bytes
    assert with_mtp.formats[0].weight_bytes_per_gpu == without.formats[0].weight_bytes_per_gpu
    assert f"MTP layer tensors ({mtp_bytes:,} B in BF16)" in " ".join(with_mtp.notes)


def tiny_config_path(tmp_path):
    p = tmp_path / "plain.json"
    p.write_text(json.dumps(tiny.TINY_CONFIG))
    return p


# -- Kimi K2: public dims, published sizes and fit claims ---------------------------------------------
KIMI = dict(tiny.TINY_CONFIG, hidden_size=7168, num_hidden_layers=61, first_k_dense_replace=1, n_routed_experts=384,
            n_shared_experts=1, num_experts_per_tok=8, moe_intermediate_size=2048, intermediate_size=18432,
            num_attention_heads=64, num_key_value_heads=64, q_lora_rank=1536, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=163840,
            tie_word_embeddings=False, max_position_embeddings=262144)
KH = 7168
K_ATTN = {"q_a": (1536, KH), "q_b": (64 * 192, 1536), "kv_a": (576, KH), "kv_b": (64 * 256, 512), "o": (KH, 64 * 128)}
K_DENSE = [(18432, KH), (18432, KH), (KH, 18432)]
K_EXPERT = [(2048, KH), (2048, KH), (KH, 2048)]
K_NORMS = 61 * (KH + KH + 1536 + 512) + KH
K_PARAMS = (2 * 163840 * KH + K_NORMS + 61 * sum(n * k for n, k in K_ATTN.values()) + sum(n * k for n, k in K_DENSE)
            + 60 * (384 * KH + 384 + 385 * sum(n * k for n, k in K_EXPERT)))


def _fp8(shapes):
    return sum(n * k + 4 * ceil(n / 128) * ceil(k / 128) for n, k in shapes)


def _int4(shapes):
    return sum(n * (k // 8) * 4 + n * (k // 32) * 2 + 16 for n, k in shapes)


K_PLAIN = 2 * (2 * 163840 * KH + K_NORMS + 60 * 384 * KH) + 60 * 384 * 4  # BF16 embed/head/norms/router, FP32 bias
K_BYTES = {
    "bf16": 2 * K_PARAMS + 60 * 384 * 2,  # router bias is FP32: 2 more bytes per element
    "fp8": K_PLAIN + 61 * _fp8(K_ATTN.values()) + _fp8(K_DENSE) + 60 * 385 * _fp8(K_EXPERT),
    "int4": K_PLAIN + 61 * 2 * sum(n * k for n, k in K_ATTN.values()) + 2 * sum(n * k for n, k in K_DENSE)
    + 60 * (2 * sum(n * k for n, k in K_EXPERT) + 384 * _int4(K_EXPERT)),
}


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    p = tmp_path_factory.mktemp("kimi") / "config.json"
    p.write_text(json.dumps(KIMI))
    return capacity.read_model(p)


def _kimi_plan(kimi, gpus, context, **kw):
    count, gpu = options.parse_gpus(gpus)
    return {p.format: p for p in capacity.plan(kimi, capacity.make_cluster(count, gpu), context, **kw).formats}


def test_kimi_exact_bytes(kimi):
    assert kimi.params == K_PARAMS == 1_026_408_232_448
    assert {f: w.total for f, w in kimi.weights.items()} == K_BYTES
    # the INT4 spec's own figure (spec/int4_compressed_tensors.md section 2): 24,772,656 B per expert
    assert _int4(K_EXPERT) == 24_772_656
    assert capacity.kv_bytes_per_token(KIMI, "bf16") == 61 * (512 + 64) * 2 == 70_272


def test_kimi_published_sizes(kimi):
    """BF16 ~2 TB and FP8 ~1 TB are 2 and 1 bytes x the parameter count *rounded to 1T*; the true count is
    1.0264T, so those two may differ by that rounding plus 0.5 % (FP8 keeps embeddings, lm_head, router and
    norms in BF16: +0.23 %; its scales: +0.02 %). INT4 594 GB is the size of Kimi-K2-Thinking's files, which
    Hugging Face rounds to whole GB; 0.1 % allows that rounding and the safetensors headers."""
    rounding = K_PARAMS - 10**12
    assert abs(kimi.weights["bf16"].total - 2 * 10**12) <= 2 * rounding + 0.005 * 2 * 10**12
    assert abs(kimi.weights["fp8"].total - 10**12) <= rounding + 0.005 * 10**12
    assert abs(kimi.weights["int4"].total - 594 * 10**9) <= 0.001 * 594 * 10**9


def test_kimi_int4_256k_fits_8xh200(kimi):
    """Moonshot: the smallest unit for K2-Thinking INT4 at 256k on H200 is 8 GPUs with TP."""
    assert _kimi_plan(kimi, "8xH200", 262144)["int4"].fits
    assert not _kimi_plan(kimi, "4xH200", 262144)["int4"].fits


def test_kimi_fp8_128k_needs_16_gpus(kimi):
    """Moonshot: the smallest unit for K2 FP8 at 128k on H200 or H20 is 16 GPUs."""
    for gpu in ("H200", "H20"):
        assert not _kimi_plan(kimi, f"8x{gpu}", 131072)["fp8"].fits
        assert _kimi_plan(kimi, f"16x{gpu}", 131072)["fp8"].fits
    p = _kimi_plan(kimi, "8xH200", 131072)["fp8"]
    # per GPU: replicated q_a/kv_a (FP8 + scales), norms, router; an eighth of everything else
    replicated = 61 * (_fp8([K_ATTN["q_a"], K_ATTN["kv_a"]]) + 2 * (KH + KH + 1536 + 512)) + 2 * KH \
        + 60 * (384 * KH * 2 + 384 * 4)
    rest = K_BYTES["fp8"] - replicated
    assert p.weight_bytes_per_gpu == replicated + rest // 8  # rest divides by 8 exactly
    assert p.kv_bytes_per_gpu == 70_272 * 131072
    assert p.reserve_bytes == ceil(H200 * 0.1)
    assert p.max_context == (H200 - ceil(H200 * 0.1) - p.weight_bytes_per_gpu) // 70_272 == 84_437


def test_kimi_fp8_128k_disagreement_is_pinned(kimi):
    """Where we part from the published claim: with an FP8 KV cache or a reserve under ~7.8 %, FP8 at 128k
    does fit 8xH200 (batch 1). The claim assumes vLLM defaults: BF16 KV, 90 % memory utilization."""
    assert _kimi_plan(kimi, "8xH200", 131072, kv_dtype="fp8")["fp8"].fits
    assert _kimi_plan(kimi, "8xH200", 131072, reserve=0.07)["fp8"].fits
    assert not _kimi_plan(kimi, "8xH200", 131072, reserve=0.08)["fp8"].fits


def test_kimi_bf16_weights_alone_exceed_8xh200(kimi):
    p = _kimi_plan(kimi, "8xH200", 4096)["bf16"]
    assert not p.fits and p.max_context == 0 and p.max_batch == 0
    assert p.weight_bytes_per_gpu > H200


# -- parsing ---------------------------------------------------------------------------------------
def test_parsing():
    assert options.parse_tokens("256k") == 262144 and options.parse_tokens("128K") == 131072
    assert options.parse_tokens("1m") == 2**20 and options.parse_tokens("4096") == 4096
    assert options.parse_gpus("8xH200") == (8, capacity.GPUS["H200"])
    assert options.parse_gpus("16 x h100")[1].mem_bytes == 81559 * MIB
    assert options.parse_gpus("2xA100-80GB")[1].mem_bytes == 80 * GIB
    assert options.parse_gpus("4xMI300X")[1].mem_bytes == 205_822_885_888
    assert options.parse_gpus("8", "96GiB") == (8, capacity.Gpu("custom", 96 * GIB, "96GiB", "--gpu-mem"))
    assert options.parse_gpus("8xH200", "150GB")[1].mem_bytes == 150 * 10**9
    assert capacity.make_cluster(16, capacity.GPUS["H100"], tp=8) == capacity.make_cluster(
        16, capacity.GPUS["H100"], tp=8, ep=2)
    assert capacity.make_cluster(8, capacity.GPUS["H200"]).tp == 8


@pytest.mark.parametrize("call, message", [
    (lambda: options.parse_gpus("8xH300"),
     ("unknown GPU 'H300'; known: A100-40GB, A100, H100, H800, H20, H200, B200, MI300X. For another GPU give its "
     "memory with --gpu-mem (e.g. --gpu-mem 96GiB)")),
    (lambda: options.parse_gpus("eightxH200"),
     ("--gpus 'eightxH200': expected COUNTxNAME, e.g. 8xH200 or 16xH100 (or a count with --gpu-mem, e.g. "
     "--gpus 8 --gpu-mem 96GiB)")),
    (lambda: options.parse_gpus("8"), "--gpus '8' names no GPU; write COUNTxNAME (e.g. 8xH200) or add --gpu-mem"),
    (lambda: options.parse_gpus("8", "96"),
     ("--gpu-mem '96': expected a positive size with a unit, e.g. 141GiB (2**30 bytes) or 150GB (10**9 bytes); "
     "units: GB, GiB, MB, MiB, TB, TiB")),
    (lambda: options.parse_tokens("12q"),
     "--context '12q': expected a positive token count such as 131072, 128k or 1m (k = 1024 tokens)"),
    (lambda: capacity.make_cluster(16, capacity.GPUS["H100"], tp=8, ep=4),
     "--tp 8 x --ep 4 = 32 GPUs but --gpus says 16; choose --tp and --ep whose product is 16"),
    (lambda: capacity.make_cluster(8, capacity.GPUS["H100"], dcp=3),
     "--dcp 3 must divide --tp 8 (decode context parallel splits each TP group)"),
])
def test_input_errors_pinned(call, message):
    with pytest.raises(K2QuantError) as exc:
        call()
    assert str(exc.value) == message


def test_source_errors_pinned(tmp_path):
    cluster = capacity.make_cluster(1, capacity.GPUS["H100"])
    with pytest.raises(FormatError, match=r"^.*/empty: no config\.json; pass a checkpoint directory that holds "
                                          r"config\.json, or the config\.json file itself$"):
        (tmp_path / "empty").mkdir()
        capacity.estimate(tmp_path / "empty", cluster, 10)
    with pytest.raises(FormatError, match=r"/nope: no such file or directory; pass a checkpoint directory or its "
                                          r"config\.json$"):
        capacity.estimate(tmp_path / "nope", cluster, 10)
    bad = tmp_path / "llama.json"
    bad.write_text(json.dumps({"hidden_size": 4096, "num_hidden_layers": 32}))
    with pytest.raises(FormatError) as exc:
        capacity.estimate(bad, cluster, 10)
    assert str(exc.value).startswith(f"{bad}: missing or non-integer ['num_attention_heads', 'vocab_size', ")
    assert "k2quant plan needs a DeepseekV3/Kimi-K2 (MLA + MoE) config" in str(exc.value)
    ragged = tmp_path / "ragged.json"
    ragged.write_text(json.dumps(dict(tiny.TINY_CONFIG, moe_intermediate_size=100)))
    with pytest.raises(SchemeError) as exc:
        capacity.estimate(ragged, cluster, 10, formats=("int4",))
    assert str(exc.value) == ("model.layers.1.mlp.experts.0.down_proj.weight (and 15 more like it) has input dim 100, "
                              "not divisible by "
                              "the INT4 group size 32; this model cannot be planned in int4-g32")


# -- CLI ---------------------------------------------------------------------------------------------
def test_cli_table(tiny_dirs):
    result = CliRunner().invoke(plan, [str(tiny_dirs["fp8"]), "--gpus", "2xH100", "--context", "4k", "--batch", "2"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "sizes from real shard headers" in out
    assert "3 layers x 160 values x 2 B (bf16) = 960 B per token" in out
    assert "2 x H100 at 79.65 GiB each (driver-reported total; sold as 80GB); TP 2 x EP 1" in out
    assert "context 4,096 tokens x batch 2; reserve 10% of each GPU" in out
    assert out.count("fits") == 3 and "does not fit" not in out
    assert f"{TINY_BYTES['int4'] / 1e9:,.1f} GB" in out


def test_cli_verdicts(tiny_dirs):
    """One 6 MiB GPU, no reserve, 1700 tokens: BF16 weights alone exceed it, FP8 fits, INT4 (larger than FP8
    here: the tiny experts are a small share) is pushed over by its KV cache."""
    args = [str(tiny_dirs["bf16"]), "--gpus", "1", "--gpu-mem", "6MiB", "--context", "1700", "--reserve", "0"]
    result = CliRunner().invoke(plan, args)
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[0].strip(): [c.strip() for c in line.split("│")[1:]]
            for line in result.output.splitlines() if "│" in line}
    assert rows["verdict"] == ["does not fit (weights alone)", "fits", "does not fit"]
    free = {f: 6 * MIB - TINY_BYTES[f] for f in TINY_BYTES}
    assert rows["max context at batch 1"] == ["0", f"{free['fp8'] // TINY_KV_PER_TOKEN:,}",
                                              f"{free['int4'] // TINY_KV_PER_TOKEN:,}"]
    assert rows["KV cache per GPU (1,700 tok x 1 req)"] == [f"{1700 * TINY_KV_PER_TOKEN / GIB:,.2f} GiB"] * 3
    assert rows["reserve (0%)"] == ["0.00 GiB"] * 3
    assert "1 x custom at 0.01 GiB each (--gpu-mem 6MiB); TP 1 x EP 1" in result.output


def test_cli_json_matches_library(tiny_dirs):
    args = [str(tiny_dirs["int4"]), "--gpus", "4", "--gpu-mem", "8MiB", "--context", "2k", "--tp", "2", "--ep", "2",
            "--formats", "int4,bf16", "--kv-dtype", "fp8", "--reserve", "0.25", "--json"]
    result = CliRunner().invoke(plan, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [f["format"] for f in data["formats"]] == ["int4", "bf16"]
    assert data["formats"][0]["weight_bytes"] == TINY_BYTES["int4"]
    assert data["cluster"] == {"gpu": {"name": "custom", "mem_bytes": 8 * MIB, "label": "8MiB", "source": "--gpu-mem"},
                               "count": 4, "tp": 2, "ep": 2, "dcp": 1}
    assert (data["context"], data["batch"], data["reserve"], data["kv_bytes_per_token"]) == (2048, 1, 0.25, 3 * 160)
    cluster = capacity.make_cluster(4, capacity.Gpu("custom", 8 * MIB, "8MiB", "--gpu-mem"), 2, 2)
    expected = capacity.estimate(tiny_dirs["int4"], cluster, 2048, 1, ("int4", "bf16"), "fp8", 0.25)
    assert data == json.loads(json.dumps(expected.to_json()))


def test_cli_errors_are_k2quant_errors(tiny_dirs, tmp_path):
    runner = CliRunner()
    r = runner.invoke(plan, [str(tiny_dirs["bf16"]), "--gpus", "8xH300"])
    assert isinstance(r.exception, K2QuantError) and str(r.exception).startswith("unknown GPU 'H300'; known: ")
    r = runner.invoke(plan, [str(tmp_path), "--gpus", "8xH200"])
    assert isinstance(r.exception, FormatError) and "no config.json" in str(r.exception)
    r = runner.invoke(plan, [str(tiny_dirs["bf16"]), "--gpus", "8xH200", "--formats", "bf16,nf4"])
    assert isinstance(r.exception, K2QuantError)
    assert str(r.exception) == "unknown format 'nf4'; use one of ['bf16', 'fp8', 'int4']"
