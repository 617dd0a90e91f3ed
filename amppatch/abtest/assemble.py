"""ab-test's diagnostics and report assembly: per-arm summaries, bandwidth, latency, the LLC pass, noise
warnings and the report.json record (layout: docs/report-schema.md; key order is the file's order)."""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from amppatch import __version__, stats
from amppatch.abtest.analysis import Sample, per_round_medians
from amppatch.abtest.execute import _bench_argv, arm_threads
from amppatch.abtest.hostload import busy_processes
from amppatch.abtest.options import SCHEMA_VERSION, AbTestOptions, Setting, _Arm
from amppatch.abtest.probes import ceiling_for, parse_perf_llc
from amppatch.limit import ModelRoofline, SettingRates
from amppatch.machine import cpu_model
from amppatch.proc import run
from amppatch.weightpages import WeightPages

if TYPE_CHECKING:
    from amppatch.abtest.runner import Setup
    from amppatch.gguf_info import TokenBytes
    from amppatch.limit import KernelRun


@dataclass
class Timed:
    """What the timed rounds produced, with the host load read around them."""

    failures: dict[tuple[str, str], str]
    loadavg_start: dict[str, Any] | None
    cpufreq: dict[str, Any]
    ticks_before: dict[int, tuple[str, int]]
    latency_note: str
    samples: list[Sample] = field(default_factory=list)
    rounds: int = 0
    resumed_rounds: int = 0  # of `rounds`, those an earlier sitting recorded (its checkpoint)
    resumed_seconds: float = 0.0  # wall time the earlier sittings spent on this race (its checkpoint)
    stopped_because: str = ""
    interrupted: bool = False
    traces: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    trace_errors: list[str] = field(default_factory=list)
    timed_seconds: float = 0.0
    ticks_after: dict[int, tuple[str, int]] = field(default_factory=dict)
    usage: dict[str, float] | None = None
    loadavg_end: dict[str, Any] | None = None
    correctness: list[dict[str, Any]] = field(default_factory=list)
    cache_seconds: float = 0.0
    kernels: KernelRun | None = None  # the roofline's measured side (None: not measured)


def _setting_entry(arm: _Arm, setting: Setting, samples: list[Sample], timed: Timed, token_bytes: TokenBytes,
                   ceiling: dict[int, float] | None, warnings: list[str]) -> dict[str, Any]:
    """One arm at one setting: summary, drift, bandwidth and latency; noise warnings go to `warnings`."""
    key = (arm.spec.name, setting.id)
    mine = [s for s in samples if s.arm == arm.spec.name and s.setting == setting.id]
    entry: dict[str, Any] = {"setting": setting.id, "failed": timed.failures.get(key)}
    if not mine:
        return entry
    tok = [s.tok_s for s in mine]
    summ = stats.summarize(tok)
    drift = stats.drift(per_round_medians(samples, arm.spec.name, setting.id))
    entry.update(
        n=summ.n, median_tok_s=summ.median, q1_tok_s=summ.q1, q3_tok_s=summ.q3, iqr_tok_s=summ.iqr,
        mean_tok_s=summ.mean, cv=summ.cv, samples_ns=[s.ns for s in mine], n_tokens=setting.n_tokens,
        drift={"spearman_rho": drift.spearman_rho, "p_value": drift.p_value,
               "slope_per_round": drift.slope_per_round, "n_rounds": drift.n_rounds},
    )
    if setting.test == "tg":
        gbps = token_bytes.total * summ.median / 1e9
        ceil, ceil_threads = ceiling_for(ceiling, arm_threads(arm.spec, setting))
        entry["bandwidth"] = {
            "gb_per_s": gbps,
            "ceiling_gbps": ceil,
            "ceiling_threads": ceil_threads,
            "share_of_ceiling": gbps / ceil if ceil else None,
        }
    else:
        entry["bandwidth"] = None  # prompt batches reuse each weight across tokens
    lat = timed.traces.get(key)
    if lat:
        entry["latency_ms"] = {"p50": stats.percentile(lat, 50) / 1e6,
                               "p99": stats.percentile(lat, 99) / 1e6, "n_tokens": len(lat)}
    if not math.isnan(summ.cv) and summ.cv > 0.10:
        warnings.append(f"{arm.spec.name} {setting.label}: CV {summ.cv:.1%} > 10 % — very noisy")
    if not math.isnan(drift.p_value) and drift.p_value < 0.05 and abs(drift.spearman_rho) >= 0.5:
        warnings.append(f"{arm.spec.name} {setting.label}: speed drifted across rounds "
                        f"(Spearman rho {drift.spearman_rho:+.2f}, {drift.slope_per_round:+.2%}/round)")
    return entry


