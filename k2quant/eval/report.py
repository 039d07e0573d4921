"""The degradation report: per-task metrics with recovery and paired errors, flips, direct measures.

Recovery is candidate/baseline x 100 for higher-is-better metrics and baseline/candidate x 100 for
lower-is-better ones (perplexities, bits per byte), so 100% always means "no change" and lower is worse.
Standard errors of deltas are *paired* over the same documents (matched on ``doc_id``).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from k2quant.eval.measures import DirectMeasures

#: metrics whose per-document values are (loglikelihood, count) pairs: how their delta moves with R
RATIO_AGGREGATIONS = {"word_perplexity": "ppl", "byte_perplexity": "ppl", "bits_per_byte": "bpb"}


@dataclasses.dataclass(frozen=True)
class CandidateValue:
    value: float
    delta: float
    delta_se: float | None
    recovery_pct: float | None


@dataclasses.dataclass(frozen=True)
class MetricRow:
    task: str
    metric: str
    higher_is_better: bool
    n: int
    baseline: float
    candidates: tuple[CandidateValue, ...]


@dataclasses.dataclass(frozen=True)
class Flips:
    """Paired multiple-choice outcomes of one candidate on one task (``acc``, matched by doc_id)."""

    task: str
    n: int
    right_to_wrong: int
    wrong_to_right: int
    same_choice_pct: float | None  # None when no document pairs up
    mcnemar_p: float


@dataclasses.dataclass
class EvalReport:
    baseline: str
    candidates: list[str]
    settings: dict
    rows: list[MetricRow]
    flips: dict[str, list[Flips]]  # candidate label -> per task
    direct: dict[str, DirectMeasures]  # candidate label -> measures (hf backend only)
    direct_note: str = ""
    seconds: float = 0.0
    raw: dict[str, str] = dataclasses.field(default_factory=dict)  # label -> raw output dir

    def to_json(self) -> dict:
        return {"baseline": self.baseline, "candidates": self.candidates, "settings": self.settings,
                "seconds": round(self.seconds, 2), "raw_outputs": self.raw,
                "metrics": [_row_json(r, self.candidates) for r in self.rows],
                "flips": {c: [dataclasses.asdict(f) for f in fl] for c, fl in self.flips.items()},
                "direct": {c: m.to_json() for c, m in self.direct.items()}, "direct_note": self.direct_note,
                "min_recovery_pct": self.min_recovery()}

    def min_recovery(self) -> float | None:
        """The worst recovery over every task, metric and candidate (None when nothing is comparable)."""
        vals = [c.recovery_pct for r in self.rows for c in r.candidates if c.recovery_pct is not None]
        return min(vals) if vals else None

    def write(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        p = out_dir / "results.json"
        p.write_text(json.dumps(self.to_json(), indent=2, allow_nan=False, default=str))
        return p


def _row_json(r: MetricRow, labels: list[str]) -> dict:
    return {"task": r.task, "metric": r.metric, "higher_is_better": r.higher_is_better, "n": r.n,
            "baseline": json_number(r.baseline),
            "candidates": {lab: {k: json_number(v) for k, v in dataclasses.asdict(c).items()}
                           for lab, c in zip(labels, r.candidates)}}


def json_number(v: float | None) -> float | str | None:
    """A float for JSON, which has no inf or nan: those are written as the strings "inf", "nan"."""
    return v if v is None or math.isfinite(v) else str(v)


# -- rows ----------------------------------------------------------------------------------------
def recovery(base: float, cand: float, higher_is_better: bool) -> float | None:
    """100 * cand/base (higher is better) or 100 * base/cand (lower is better); None if undefined."""
    num, den = (cand, base) if higher_is_better else (base, cand)
    if den == 0 or not (math.isfinite(num) and math.isfinite(den)):
        return None
    return 100.0 * (num / den)  # the ratio first: equal values give exactly 100


def metric_rows(base: dict, cands: list[dict]) -> list[MetricRow]:
    """One row per (task, metric) of the baseline's lm-eval results, in result order."""
    rows = []
    for task, metrics in base["results"].items():
        hib = base.get("higher_is_better", {}).get(task, {})
        n = int(base.get("n-samples", {}).get(task, {}).get("effective", 0))
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            higher = bool(hib.get(metric, True))
            cvals = tuple(_candidate(base, c, task, key, metric, filt, higher) for c in cands)
            rows.append(MetricRow(task, metric, higher, n, float(value), cvals))
    return rows


