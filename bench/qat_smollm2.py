"""QAT on a real pretrained model: SmolLM2-135M-Instruct, every Linear but lm_head in INT4 (kimi rule, group 32).

Training text: Shakespeare, the plays not held out (``gptq_smollm2.py prepare`` writes them, with the
evaluation tokens: held-out plays = in domain, the Python 3.11 manual = out of domain). Every candidate is
scored from the INT4 checkpoint it exported, read back through k2quant's loader, against the BF16 model:
mean KL(BF16 || candidate) per predicted token and perplexity, computed in fp32 over the whole vocabulary.

    python bench/gptq_smollm2.py prepare --out bench/out/gptq            # tokens (shared with the GPTQ bench)
    python bench/qat_smollm2.py starts                                   # RTN and GPTQ INT4 starts (kimi rule)
    python bench/qat_smollm2.py train --start rtn --tag rtn-qat          # 200 steps x 8 x 256, the CLI defaults
    python bench/qat_smollm2.py train --start gptq --tag gptq-qat
    python bench/qat_smollm2.py speed                                    # step time / peak RSS, fake quant on vs off
    python bench/qat_smollm2.py table                                    # bench/out/qat-smollm2/table.md

``train`` runs the real ``k2quant qat`` command line in a child process (its wall time is the run's), then
scores the export. Options not given are the command's defaults. ``--recipe linear`` is the selection.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gptq_smollm2 as g  # noqa: E402  (the shared SmolLM2 build, tokens and scoring)

from k2quant.formats import calibrate, convert, load  # noqa: E402
from k2quant.quant import gptq  # noqa: E402
from k2quant.quant import scheme as qscheme  # noqa: E402

OUT = Path("bench/out/qat-smollm2")
TOKENS = Path("bench/out/gptq")  # calib_plays/ and eval_ids.safetensors from gptq_smollm2.py prepare
RULE = "kimi"  # QAT's scale rule; the starts use it too, so QAT starts exactly from them


def _scheme():
    return qscheme.for_target("int4", scale_rule=RULE, targets=["Linear"], ignore=["lm_head"])


def starts() -> None:
    """RTN and GPTQ INT4 checkpoints of SmolLM2 (the starts QAT is compared from)."""
    src = g.smollm2()
    t0 = time.perf_counter()
    convert.convert(src, OUT / "rtn", "int4", _scheme(), force=True)
    t1 = time.perf_counter()
    calibrate.run(src, OUT / "gptq", _scheme(), calibrate.CalibConfig(data=(str(TOKENS / "calib_plays"),), samples=64,
                                                                      seq_len=256), gptq.GPTQConfig(), force=True)
    t2 = time.perf_counter()
    _merge({"rtn": {"seconds": round(t1 - t0, 1)}, "gptq": {"seconds": round(t2 - t1, 1)}})
    score(["rtn", "gptq"])


def train(start: str, tag: str, extra: list[str]) -> None:
    """``k2quant qat`` from the ``start`` checkpoint (bf16 = SmolLM2 itself), distilled from BF16."""
    src = g.smollm2() if start == "bf16" else OUT / start
    dst = OUT / tag
    cmd = [sys.executable, "-m", "k2quant", "qat", str(src), "--teacher", str(g.smollm2()), "--recipe", "linear",
           "--data", str(TOKENS / "calib_plays"), "--out", str(dst), "--steps", "200", "--seq-len", "256",
           "--batch-size", "8", "--log-jsonl", str(OUT / f"{tag}.jsonl"), *extra]
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "K2QUANT_BENCH": "1"})
    wall = time.perf_counter() - t0
    log = [json.loads(x) for x in (OUT / f"{tag}.jsonl").read_text().splitlines()]
    _merge({tag: {"seconds": round(wall, 1), "start": start, "args": extra,
                  "step_s_median": sorted(r["step_s"] for r in log)[len(log) // 2],
                  "tokens_per_s_median": sorted(r["tokens_per_s"] for r in log)[len(log) // 2]}})
    score([tag])


def score(names: list[str], n_eval: int | None = None) -> None:
    """KL to BF16 and perplexity of each exported checkpoint, both domains."""
    from safetensors.torch import load_file

    src = g.smollm2()
    models = {"bf16": g._model(src, None)}
    for name in names:
        sd = load.dequantized_state_dict(OUT / name)
        models[name] = g._model(src, {k: v for k, v in sd.items() if k != "lm_head.weight"})
    evals = {k: v[:n_eval] for k, v in load_file(str(TOKENS / "eval_ids.safetensors")).items()}
    res: dict = {}
    for domain, ids in evals.items():
        for k, v in g._score(models, ids).items():
            res.setdefault(k, {})[domain] = v
    _merge(res)
    print(table(), flush=True)


def _child_speed(fake_quant: bool, steps: int) -> dict:
    """In a child: build the student as ``k2quant qat`` does, run ``steps`` steps; step times and peak RSS."""
    from k2quant.qat import losses, masters as m, model as qm
    from k2quant.qat.config import QatConfig

    cfg = QatConfig(src=str(g.smollm2()), data=[], out="", targets=["Linear"], ignore=["lm_head"], seq_len=256,
                    fake_quant=fake_quant)
    student, teacher = qm.build_models(cfg, cfg.scheme())
    ids = torch.randint(0, 49152, (steps, cfg.batch_size, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    cache = losses.TopkTeacher(cfg.teacher_topk)
    for x in ids:
        cache.add(teacher, x)
    del teacher
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ms = m.Masters(student)
    opt = torch.optim.AdamW(ms.masters, lr=cfg.lr)
    times = []
    for x in ids:
        t0 = time.perf_counter()
        loss, _ = losses.losses(cfg, student, cache, x)
        loss.backward()
        ms.grads_to_masters()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ms.masters_to_params()
        times.append(time.perf_counter() - t0)
    return {"step_s": times, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "rss_before_training_gb": rss0 / 2**20}


def speed(steps: int, rounds: int) -> None:
    """Step time and peak RSS with fake quant vs without, alternating child processes (same inputs)."""
    runs: dict[str, list] = {"fake_quant": [], "plain": []}
    for _ in range(rounds):
        for name in runs:
            out = subprocess.run([sys.executable, __file__, "_child", "--fq", str(int(name == "fake_quant")),
                                  "--speed-steps", str(steps)], check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    res = {}
    for name, rs in runs.items():
        steady = sorted(t for r in rs for t in r["step_s"][1:])  # the first step warms up
        res[name] = {"step_s_median": steady[len(steady) // 2], "tokens_per_s": 8 * 256 / steady[len(steady) // 2],
                     "peak_rss_gb": max(r["peak_rss_gb"] for r in rs)}
    res["ratio"] = {"step_time": res["fake_quant"]["step_s_median"] / res["plain"]["step_s_median"],
                    "peak_rss": res["fake_quant"]["peak_rss_gb"] / res["plain"]["peak_rss_gb"]}
    _merge({"speed": res})
    print(json.dumps(res, indent=1))


def _merge(new: dict) -> None:
    p = OUT / "results.json"
    OUT.mkdir(parents=True, exist_ok=True)
    old = json.loads(p.read_text()) if p.exists() else {}
    for k, v in new.items():
        old.setdefault(k, {}).update(v)
    p.write_text(json.dumps(old, indent=1))


def table() -> str:
    res = json.loads((OUT / "results.json").read_text())
    base = res.get("rtn", {})
    rows = ["| checkpoint | Shakespeare KL | ppl | Python manual KL | ppl | KL gap recovered (Sh. / Py.) | wall s |",
            "|---|---|---|---|---|---|---|"]
    for k, r in res.items():
        if "shakespeare" not in r:
            continue
        s, p = r["shakespeare"], r["python-manual"]
        rec = ""
        if k not in ("bf16", "rtn") and "shakespeare" in base:
            rec = " / ".join(f"{1 - r[d]['kl'] / base[d]['kl']:.0%}" for d in ("shakespeare", "python-manual"))
        rows.append(f"| {k} | {s['kl']:.4f} | {s['ppl']:.2f} | {p['kl']:.4f} | {p['ppl']:.2f} | {rec} | "
                    f"{r.get('seconds', '')} |")
    text = "\n".join(rows)
    (OUT / "table.md").write_text(text + "\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("starts", "train", "score", "speed", "table", "_child"))
    ap.add_argument("--start", default="rtn", help="rtn, gptq (from `starts`) or bf16")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--names", nargs="*", default=[])
    ap.add_argument("--eval-seqs", type=int, default=None)
    ap.add_argument("--speed-steps", type=int, default=6, help="speed: steps per child process")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fq", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a, extra = ap.parse_known_args()
    torch.set_num_threads(a.threads)
    if a.stage == "starts":
        starts()
    elif a.stage == "train":
        train(a.start, a.tag or f"{a.start}-qat", extra)
    elif a.stage == "score":
        score(a.names, a.eval_seqs)
    elif a.stage == "speed":
        speed(a.speed_steps, a.rounds)
    elif a.stage == "_child":
        print(json.dumps(_child_speed(bool(a.fq), a.speed_steps)))
    else:
        print(table())


if __name__ == "__main__":
    main()
