"""The calibration curve as a PNG: quality against KV bytes per sequence and against TTFT, one point per setting
(coloured by vision keep rate), the chosen setting marked. With task accuracy as the quality, a second row shows
the teacher-forced next-token agreement."""

from __future__ import annotations

from pathlib import Path

from dynllava.calib.select import quality
from dynllava.calib.sweep import Row

_LABELS = {"accuracy": "task accuracy", "agreement": "next-token agreement with keep-all"}


def plot_sweep(rows: list[Row], metric: str, path: Path, chosen: Row | None = None, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r.vision_keep_rate for r in rows}, reverse=True)
    colours = plt.get_cmap("viridis")
    panels = [("kv_bytes", "KV cache per sequence (KiB)", 1 / 1024)]
    if all(r.ttft_s is not None for r in rows):
        panels.append(("ttft_s", "time to first token, batch 1 (ms)", 1000.0))
    metrics = [metric] + (["agreement"] if metric == "accuracy" else [])
    fig, axes = plt.subplots(len(metrics), len(panels), figsize=(6 * len(panels), 4.2 * len(metrics)),
                             squeeze=False)
    for row_axes, shown in zip(axes, metrics):
        for ax, (field, label, scale) in zip(row_axes, panels):
            for i, rate in enumerate(rates):
                group = sorted((r for r in rows if r.vision_keep_rate == rate), key=lambda r: getattr(r, field))
                style = "o-" if field == "kv_bytes" else "o"  # measured times are noisy: points, not a line
                ax.plot([getattr(r, field) * scale for r in group], [quality(r, shown) for r in group], style,
                        color=colours(i / max(len(rates) - 1, 1)), label=f"vision keep {rate:g}", markersize=4)
            if chosen is not None:
                ax.plot(getattr(chosen, field) * scale, quality(chosen, shown), "*", color="red", markersize=16,
                        label=f"chosen (vision {chosen.vision_keep_rate:g}, t {chosen.threshold:.3g})", zorder=5)
            ax.set_xlabel(label)
            ax.set_ylabel(_LABELS[shown])
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or f"quality vs memory{' and latency' if len(panels) > 1 else ''}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
