"""PNG plot of a weight diff: SQNR and relative error per layer, one line per tensor class."""
from __future__ import annotations

import math
from pathlib import Path

from k2quant.errors import K2QuantError
from k2quant.eval.diff import DiffReport


def plot_layers(rep: DiffReport, path: str | Path) -> Path:
    """Write ``path`` (PNG): per-layer SQNR (dB; lossless points drawn on the top edge) and rel. error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise K2QuantError("--plot needs matplotlib: pip install matplotlib") from None
    series: dict[str, list[tuple[int, float, float]]] = {}
    for (layer, cls), s in rep.groups().items():
        if layer is not None:
            series.setdefault(cls, []).append((layer, s.sqnr_db, s.rel_error))
    finite = [v for pts in series.values() for _, v, _ in pts if math.isfinite(v)]
    top = (max(finite) + 10) if finite else 100.0
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for cls, pts in sorted(series.items()):
        pts.sort()
        xs = [p[0] for p in pts]
        ax1.plot(xs, [min(p[1], top) for p in pts], marker="o", label=cls)
        ax2.plot(xs, [p[2] for p in pts], marker="o", label=cls)
    ax1.axhline(top, color="grey", linestyle=":", linewidth=1)
    ax1.annotate("identical (inf dB)", (0, top), xycoords=("axes fraction", "data"), fontsize=7,
                 color="grey", va="bottom")
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax1.set_ylabel("SQNR (dB)")
    ax1.set_title(f"{Path(rep.b).name} vs {Path(rep.a).name}" + ("" if finite else " (identical)"))
    ax2.set_ylabel("relative error")
    ax2.set_xlabel("layer")
    ax1.legend(fontsize=7, ncol=3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
