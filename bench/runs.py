"""The timed part of the bench: one interleaved ab-test run per (weight type, code path), every arm raced
against stock of its path, the runs sharing `--budget` by their expected cost; results.json and the
RESULTS.md table are rewritten after every run, so an interrupted bench keeps what it measured."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amppatch.errors import AmppatchError
from amppatch.proc import progress
from bench.arms import AMPPATCH_ARMS, ARMS, NO_AMX_TUNE, ArmDef, arms_for
from bench.builds import Context, arm_build, arm_build_of
from bench.configs import CODE_PATHS, RunGroup, all_configs, group_runs, parse_only, quick_configs
from bench.levers import measure_page_shares
from bench.measure import has_amx, measure_lock, race, read_json, thp_mode
from bench.options import BenchOptions, resolve_options
from bench.prepare import prepare
from bench.render import fmt, write_results
from bench.roofline import add_roofline, measure_rooflines
from bench.rows import (
    add_page_ceiling,
    add_page_shares,
    huge_page_ceiling,
    machine_ceilings,
    merge_rows,
    missing_rows,
    rows_from_report,
    small_page_ceiling,
)

if TYPE_CHECKING:
    from amppatch.machine import MachineInfo

SCHEMA_VERSION = 1
MIN_RUN_S = 150.0  # no run gets less of the budget than this, however little is left


def run_weights(groups: Sequence[RunGroup], model_bytes: dict[str, int]) -> dict[str, float]:
    """Expected cost of each run: bytes streamed per token × settings (a 2-thread token is cheaper, but
    one setting per thread count keeps the estimate simple and conservative)."""
    return {g.id: float(model_bytes.get(g.weight_type, 1)) * len(g.threads) for g in groups}


def time_share(remaining_s: float, weight: float, remaining_weights: Sequence[float], floor_s: float) -> float:
    """This run's share of what is left of the budget."""
    total = sum(remaining_weights) or 1.0
    return max(floor_s, remaining_s * weight / total)


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_results(options: BenchOptions, ctx: Context, machine: MachineInfo,
                rooflines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """results.json before this bench's runs: this machine, preparation and rooflines, with the runs, rows,
    labels, evidence and rooflines of the previous file kept (an `--only` rerun replaces just its rows)."""
    previous = read_json(options.results) or {}
    uname = os.uname()
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": "bench/compare.py",
        "command": options.command,
        "options": options.to_json(),
        "machine": {"cpu_model": machine.cpu_model, "cpus": os.cpu_count(), "kernel": f"{uname.sysname} "
                    f"{uname.release}", "arch": platform.machine(), "thp_mode": thp_mode(), "amx": has_amx(),
                    "ceiling_gbps": {str(k): v for k, v in machine.stream_ceiling_gbps.items()},
                    "latency_ns_4k": machine.latency_ns_4k},
        "arm_labels": {**(previous.get("arm_labels") or {}), **ctx.labels},
        "unavailable_arms": ctx.unavailable,
        "evidence": {**(previous.get("evidence") or {}), **json.loads(json.dumps(ctx.evidence, default=str))},
        "rooflines": {**(previous.get("rooflines") or {}), **rooflines},
        "notes": [
            "On this CPU there is no AMX: the native path's Q4_0 goes through CPU_REPACK (gemv) and Q8_0/F16 "
            "through ggml_vec_dot_*; the native rows are not AMX rows."
            + (" The amx rows run the AMX buffer's batch-1 kernels (what an AMX CPU generates tokens with), built "
               "with --amx-batch1." if "amx" in ctx.stock else "") if not has_amx() else
            "This CPU has AMX: the native path may route weights to the AMX buffer.",
        ],
        "runs": list(previous.get("runs") or []),
        "rows": list(previous.get("rows") or []),
    }
    results["machine"]["ceiling_4k_gbps"] = {str(k): v for k, v in small_page_ceiling(machine.stream).items()}
    results["machine"]["ceiling_huge_gbps"] = {str(k): v for k, v in huge_page_ceiling(machine.stream).items()}
    return results


def available_arms(ctx: Context, group: RunGroup) -> dict[str, str | None]:
    """Every arm of a run: None when it can run, else why not."""
    path = CODE_PATHS[group.code_path]
    available = {a: ctx.family_unavailable.get((path.build, a)) or ctx.unavailable.get(a) for a in ARMS}
    if path.build == "amx" and group.weight_type not in ctx.amx_types:
        available.update(dict.fromkeys(AMPPATCH_ARMS, NO_AMX_TUNE))  # its AMX kernel would run unpatched
    return available


def _record_path_unavailable(results: dict[str, Any], group: RunGroup, available: dict[str, str | None],
                             options: BenchOptions) -> None:
    """Rows saying why a run whose code path cannot run here was not run; rows measured on an earlier run
    stay."""
    why = {a: available[a] or "" for a in ARMS if a in options.arms or a == "stock"}
    measured = {(r["config"]["id"], r["arm"]) for r in results["rows"] if r.get("median_tok_s") is not None}
    rows = [r for r in missing_rows(group, why) if (r["config"]["id"], r["arm"]) not in measured]
    results["rows"] = merge_rows(results["rows"], rows)
    write_results(results, options)


def _print_rows(rows: Sequence[dict[str, Any]]) -> None:
    for r in rows:
        if r.get("median_tok_s") is not None:
            ci = r.get("ci95")
            progress(f"  {r['config']['id']:22s} {r['arm']:13s} {r['median_tok_s']:7.2f} tok/s  ratio "
                     f"{fmt(r.get('ratio'), '.3f')}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
                     + f"  {fmt(r.get('ceiling_pct'), '.0f')} % of ceiling, {fmt(r.get('roofline_pct'), '.0f')} % "
                     f"of roofline ({r.get('binds') or '?'} binds)")


