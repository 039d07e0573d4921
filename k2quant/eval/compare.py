"""``k2quant eval``: the same lm-eval tasks and direct measures on a baseline and its candidates."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from k2quant.errors import K2QuantError
from k2quant.eval import harness, measures, report
from k2quant.eval.harness import EvalSettings, Harness

log = logging.getLogger(__name__)
#: progress(message) — one line per step, for the CLI's status display
Progress = Callable[[str], None]


def labels(paths: list[Path]) -> list[str]:
    """Short unique names for the checkpoints: the directory name, ``#2``-suffixed on repeats."""
    out: list[str] = []
    for p in paths:
        name = p.name or str(p)
        out.append(name if name not in out else f"{name}#{sum(o.split('#')[0] == name for o in out) + 1}")
    return out


def measure_texts(settings: EvalSettings) -> list[str]:
    """The text for the direct measures: the user's files, else the ``k2quant_ppl`` documents."""
    from k2quant.eval.tasks import sources

    return [d["text"] for d in sources.text_documents(list(settings.text_files) or None)]


class DirectRun:
    """Direct measures across checkpoints: keep the baseline's distributions, compare each candidate."""

    def __init__(self, settings: EvalSettings):
        self.settings = settings
        self.ref: measures.Reference | None = None
        self.windows: list = []
        self.vocab: dict | None = None
        self.results: dict[str, measures.DirectMeasures] = {}

    def add(self, name: str, path: Path, loaded: harness.LoadedModel) -> None:
        s = self.settings
        self.vocab = _same_tokenizer(self.vocab, loaded.tokenizer, path)
        if self.ref is None:
            self.windows = measures.token_windows(loaded.tokenizer, measure_texts(s), s.max_length, s.measure_tokens)
            self.ref = measures.reference(loaded.module, self.windows, s.batch_size)
        else:
            self.results[name] = measures.compare(self.ref, loaded.module, self.windows, s.batch_size)


def evaluate(baseline: str | Path, candidates: list[str | Path], settings: EvalSettings,
             out_dir: str | Path | None = None, progress: Progress | None = None) -> report.EvalReport:
    """Evaluate every checkpoint, write raw lm-eval outputs and ``results.json`` under ``out_dir``."""
    t0 = time.perf_counter()
    if not candidates:
        raise K2QuantError("eval needs a baseline and at least one candidate checkpoint: "
                           "k2quant eval BASELINE CANDIDATE...")
    paths = [Path(baseline)] + [Path(c) for c in candidates]
    harness.check_inputs(paths, settings)
    names = labels(paths)
    out = Path(out_dir) if out_dir else None
    h = Harness(settings, out / "cache" if out else None)
    say = progress or log.info
    results, raw, direct = [], {}, DirectRun(settings)
    for i, (path, name) in enumerate(zip(paths, names)):
        say(f"loading {name} ({settings.backend})")
        loaded = h.load(path, i)
        say(f"lm-eval {','.join(settings.tasks)} on {name}")
        results.append(h.run(path, loaded))
        if out:
            raw[name] = str(harness.write_raw(results[-1], out / "raw" / name)[0].parent)
        if loaded.module is not None:
            say(f"direct measures on {name}")
            direct.add(name, path, loaded)
        del loaded  # one model in memory at a time
    rep = report.EvalReport(
        baseline=names[0], candidates=names[1:],
        settings=settings.to_json() | {"checkpoints": dict(zip(names, map(str, paths)))},
        rows=report.metric_rows(results[0], results[1:]),
        flips={n: report.all_flips(results[0], r) for n, r in zip(names[1:], results[1:])},
        direct=direct.results, direct_note="" if direct.results else "direct measures need full "
        "next-token distributions: hf backend only", seconds=time.perf_counter() - t0, raw=raw)
    if out:
        rep.write(out)
    return rep


def _same_tokenizer(vocab: dict | None, tokenizer, path: Path) -> dict:
    """Direct measures compare token by token: every checkpoint must carry the baseline's vocabulary."""
    mine = tokenizer.get_vocab()
    if vocab is not None and mine != vocab:
        raise K2QuantError(f"{path}: tokenizer differs from the baseline's ({len(mine)} vs {len(vocab)} entries); "
                           f"checkpoints compared token by token must share one tokenizer: copy the baseline's")
    return mine