def _arm_record(arm: _Arm, settings: tuple[Setting, ...], by_setting: dict[str, Any]) -> dict[str, Any]:
    first = by_setting[settings[0].id]
    meta = arm.bench_meta.get("first_record", {})
    return {
        "name": arm.spec.name,
        "build_dir": str(arm.build.dir),
        "commit": arm.build.manifest.get("commit"),
        "dirty_hash": arm.build.manifest.get("dirty_hash"),
        "bench_args": list(arm.spec.bench_args),
        "env": dict(arm.spec.env),
        "setting": settings[0].id,
        "median_tok_s": first.get("median_tok_s"),
        "samples_ns": first.get("samples_ns", []),
        "by_setting": by_setting,
        "llama_bench": {k: meta.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends",
                                                 "model_type", "model_size", "n_threads", "repack")},
        "compiler": arm.build.manifest.get("compiler_version"),
        "cflags": arm.build.manifest.get("cflags"),
        "kernel_cflags": arm.build.manifest.get("kernel_cflags"),
        "huge_pages": (arm.pages or WeightPages(0, "warmup", None, "no warmup of this arm ran")).to_json(),
    }


def _arm_records(setup: Setup, timed: Timed, token_bytes: dict[str, TokenBytes],
                 warnings: list[str]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every arm's record for the report and its per-setting noise diagnostics (`token_bytes` by setting
    id: a setting at a long depth reads more KV cache per token)."""
    arm_records = []
    diag_arms: dict[str, dict[str, Any]] = {}
    for arm in setup.arms:
        by_setting: dict[str, Any] = {}
        for setting in setup.settings:
            entry = _setting_entry(arm, setting, timed.samples, timed, token_bytes[setting.id], setup.ceiling,
                                   warnings)
            by_setting[setting.id] = entry
            diag_arms.setdefault(arm.spec.name, {})[setting.id] = {
                "cv": entry.get("cv"), "drift": entry.get("drift")}
        arm_records.append(_arm_record(arm, setup.settings, by_setting))
    return arm_records, diag_arms


def _llc_pass(setup: Setup, arm_records: list[dict[str, Any]], failures: dict[tuple[str, str], str]) -> None:
    """LLC misses per token, once per arm and tg setting. It runs after timing so perf never perturbs the
    timed runs."""
    options = setup.options
    perf = shutil.which("perf") or "perf"
    for arm, rec in zip(setup.arms, arm_records, strict=True):
        for setting in setup.settings:
            if setting.test != "tg" or (arm.spec.name, setting.id) in failures:
                continue
            argv = [perf, "stat", "-x", ",", "-e", "LLC-load-misses", "--", *_bench_argv(arm, options, setting, 1)]
            done = run(argv, env=arm.env, check=False, timeout=options.bench_timeout, what="perf stat")
            misses = parse_perf_llc(done.stderr)
            if misses is not None:
                # one warmup token plus one repetition of n tokens
                rec["by_setting"][setting.id]["llc_misses_per_token"] = misses / (setting.n_tokens + 1)


def _comparison_warnings(comps: list[dict[str, Any]], min_effect: float, warnings: list[str]) -> None:
    for comp in comps:
        if comp["ratio"] is None:
            continue
        if comp["n_a"] < 9 or comp["n_b"] < 9:
            warnings.append(f"{comp['arm']} vs {comp['baseline']} {comp['setting']}: fewer than 9 samples per "
                            "arm; the Mann–Whitney test and the CI are unreliable")
        if comp["n_blocks"] < 5:
            warnings.append(f"{comp['arm']} vs {comp['baseline']} {comp['setting']}: only {comp['n_blocks']} "
                            "blocks; the block bootstrap is coarse (run more rounds)")
        if comp["verdict"] == "inconclusive":
            warnings.append(f"{comp['arm']} vs {comp['baseline']} {comp['setting']}: the data cannot support a "
                            f"verdict at ±{min_effect:.0%} (resolution reached ±{comp['resolution']:.1%})")


def _host_warnings(options: AbTestOptions, timed: Timed, ncpu: int, warnings: list[str]) -> None:
    max_threads = max(options.threads)
    start = timed.loadavg_start
    if start and start["1min"] > max(ncpu - max_threads, 0) + 0.5:
        warnings.append(f"the machine was busy: load average {start['1min']:.2f} on {ncpu} CPUs with "
                        f"{max_threads} benchmark thread(s)")
    usage = timed.usage
    if usage and usage["others"] > 0.10:
        warnings.append(f"other processes used {usage['others']:.0%} of the machine's CPU capacity while "
                        f"timing (ab-test itself {usage['ours']:.0%})")
    if usage and usage["steal"] > 0.05:
        warnings.append(f"the hypervisor stole {usage['steal']:.0%} of the CPU time while timing")


def _bandwidth_json(token_bytes: TokenBytes, setup: Setup) -> dict[str, Any]:
    return {
        "bytes_per_token": token_bytes.total,
        "weights_whole": token_bytes.weights_whole,
        "experts_read": token_bytes.experts_read,
        "experts_total": token_bytes.experts_total,
        "n_expert": token_bytes.n_expert,
        "n_expert_used": token_bytes.n_expert_used,
        "gathered_rows": token_bytes.gathered_rows,
        "kv": token_bytes.kv,
        "context_len": token_bytes.context_len,
        "tied_embeddings": token_bytes.tied_embeddings,
        "gathered_tables": list(token_bytes.excluded),
        "ceiling_gbps": {str(k): v for k, v in setup.ceiling.items()} if setup.ceiling else None,
        "ceiling_note": setup.ceiling_note,
    }


def _environment_json(setup: Setup, ncpu: int) -> dict[str, Any]:
    uname = os.uname()
    info, arms = setup.info, setup.arms
    return {
        "cpu_model": setup.probe_cpu or cpu_model(),
        "cpus": ncpu,
        "kernel": f"{uname.sysname} {uname.release}",
        "machine": uname.machine,
        "python": sys.version.split()[0],
        "compilers": sorted({str(a.build.manifest.get("compiler_version")) for a in arms}),
        "commits": {a.spec.name: a.build.manifest.get("commit") for a in arms},
        "model": {"path": str(setup.options.model), "architecture": info.architecture,
                  "file_size": info.file_size, "types": info.type_histogram, "n_layer": info.n_layer,
                  "n_embd": info.n_embd, "n_expert": info.n_expert, "n_expert_used": info.n_expert_used},
    }


def _roofline_json(setup: Setup, timed: Timed, arm_records: list[dict[str, Any]]) -> dict[str, Any]:
    """report.json's `roofline`: the kernels' side measured on the first arm's build, the stream ceilings,
    and every arm's GB/s against the lower side, per tg setting."""
    if not setup.options.roofline:
        return ModelRoofline.unavailable("not measured (--no-roofline)").to_json()
    if timed.kernels is None:
        why = "the run was interrupted" if timed.interrupted else "no tg setting (a prompt batch is not n = 1)"
        return ModelRoofline.unavailable(f"not measured ({why})").to_json()
    rates = []
    for s in setup.settings:
        if s.test != "tg":
            continue
        arms = tuple((rec["name"], ((rec["by_setting"].get(s.id) or {}).get("bandwidth") or {}).get("gb_per_s"))
                     for rec in arm_records)
        rates.append(SettingRates(s.id, s.label, arm_threads(setup.arms[0].spec, s), arms))
    return timed.kernels.assemble(rates).to_json()


