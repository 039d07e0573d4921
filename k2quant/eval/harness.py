"""The lm-eval adapter: one class that runs the same tasks, with identical settings, on any checkpoint.

Backends: ``hf`` loads the checkpoint with k2quant's own dequant-on-load loader into transformers'
DeepseekV3 and hands the module and tokenizer to lm-eval's ``HFLM``; ``vllm`` hands the directory
to lm-eval's vLLM backend; ``api`` scores a served OpenAI-compatible ``/v1/completions`` endpoint
(``local-completions``). k2quant's own tasks (``k2quant_*``) are YAML in ``k2quant/eval/tasks``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

from k2quant.errors import K2QuantError, collect
from k2quant.formats import load

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"
#: set before anything from HF is imported: no hub, no dataset or metric downloads, no worker pools
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_EVALUATE_OFFLINE": "1", "DISABLE_MULTIPROC": "1"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BACKENDS = ("hf", "vllm", "api")
def offline_env() -> None:
    """Set the HF offline variables (an explicit user setting wins)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Everything that must be identical between the baseline and every candidate."""

    tasks: tuple[str, ...] = ("k2quant_ppl", "k2quant_mc")
    backend: str = "hf"
    limit: int | float | None = None
    batch_size: int = 16
    max_length: int = 512
    num_fewshot: int | None = None
    dtype: str = "float32"
    seed: int = 0
    text_files: tuple[str, ...] = ()
    #: backend pass-through, e.g. (("tensor_parallel_size", "8"), ("enable_expert_parallel", "True"))
    backend_args: tuple[tuple[str, str], ...] = ()
    #: one base URL per checkpoint, in argument order (``api`` backend only)
    base_urls: tuple[str, ...] = ()
    measure_tokens: int = 16384
    use_cache: bool = True
    #: let vllm run Python code shipped inside a checkpoint (``--trust-remote-code``); off unless asked
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.backend not in BACKENDS:
            problems.append(f"unknown backend {self.backend!r}; use one of {list(BACKENDS)}")
        if self.dtype not in DTYPES:
            problems.append(f"unknown dtype {self.dtype!r}; use one of {list(DTYPES)}")
        if not self.tasks:
            problems.append("no tasks given; pass --tasks, e.g. k2quant_ppl,k2quant_mc")
        if self.batch_size < 1 or self.max_length < 2:
            problems.append(f"batch size {self.batch_size} / max length {self.max_length} must be >= 1 / >= 2")
        if problems:
            raise K2QuantError("eval settings: " + "; ".join(problems))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class LoadedModel:
    """A checkpoint as the harness sees it: lm-eval's model spec, plus the torch module (hf only)."""

    model: Any  # an lm-eval LM object, or a registry name ("vllm", "local-completions")
    model_args: dict[str, Any]
    module: torch.nn.Module | None = None
    tokenizer: Any = None


def _hf(path: Path, index: int, s: EvalSettings) -> LoadedModel:
    from lm_eval.models.huggingface import HFLM

    tok = load.load_tokenizer(path)  # first: a missing tokenizer fails before the weights are read
    module = load.load_model(path, dtype=DTYPES[s.dtype])
    lm = HFLM(pretrained=module, tokenizer=tok, batch_size=s.batch_size, max_length=s.max_length)
    return LoadedModel(lm, {"pretrained": str(path), "dtype": s.dtype, "loader": "k2quant"}, module, tok)


def _vllm(path: Path, index: int, s: EvalSettings) -> LoadedModel:
    args: dict[str, Any] = {"pretrained": str(path), "tokenizer": str(path), "dtype": "auto",
                            "max_model_len": s.max_length, "add_bos_token": True,
                            "trust_remote_code": s.trust_remote_code,
                            "seed": s.seed, "tensor_parallel_size": 1}
    return LoadedModel("vllm", args | _typed(s.backend_args))


def _api(path: Path, index: int, s: EvalSettings) -> LoadedModel:
    if index >= len(s.base_urls):
        raise K2QuantError(f"{path}: the api backend needs one --base-url per checkpoint (in argument order); "
                           f"got {len(s.base_urls)} for checkpoint #{index + 1}")
    args: dict[str, Any] = {"model": path.name, "base_url": s.base_urls[index], "tokenizer": str(path),
                            "tokenizer_backend": "huggingface", "tokenized_requests": True,
                            "max_length": s.max_length, "add_bos_token": True, "num_concurrent": 8,
                            "max_retries": 3, "seed": s.seed}
    return LoadedModel("local-completions", args | _typed(s.backend_args))


LOADERS: dict[str, Callable[[Path, int, EvalSettings], LoadedModel]] = {"hf": _hf, "vllm": _vllm, "api": _api}