def page_shares(ctx: Context, group: RunGroup, arms: Sequence[ArmDef]) -> dict[str, dict[str, Any]]:
    """After a run with page arms: the huge-page share of the model file for stock (first: the state the run
    left, which every mmap arm shared) and each page arm's build."""
    measured = [a for a in arms if a.name == "stock" or a.page_lever]
    if len(measured) < 2:
        return {}
    family = CODE_PATHS[group.code_path].build
    with measure_lock(f"huge-page share {group.id}"):
        return measure_page_shares({a.name: arm_build_of(ctx, family, a, group.weight_type) for a in measured},
                                   ctx.models[group.weight_type], bench_args={a.name: a.bench_args for a in measured},
                                   env={a.name: dict(a.env) for a in measured})


def run_group(ctx: Context, results: dict[str, Any], group: RunGroup, arms: Sequence[ArmDef],
              missing: dict[str, str], *, share: float, fixed: int | None) -> None:
    """Race one run's arms and merge its rows into `results` (written at once); a failed run is recorded
    as such and the bench goes on."""
    options = ctx.options
    family = CODE_PATHS[group.code_path].build
    spec = [(a.name, arm_build(ctx, family, a, group.weight_type), a.bench_args, a.env) for a in arms]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(options.work) / "reports" / f"{group.id.replace(':', '_').replace(',', '-')}-{stamp}"
    started = _utc_now()
    t0 = time.monotonic()
    try:
        report, gate_note = race(spec, ctx.models[group.weight_type], group.threads, out, options,
                      gate_model=ctx.gate_models[group.weight_type], max_time=share, rounds=fixed)
    except AmppatchError as exc:
        progress(f"bench: run {group.id} failed: {exc.message}")
        results["runs"] = [r for r in results["runs"] if r["group"] != group.id] + [
            {"group": group.id, "started_utc": started, "failed": exc.message}]
        return
    diag = report.diagnostics
    run_info = {"group": group.id, "started_utc": started, "duration_s": round(time.monotonic() - t0, 1),
                "report": str(out), "rounds": diag.get("rounds"), "stopped_because": diag.get("stopped_because"),
                "loadavg_start": diag.get("loadavg_start"), "loadavg_end": diag.get("loadavg_end"),
                "warnings": diag.get("warnings"), "max_time_s": None if fixed else round(share),
                "gate_note": gate_note,
                "correctness": [{"arm": c.arm, "mode": c.mode, "passed": c.passed, "detail": c.detail}
                                for c in report.correctness]}
    shares = page_shares(ctx, group, arms)
    if shares:
        run_info["page_shares"] = shares
    ceiling_4k, ceiling_huge = machine_ceilings(results["machine"])
    measured = add_page_ceiling(rows_from_report(report, group, arms, {"report": str(out)}), ceiling_4k)
    measured = add_roofline(add_page_shares(measured, shares), results["rooflines"], ceiling_4k, ceiling_huge)
    new_rows = measured + missing_rows(group, missing)
    results["rows"] = merge_rows(results["rows"], new_rows)
    results["runs"] = [r for r in results["runs"] if r["group"] != group.id] + [run_info]
    results["updated_utc"] = _utc_now()
    write_results(results, options)
    _print_rows(new_rows)


def run_bench(options: BenchOptions) -> Path:
    """The whole benchmark; returns the results.json path."""
    from amppatch.machine import probe_machine

    options = resolve_options(options)
    configs = parse_only(",".join(options.only)) if options.only else (
        quick_configs() if options.quick else all_configs())
    groups = group_runs(configs)
    families = {CODE_PATHS[g.code_path].build for g in groups}
    t_start = time.monotonic()
    progress(f"bench: {len(configs)} configuration(s) in {len(groups)} run(s): {', '.join(g.id for g in groups)}")
    with measure_lock("machine probe"):
        machine = probe_machine()
    ctx = prepare(options, families)
    rooflines = measure_rooflines(ctx, configs)
    progress(f"bench: preparation took {(time.monotonic() - t_start) / 60:.1f} min")
    results = new_results(options, ctx, machine, rooflines)
    weights = run_weights(groups, {wt: p.stat().st_size for wt, p in ctx.models.items()})
    for g in groups:  # a path that cannot run here takes no share of the budget
        if ctx.family_unavailable.get((CODE_PATHS[g.code_path].build, "stock")):
            weights[g.id] = 0.0
    budget_s = options.budget_minutes * 60
    t_runs = time.monotonic()
    for i, group in enumerate(groups):
        available = available_arms(ctx, group)
        if available["stock"] is not None:  # the whole code path cannot run here
            _record_path_unavailable(results, group, available, options)
            continue
        arms, missing = arms_for(group, options.arms, available, ctx.labels)
        used = time.monotonic() - t_runs
        share = time_share(budget_s - used, weights[group.id], [weights[g.id] for g in groups[i:]], MIN_RUN_S)
        fixed = options.rounds if options.rounds is not None else (2 if options.quick else None)
        progress(f"bench: run {i + 1}/{len(groups)} {group.id}: {len(arms)} arms "
                 + (f"{fixed} rounds" if fixed else f"max {share / 60:.1f} min"))
        run_group(ctx, results, group, arms, missing, share=share, fixed=fixed)
    results["updated_utc"] = _utc_now()
    write_results(results, options)
    progress(f"bench: done in {(time.monotonic() - t_start) / 60:.1f} min")
    return options.results