def build_report(setup: Setup, timed: Timed, comps: list[dict[str, Any]],
                 pair_comps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The report.json record of a run (key order is the file's order: keep it); `pair_comps` are the
    comparisons of `options.pairs` (other baselines than the first arm)."""
    from amppatch.gguf_info import bytes_per_token, generation_context

    options, settings = setup.options, setup.settings
    token_bytes = bytes_per_token(setup.info, context_len=generation_context(options.depth, options.tokens))
    at_setting = {s.id: bytes_per_token(setup.info, context_len=generation_context(s.depth, s.n_tokens))
                  for s in settings}
    warnings: list[str] = []
    arm_records, diag_arms = _arm_records(setup, timed, at_setting, warnings)
    if setup.llc_ok:
        _llc_pass(setup, arm_records, timed.failures)
    _comparison_warnings(comps + (pair_comps or []), options.min_effect, warnings)
    ncpu = os.cpu_count() or 1
    busy = busy_processes(timed.ticks_before, timed.ticks_after, timed.timed_seconds, exclude={os.getpid()})
    _host_warnings(options, timed, ncpu, warnings)
    headline = next((c for c in comps if c["setting"] == settings[0].id), comps[0] if comps else None)
    latency_note = timed.latency_note
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "amppatch", "version": __version__, "command": "ab-test"},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "options": options.to_json(),
        "verdict": headline["verdict"] if headline else "unavailable",
        "ratio": headline["ratio"] if headline else None,
        "ci95": headline["ci95"] if headline else None,
        "headline": {"arm": headline["arm"], "baseline": headline["baseline"], "setting": headline["setting"]}
        if headline else None,
        "settings": [{"id": s.id, "label": s.label, "test": s.test, "threads": s.threads,
                      "n_tokens": s.n_tokens, "depth": s.depth} for s in settings],
        "arms": arm_records,
        "comparisons": comps,
        "pair_comparisons": pair_comps or [],
        "correctness": timed.correctness,
        "bandwidth": _bandwidth_json(token_bytes, setup),
        "latency": {"available": bool(timed.traces), "note": latency_note if not timed.trace_errors
                    else f"{latency_note}; trace errors: {'; '.join(timed.trace_errors[:3])}"},
        "llc": {"available": setup.llc_ok, "note": setup.llc_note},
        "roofline": _roofline_json(setup, timed, arm_records),
        "diagnostics": {
            "per_arm": diag_arms,
            "loadavg_start": timed.loadavg_start,
            "loadavg_end": timed.loadavg_end,
            "cpufreq": timed.cpufreq,
            "busy_processes": busy,
            "cpu_usage": timed.usage,
            "warnings": warnings,
            "rounds": timed.rounds,
            "resumed_rounds": timed.resumed_rounds,
            "resumed_seconds": round(timed.resumed_seconds, 3),
            "blocks": len({s.block for s in timed.samples}),
            "stopped_because": timed.stopped_because,
            "page_cache_seconds": timed.cache_seconds,
            "timed_seconds": timed.timed_seconds,
            "failures": [{"arm": a, "setting": s, "reason": r} for (a, s), r in timed.failures.items()],
        },
        "environment": _environment_json(setup, ncpu),
        "samples": [asdict(s) | {"tok_s": s.tok_s} for s in timed.samples],
        "duration_s": time.monotonic() - setup.t0,
    }
