"""The bench's results rows (pure): one row per configuration and arm from an ab-test report, the rows of
arms that could not run, the 4 KiB-page and huge-page ceilings, the measured huge-page share of the page
arms, amppatch against the fastest other arm, and the merge of an `--only` rerun into earlier results."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

from amppatch.abtest.result import AbTestResult
from bench.arms import ARMS, HUGEPAGE_ARMS, ArmDef
from bench.configs import RunGroup, all_configs


def rows_from_report(report: AbTestResult, group: RunGroup, arms: Sequence[ArmDef],
                     extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (configuration, arm) from an ab-test result."""
    by_threads = {s.threads: s for s in report.settings if s.test == "tg"}
    arm_records = {a.name: a for a in report.arms}
    comps = {(c.arm, c.setting): c for c in report.comparisons}
    diag = report.diagnostics
    rows = []
    for config in group.configs():
        setting = by_threads.get(config.threads)
        if setting is None:
            continue
        sid = setting.id
        for arm in arms:
            rec = arm_records.get(arm.name)
            st = rec.at(sid) if rec is not None else {}
            bw = st.get("bandwidth") or {}
            share = bw.get("share_of_ceiling")
            row: dict[str, Any] = {
                "config": config.to_json(),
                "arm": arm.name,
                "arm_label": arm.label,
                "median_tok_s": st.get("median_tok_s"),
                "ratio": None,
                "ci95": None,
                "verdict": None,
                "ceiling_pct": 100.0 * share if share is not None else None,
                "gb_per_s": bw.get("gb_per_s"),
                "ceiling_gbps": bw.get("ceiling_gbps"),
                "cv": st.get("cv"),
                "n": st.get("n"),
                "failed": st.get("failed"),
                "setting": sid,
                "build_dir": rec.build_dir if rec is not None else None,
                "bench_args": list(rec.bench_args) if rec is not None else None,
                "env": rec.env if rec is not None else None,
                "loadavg_start": diag.get("loadavg_start"),
                "loadavg_end": diag.get("loadavg_end"),
            }
            if arm.name == "stock":
                if st.get("median_tok_s") is not None:
                    row["ratio"] = 1.0
            else:
                comp = comps.get((arm.name, sid))
                if comp is not None:
                    row.update(ratio=comp.ratio, ci95=None if comp.ci95 is None else list(comp.ci95),
                               verdict=comp.verdict, resolution=comp.resolution, p_value=comp.p_value)
                    if comp.unavailable:
                        row["failed"] = row["failed"] or comp.unavailable
            if arm.name == "amppatch" and report.samples:
                row["vs_best_other"] = amppatch_vs_best_other(report.samples, sid, min_effect=report.min_effect)
            if extra:
                row.update(extra)
            rows.append(row)
    return rows


def amppatch_vs_best_other(raw: Sequence[dict[str, Any]], setting: str, *, min_effect: float | None = None,
                           seed: int = 0) -> dict[str, Any] | None:
    """The amppatch arm against the fastest arm that is not amppatch's (by median, stock included), paired by
    block from a report's raw samples (`AbTestResult.samples`): is amppatch "never measurably slower than any
    other arm"? The effect size is the run's own (`AbTestResult.min_effect`), else 0.03."""
    from amppatch.abtest import Sample, compare_arms

    min_effect = float(min_effect or 0.03)
    fields = {f.name for f in dataclasses.fields(Sample)}
    samples = [Sample(**{k: v for k, v in s.items() if k in fields}) for s in raw
               if s.get("setting") == setting and s.get("ns")]
    arms = {s.arm for s in samples}
    if "amppatch" not in arms:
        return None
    others = sorted(a for a in arms if not a.startswith("amppatch"))
    if not others:
        return None
    medians = {a: statistics.median(x.tok_s for x in samples if x.arm == a) for a in others}
    best = max(others, key=lambda a: medians[a])
    comp = compare_arms(samples, best, "amppatch", setting, min_effect=min_effect, seed=seed, n_boot=4000)
    if comp is None:
        return None
    return {"arm": best, "ratio": comp.ratio, "ci95": [comp.ci_low, comp.ci_high], "verdict": comp.verdict}