def _candidate(base: dict, cand: dict, task: str, key: str, metric: str, filt: str,
               higher: bool) -> CandidateValue:
    b, c = float(base["results"][task][key]), float(cand["results"][task][key])
    pairs = paired_values(base.get("samples", {}).get(task, []), cand.get("samples", {}).get(task, []), metric, filt)
    se = paired_se(pairs, metric, c) if pairs else None
    return CandidateValue(c, c - b, se, recovery(b, c, higher))


def paired_values(bs: list[dict], cs: list[dict], metric: str, filt: str) -> list[tuple]:
    """``[(baseline value, candidate value)]`` of a metric per document, matched on doc_id."""
    cmap = {(s["doc_id"], s.get("filter", "none")): s for s in cs}
    out = []
    for s in bs:
        other = cmap.get((s["doc_id"], s.get("filter", "none")))
        if other is not None and s.get("filter", "none") == filt and metric in s and metric in other:
            out.append((s[metric], other[metric]))
    return out


def paired_se(pairs: list[tuple], metric: str, cand_value: float) -> float | None:
    """Standard error of (candidate - baseline) over the same documents.

    Mean metrics: std(d_i)/sqrt(n). Perplexity-type metrics, whose documents carry (loglik, count):
    ratio estimator R = sum(dll_i)/sum(count_i) with its linearized error, then the delta method
    (ppl_c = ppl_b * exp(-R), bits_per_byte delta = -R/ln 2).
    """
    n = len(pairs)
    if n < 2:
        return None
    if isinstance(pairs[0][0], (list, tuple)):
        return _ratio_se(pairs, RATIO_AGGREGATIONS.get(metric, "ppl"), cand_value)
    d = [float(c) - float(b) for b, c in pairs]
    mean = sum(d) / n
    return math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)


def _ratio_se(pairs: list[tuple], kind: str, cand_value: float) -> float:
    n = len(pairs)
    d = [float(c[0]) - float(b[0]) for b, c in pairs]
    w = [float(b[1]) for b, _ in pairs]
    r = sum(d) / sum(w)
    se_r = math.sqrt(sum((di - r * wi) ** 2 for di, wi in zip(d, w)) * n / (n - 1)) / sum(w)
    return se_r / math.log(2) if kind == "bpb" else abs(cand_value) * se_r


# -- flips ---------------------------------------------------------------------------------------
def flips(task: str, bs: list[dict], cs: list[dict]) -> Flips:
    """Right->wrong and wrong->right on ``acc``, same-choice %, exact McNemar p (two-sided)."""
    cmap = {s["doc_id"]: s for s in cs}
    n = r2w = w2r = same = 0
    for s in bs:
        o = cmap.get(s["doc_id"])
        if o is None or "acc" not in s:
            continue
        n += 1
        r2w += int(s["acc"] > 0 and o["acc"] == 0)
        w2r += int(s["acc"] == 0 and o["acc"] > 0)
        same += int(_choice(s) == _choice(o))
    return Flips(task, n, r2w, w2r, 100.0 * same / n if n else None, mcnemar_p(r2w, w2r))


def _choice(sample: dict) -> int:
    lls = [r[0] if isinstance(r, (list, tuple)) else r for r in sample["filtered_resps"]]
    return max(range(len(lls)), key=lambda i: float(lls[i]))


def mcnemar_p(n01: int, n10: int) -> float:
    """Exact McNemar: 2 * BinomCDF(min(n01, n10); n01 + n10, 1/2), capped at 1."""
    m = n01 + n10
    if m == 0:
        return 1.0
    k = min(n01, n10)
    return min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m)


def all_flips(base: dict, cand: dict) -> list[Flips]:
    """Flips for every multiple-choice task of the run."""
    out = []
    for task, cfg in base.get("configs", {}).items():
        if cfg.get("output_type") == "multiple_choice" and task in base.get("samples", {}):
            out.append(flips(task, base["samples"][task], cand.get("samples", {}).get(task, [])))
    return out
