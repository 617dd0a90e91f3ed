"""roofline.png: per setting, each arm's achieved GB/s as a bar under the horizontal lines of the limit — the
weight kernels' in-cache rate and the machine's stream-read ceilings on 4 KiB and on huge pages. Drawn from
the roofline record alone (`amppatch.limit.ModelRoofline`), like report.png from report.json."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from amppatch.limit import ModelRoofline
from amppatch.paths import save_figure_atomic

ROOFLINE_PNG = "roofline.png"
_LINES = (("in_cache", "in cache (kernel)", "tab:red", "-"), ("4k", "stream, 4 KiB pages", "tab:blue", "--"),
          ("huge", "stream, huge pages", "tab:green", ":"))


def plot_note(part: ModelRoofline | None) -> str | None:
    """Why no roofline.png is drawn for this record, or None when it is."""
    if part is None:
        return "not drawn (the report has no roofline)"
    if not part.available or not part.settings:
        return f"not drawn (roofline {part.note})"
    if importlib.util.find_spec("matplotlib") is None:
        return "not drawn (matplotlib is not installed)"
    return None


def render_roofline_png(part: ModelRoofline, path: Path) -> Path:
    """Draw roofline.png (one panel per setting); the caller checked `plot_note(part) is None`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = part.settings
    panel = max(4.2, 1.8 + 1.2 * max(len(s.arms) for s in settings))
    fig, axes = plt.subplots(1, len(settings), figsize=(panel * len(settings), 4.4), squeeze=False, sharey=True)
    for ax, s in zip(axes[0], settings, strict=True):
        names = [a for a, _ in s.arms]
        values = [g or 0.0 for _, g in s.arms]
        bars = ax.bar(range(len(names)), values, color="0.6", width=0.6)
        for bar, (_, g) in zip(bars, s.arms, strict=True):
            share = s.share(g)
            if share is not None:
                ax.annotate(f"{share:.0%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names)
        levels = {"in_cache": s.in_cache_gbps, "4k": s.ceilings.page_4k_gbps, "huge": s.ceilings.huge_gbps}
        for key, label, color, style in _LINES:
            value = levels[key]
            if value:
                ax.axhline(value, color=color, ls=style, lw=1.4, label=f"{label} {value:.1f}")
        ax.set_title(f"{s.label}: {s.binds or 'unknown side'} binds", fontsize=10)
        ax.set_ylabel("GB/s read (bytes per token × tok/s)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure_atomic(fig, path)