def small_page_ceiling(stream: Sequence[dict[str, Any]]) -> dict[int, float]:
    """Best stream read per thread count on 4 KiB pages (any prefetch setting): the ceiling of weights on
    4 KiB pages — an mmapped model's page cache always, malloc'd buffers (repack, AMX) unless THP is `always`.
    The THP figure is the ceiling of the huge-page arms."""
    best: dict[int, float] = {}
    for m in stream:
        if not m.get("thp") and m.get("gbps"):
            best[int(m["threads"])] = max(best.get(int(m["threads"]), 0.0), float(m["gbps"]))
    return best


def huge_page_ceiling(stream: Sequence[dict[str, Any]]) -> dict[int, float]:
    """Best stream read per thread count on transparent huge pages: the ceiling of the huge-page arms."""
    best: dict[int, float] = {}
    for m in stream:
        if m.get("thp") and m.get("gbps"):
            best[int(m["threads"])] = max(best.get(int(m["threads"]), 0.0), float(m["gbps"]))
    return best


def machine_ceilings(machine: dict[str, Any]) -> tuple[dict[int, float], dict[int, float]]:
    """results.json's (4 KiB-page, huge-page) stream ceilings per thread count. Files written before the
    huge-page one was recorded have the probe's best of all configurations, which is a huge-page one where
    THP is available (and the page arms run only there)."""
    def per_threads(data: Any) -> dict[int, float]:
        return {int(k): float(v) for k, v in (data or {}).items()}

    return (per_threads(machine.get("ceiling_4k_gbps")),
            per_threads(machine.get("ceiling_huge_gbps") or machine.get("ceiling_gbps")))


def add_page_shares(rows: list[dict[str, Any]], shares: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """`huge_page_share` (0..1 of the model file on huge pages once loaded, measured after the run) on the
    measured rows of every arm whose share was measured; None where its measurement failed."""
    for r in rows:
        if r["arm"] in shares and r.get("median_tok_s") is not None:
            r["huge_page_share"] = shares[r["arm"]].get("share")
    return rows


def add_page_ceiling(rows: list[dict[str, Any]], ceiling_4k: dict[int, float]) -> list[dict[str, Any]]:
    """Each measured row's bandwidth as % of the 4 KiB-page ceiling at its thread count (not for the arms
    that read their weights from huge pages: the THP ceiling is theirs)."""
    for r in rows:
        ceil = None if r["arm"] in HUGEPAGE_ARMS else ceiling_4k.get(int(r["config"]["threads"]))
        gbps = r.get("gb_per_s")
        r["ceiling_4k_gbps"] = ceil
        r["ceiling_4k_pct"] = 100.0 * gbps / ceil if ceil and gbps is not None else None
    return rows


def missing_rows(group: RunGroup, missing: dict[str, str]) -> list[dict[str, Any]]:
    """Rows for arms that could not run (so the table says why instead of silently shrinking)."""
    return [{"config": c.to_json(), "arm": name, "arm_label": name, "median_tok_s": None, "ratio": None,
             "ci95": None, "verdict": None, "ceiling_pct": None, "failed": f"not run: {reason}"}
            for c in group.configs() for name, reason in missing.items()]


def merge_rows(old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`new` replaces every old row of the configurations it covers; the rest stays (for --only)."""
    replaced = {r["config"]["id"] for r in new}
    kept = [r for r in old if r["config"]["id"] not in replaced]
    order = {c.id: i for i, c in enumerate(all_configs())}
    arm_order = {a: i for i, a in enumerate(ARMS)}
    return sorted([*kept, *new], key=lambda r: (order.get(r["config"]["id"], 999), arm_order.get(r["arm"], 99)))
