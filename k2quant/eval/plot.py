"""PNG plot of a weight diff: SQNR and relative error per layer, one line per tensor class."""
from __future__ import annotations

import math
from pathlib import Path

from k2quant.errors import K2QuantError
from k2quant.eval.diff import DiffReport

Series = dict[str, list[tuple[int, float, float]]]  # class -> [(layer, sqnr dB, rel. error)]


def layer_series(rep: DiffReport) -> tuple[Series, list[str]]:
    """Per-class points over the numbered layers, and the classes that are identical everywhere."""
    series: Series = {}
    for (layer, cls), s in sorted(rep.groups().items(), key=lambda kv: (kv[0][1], kv[0][0] or -1)):
        if layer is not None:
            series.setdefault(cls, []).append((layer, s.sqnr_db, s.rel_error))
    identical = sorted(c for c, pts in series.items() if all(p[2] == 0.0 for p in pts))
    return {c: pts for c, pts in series.items() if c not in identical}, identical


def plot_layers(rep: DiffReport, path: str | Path) -> Path:
    """Write ``path`` (PNG): per-layer SQNR (dB; lossless layers drawn on a dotted top line) and rel. error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise K2QuantError("--plot needs matplotlib: pip install matplotlib") from None
    series, identical = layer_series(rep)
    finite = [p[1] for pts in series.values() for p in pts if math.isfinite(p[1])]
    top = max(finite) + 10 if finite else 100.0
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for cls, pts in series.items():
        xs = [p[0] for p in pts]
        ax1.plot(xs, [min(p[1], top) for p in pts], marker="o", label=cls)
        ax2.plot(xs, [p[2] for p in pts], marker="o", label=cls)
    ax1.axhline(top, color="grey", linestyle=":", linewidth=1)
    ax1.text(0.01, top, " identical (inf dB)", transform=ax1.get_yaxis_transform(), fontsize=7, color="grey",
             va="bottom")
    ax1.set_ylabel("SQNR (dB)")
    ax1.set_title(f"{Path(rep.b).name} vs {Path(rep.a).name}", fontsize=10)
    if identical:
        fig.text(0.01, 0.005, "identical in every layer: " + ", ".join(identical), fontsize=7, color="grey")
    ax2.set_ylabel("relative error")
    ax2.set_xlabel("layer")
    ax2.xaxis.get_major_locator().set_params(integer=True)
    if series:
        ax1.legend(fontsize=7, ncol=3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
