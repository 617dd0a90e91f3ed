"""tune.png: the landscape tune searched, per site — ratio to "off" against prefetch distance, one line per hint,
95 % CIs as bars, the kept setting marked. A performance engineer looks at this before trusting a distance:
a sharp isolated peak is noise, a broad plateau is a setting that will survive another day's load."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amppatch.paths import save_figure_atomic


@dataclass(frozen=True)
class Point:
    distance: int
    ratio: float
    ci95: tuple[float, float] | None
    phase: str
    rounds: int


@dataclass
class SiteLandscape:
    key: str
    threads: int
    kept: bool
    reason: str
    lines: dict[int, list[Point]] = field(default_factory=dict)  # hint -> the best-measured point per distance
    others: list[Point] = field(default_factory=list)  # every other probe at the tuning thread count
    verified: dict[int, Point] = field(default_factory=dict)  # other thread count -> the winner's check
    winner: tuple[int, int] | None = None  # (distance, hint)


def landscapes(learned: dict[str, Any]) -> list[SiteLandscape]:
    """What tune.png draws, from a learned.json document (pure)."""
    threads = int(learned.get("threads") or 1)
    out: list[SiteLandscape] = []
    for site in learned.get("sites", []):
        land = SiteLandscape(site["key"], threads, bool(site.get("kept")), str(site.get("reason", "")))
        winner = site.get("winner")
        if winner:
            land.winner = (int(winner["distance_bytes"]), int(winner["hint"]))
        best: dict[tuple[int, int], Point] = {}
        for probe in learned.get("probes", []):
            if probe.get("site") != site["key"] or probe.get("ratio") is None:
                continue
            ci = probe.get("ci95")
            point = Point(int(probe["distance_bytes"]), float(probe["ratio"]),
                          (float(ci[0]), float(ci[1])) if ci else None, str(probe.get("phase", "")),
                          int(probe.get("rounds") or 0))
            if int(probe.get("threads", threads)) != threads:
                land.verified[int(probe["threads"])] = point
                continue
            slot = (int(probe["hint"]), point.distance)
            # the line goes through the most-measured probe of a setting (confirmation beats a coarse look)
            if slot not in best or point.rounds > best[slot].rounds:
                if slot in best:
                    land.others.append(best[slot])
                best[slot] = point
            else:
                land.others.append(point)
        for (hint, _), point in sorted(best.items()):
            land.lines.setdefault(hint, []).append(point)
        out.append(land)
    return out


def render_landscape(learned: dict[str, Any], path: Path) -> Path | None:
    """Draw tune.png next to learned.json; returns its path, or None when no probe was measured."""
    sites = [s for s in landscapes(learned) if s.lines]
    if not sites:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, axes = plt.subplots(len(sites), 1, figsize=(8.5, 3.6 * len(sites)), squeeze=False)
    for ax, site in zip(axes[:, 0], sites, strict=True):
        ax.axhline(1.0, color="0.4", lw=1, ls="--", label='"off" (no prefetch)')
        distances: set[int] = set()
        for hint, points in sorted(site.lines.items()):
            xs = [p.distance for p in points]
            distances.update(xs)
            ys = [p.ratio for p in points]
            err = [[max(p.ratio - p.ci95[0], 0) if p.ci95 else 0 for p in points],
                   [max(p.ci95[1] - p.ratio, 0) if p.ci95 else 0 for p in points]]
            ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=3, lw=1.2, label=f"hint {hint}")
        if site.others:
            ax.scatter([p.distance for p in site.others], [p.ratio for p in site.others], s=10, color="0.6",
                       zorder=1, label="other probes")
        if site.winner:
            d, h = site.winner
            kept = next((p for p in site.lines.get(h, []) if p.distance == d), None)
            if kept:
                ax.scatter([d], [kept.ratio], marker="*", s=260, color="gold", edgecolor="k", zorder=5,
                           label=f"kept: {d} B, hint {h}")
        for t, p in sorted(site.verified.items()):
            ax.errorbar([p.distance], [p.ratio], yerr=[[p.ratio - p.ci95[0]], [p.ci95[1] - p.ratio]] if p.ci95
                        else None, marker="D", mfc="none", capsize=3, ls="none", label=f"check at {t} threads")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sorted(distances)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{d}" for d in sorted(distances)], rotation=45, fontsize=7)
        ax.set_xlabel("prefetch distance (bytes ahead)")
        ax.set_ylabel(f"tok/s ratio to off ({site.threads} thread{'s' if site.threads > 1 else ''})")
        verdict = "kept" if site.kept else "dropped"
        ax.set_title(f"{site.key} — {verdict}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure_atomic(fig, path)
