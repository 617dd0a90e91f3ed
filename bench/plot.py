"""roofline.png, next to results.json: per configuration, each arm's GB/s as a bar against the two sides of
its roofline — the kernel's in-cache rate and the stream-read ceilings on 4 KiB and on huge pages. Which
line a bar runs into says what holds that arm back: the kernel's own speed, or the pages its weights sit on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amppatch.paths import save_figure_atomic
from bench.arms import ARMS, arm_def
from bench.rows import machine_ceilings

NCOLS = 4


@dataclass(frozen=True)
class Bar:
    arm: str
    gbps: float
    huge_pages: bool  # its weights sit on huge pages (held to the huge-page ceiling)


@dataclass
class ConfigBars:
    config: str
    threads: int
    in_cache_gbps: float
    ceiling_4k_gbps: float | None
    ceiling_huge_gbps: float | None
    bars: list[Bar] = field(default_factory=list)


def roofline_bars(results: dict[str, Any]) -> list[ConfigBars]:
    """What roofline.png draws (pure): every configuration with a measured roofline and at least one
    measured arm, in the results' row order, its arms in registry order."""
    ceiling_4k, ceiling_huge = machine_ceilings(results.get("machine") or {})
    rooflines = results.get("rooflines") or {}
    out: dict[str, ConfigBars] = {}
    for r in results.get("rows", []):
        cid = r["config"]["id"]
        in_cache = (rooflines.get(cid) or {}).get("in_cache_gbps")
        if in_cache is None or r.get("gb_per_s") is None or r.get("median_tok_s") is None:
            continue
        threads = int(r["config"]["threads"])
        entry = out.setdefault(cid, ConfigBars(cid, threads, float(in_cache), ceiling_4k.get(threads),
                                               ceiling_huge.get(threads)))
        entry.bars.append(Bar(r["arm"], float(r["gb_per_s"]), arm_def(r["arm"]).huge_pages))
    order = {a: i for i, a in enumerate(ARMS)}
    for entry in out.values():
        entry.bars.sort(key=lambda b: order.get(b.arm, len(order)))
    return list(out.values())


def render_roofline_plot(results: dict[str, Any], path: Path) -> Path | None:
    """Draw roofline.png; returns its path, or None when no configuration has both a roofline and a
    measured arm."""
    configs = roofline_bars(results)
    if not configs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(NCOLS, len(configs))
    nrows = -(-len(configs) // ncols)
    # at least wide enough for the legend and the note above and below the panels
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(8.0, 3.6 * ncols), 3.3 * nrows + 0.6), squeeze=False)
    palette = plt.get_cmap("tab10")
    colors = {a: palette(i % 10) for i, a in enumerate(ARMS)}
    for ax in axes.flat[len(configs):]:
        ax.axis("off")
    for ax, config in zip(axes.flat, configs, strict=False):
        xs = range(len(config.bars))
        ax.bar(xs, [b.gbps for b in config.bars], color=[colors.get(b.arm, "0.5") for b in config.bars],
               edgecolor=["k" if b.huge_pages else "none" for b in config.bars], linewidth=1.2)
        ax.axhline(config.in_cache_gbps, color="crimson", lw=1.6, label="kernel, weights in cache")
        if config.ceiling_4k_gbps:
            ax.axhline(config.ceiling_4k_gbps, color="0.2", lw=1.2, ls="--", label="stream read, 4 KiB pages")
        if config.ceiling_huge_gbps:
            ax.axhline(config.ceiling_huge_gbps, color="0.2", lw=1.2, ls=":", label="stream read, huge pages")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([b.arm for b in config.bars], rotation=60, ha="right", fontsize=7)
        ax.set_title(config.config, fontsize=9)
        ax.set_ylabel("GB/s of weights", fontsize=8)
        top = max([config.in_cache_gbps, config.ceiling_4k_gbps or 0, config.ceiling_huge_gbps or 0,
                   *(b.gbps for b in config.bars)])
        ax.set_ylim(0, top * 1.12)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    legend: dict[str, Any] = {}
    for ax in axes.flat[: len(configs)]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.text(0.5, 0.005, "bars outlined in black: weights on huge pages (held to the huge-page ceiling)",
             ha="center", fontsize=7)
    height = 3.3 * nrows + 0.6
    fig.tight_layout(rect=(0, 0.25 / height, 1, 1 - 0.4 / height))
    return save_figure_atomic(fig, path, dpi=100)