def _typed(pairs: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """``key=value`` strings as Python values where they parse (8 -> int, True -> bool), else strings."""
    out: dict[str, Any] = {}
    for key, raw in pairs:
        low = raw.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
            continue
        for cast in (int, float):
            try:
                out[key] = cast(raw)
                break
            except ValueError:
                continue
        else:
            out[key] = raw
    return out


def check_inputs(paths: list[Path], s: EvalSettings) -> None:
    """Fail before any evaluation starts: every directory a checkpoint, with a tokenizer, one URL each (api)."""
    problems = []
    for p in paths:
        if not (p / "config.json").exists():
            problems.append(f"{p}: not a checkpoint directory (no config.json); pass the directory that holds "
                            f"config.json and the *.safetensors shards")
        elif s.backend != "vllm" and (problem := load.missing_tokenizer(p)) is not None:
            problems.append(problem)
    unknown = Harness(s).unknown_tasks()
    if unknown:
        problems.append(f"--tasks: unknown task(s) {unknown}; k2quant's own are k2quant_ppl, k2quant_mc, "
                        f"k2quant_piqa and k2quant_openbookqa, or name a task lm-eval lists (lm-eval ls tasks)")
    if s.backend == "api" and len(s.base_urls) != len(paths):
        problems.append(f"the api backend needs one --base-url per checkpoint (in argument order): got "
                        f"{len(s.base_urls)} for {len(paths)} checkpoints")
    collect(problems, K2QuantError)


class Harness:
    """Runs ``settings.tasks`` through lm-eval on one checkpoint at a time, identically for each."""

    def __init__(self, settings: EvalSettings, cache_dir: Path | None = None):
        offline_env()
        self.settings = settings
        self.cache_dir = cache_dir

    def load(self, path: str | Path, index: int = 0) -> LoadedModel:
        """The checkpoint as the backend sees it (``index`` = its position on the command line)."""
        path = Path(path)
        if not (path / "config.json").exists():
            raise K2QuantError(f"{path}: not a checkpoint directory (no config.json); pass the directory that "
                               f"holds config.json and the *.safetensors shards")
        return LOADERS[self.settings.backend](path, index, self.settings)

    def task_manager(self):
        from lm_eval.tasks import TaskManager

        own = all(t.startswith("k2quant_") for t in self.settings.tasks)
        meta = {"k2quant_text_files": list(self.settings.text_files)} if self.settings.text_files else None
        return TaskManager(include_path=str(TASKS_DIR), include_defaults=not own, metadata=meta)

    def unknown_tasks(self) -> list[str]:
        """Tasks (or groups) lm-eval does not know, before any checkpoint is loaded."""
        known = set(self.task_manager().all_tasks)
        return [t for t in self.settings.tasks if t not in known]

    def cache_path(self, path: Path, loaded: LoadedModel) -> str | None:
        """One request-cache database per checkpoint and settings (lm-eval's cache key ignores the model)."""
        if not (self.settings.use_cache and self.cache_dir):
            return None
        idx = path / "model.safetensors.index.json"
        stamp = idx.stat().st_mtime_ns if idx.exists() else (path / "config.json").stat().st_mtime_ns
        ident = json.dumps([str(path.resolve()), stamp, self.settings.to_json(),
                            {k: str(v) for k, v in loaded.model_args.items()}], sort_keys=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return str(self.cache_dir / f"{path.name}-{hashlib.sha1(ident.encode()).hexdigest()[:16]}")

    def run(self, path: str | Path, loaded: LoadedModel) -> dict:
        """lm-eval's full result dict (with ``samples``) for one loaded checkpoint."""
        import lm_eval

        s = self.settings
        res = lm_eval.simple_evaluate(
            model=loaded.model, model_args=None if not isinstance(loaded.model, str) else loaded.model_args,
            tasks=list(s.tasks), task_manager=self.task_manager(), num_fewshot=s.num_fewshot,
            batch_size=s.batch_size, limit=s.limit, log_samples=True, use_cache=self.cache_path(Path(path), loaded),
            random_seed=s.seed, numpy_random_seed=s.seed, torch_random_seed=s.seed, fewshot_random_seed=s.seed,
            verbosity="ERROR")
        if res is None:
            raise K2QuantError(f"{path}: lm-eval returned no results (not rank 0?); run eval in a single process")
        return res


def write_raw(res: dict, out_dir: Path) -> list[Path]:
    """lm-eval's outputs as its CLI writes them: ``results.json`` plus ``samples_<task>.jsonl``."""
    from lm_eval.utils import handle_non_serializable

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.json"]
    body = {k: v for k, v in res.items() if k != "samples"}
    written[0].write_text(json.dumps(body, indent=2, default=handle_non_serializable))
    for task, rows in res.get("samples", {}).items():
        p = out_dir / f"samples_{task}.jsonl"
        p.write_text("".join(json.dumps(r, default=handle_non_serializable) + "\n" for r in rows))
        written.append(p)
    return written
