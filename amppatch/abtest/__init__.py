"""ab-test: race two or more llama.cpp builds (or one build under two settings) fairly, and judge.

The order of events is what makes the numbers trustworthy on a noisy, shared machine:
1. correctness gate for every arm against the first (identical output for the same kernels, perplexity
   within a tolerance for different kernels by design) — a fast wrong binary is not a result;
2. the model is read once so the page cache holds it, then one warmup llama-bench run per arm (the first
   one watched for how much of the model file sits on huge pages);
3. rounds of randomized mirror-order blocks (A B B A, or a random permutation followed by its reverse for
   more arms), one block per setting, each slot one `llama-bench -o jsonl -r R` call; load that drifts
   during a block hits every arm alike, and the bootstrap resamples whole blocks;
4. the roofline of the model's weight kernels on the first arm's build (amppatch.limit; off with
   `roofline=False`, the command's `--no-roofline`), then statistics on the raw `samples_ns`
   (amppatch.stats), noise diagnostics, bandwidth, latency, report.

Arm syntax (``--arm``/``--a``/``--b``)::

    NAME=BUILD[::LLAMA-BENCH FLAGS][::VAR=VALUE]...

BUILD is a build directory (or its manifest.json) from `amppatch build`. A segment starting with ``-`` is
extra llama-bench flags for that arm (e.g. ``::--repack 0``); a segment ``VAR=VALUE`` sets an environment
variable for that arm. ``--a``/``--b`` take the same text without ``NAME=`` (their names are A and B).

The package, along the run's seams: `options` (arms, options, settings), `schedule` (mirror blocks),
`analysis` (samples and verdicts, pure), `result` (`AbTestResult`, the typed result `run_abtest` returns:
the one reader and writer of report.json; report.py imports only these two), `gating` (correctness-gate
plan), `hostload` (/proc and /sys readers), `probes` (stream ceiling, tracer, perf), `execute` (llama-bench
calls, warmup, one round), `runner` (setup, timed rounds, stop rule) and `assemble` (diagnostics, the
report document).
This module re-exports the names other modules use; a test that replaces a function must patch the module
that looks it up (`execute._run_bench`, `runner.stream_ceiling`); those two are deliberately not re-exported
here, so patching them on this package fails loudly instead of silently changing nothing.
"""

from __future__ import annotations

from amppatch.abtest.analysis import (
    Sample,
    analyze,
    analyze_pairs,
    compare_arms,
    comparison_json,
    per_round_medians,
    samples_by_block,
    samples_from_report,
    settings_from_report,
    slice_verdicts,
)
from amppatch.abtest.execute import (
    LlamaBenchExecutor,
    SlotExecutor,
    _bench_argv,
    _BenchFailed,
    arm_threads,
    page_cache,
    play_round,
    warmup,
)
from amppatch.abtest.gating import _flag_values, _gate_pairs, gate_args_for, kernel_signature
from amppatch.abtest.hostload import (
    _proc_cpu_ticks,
    busy_processes,
    cpu_usage,
    own_cpu_ticks,
    read_cpu_times,
    read_cpufreq,
    read_loadavg,
)
from amppatch.abtest.options import (
    DEFAULT_ROUNDS,
    GATE_MODES,
    MIN_ROUNDS,
    SCHEMA_VERSION,
    STOP_MIN_ROUNDS,
    STOP_RULE_N_BOOT,
    TESTS,
    AbTestOptions,
    ArmSpec,
    Setting,
    parse_arm,
    settings_for,
    validate,
)
from amppatch.abtest.probes import ceiling_for, llc_counter_status, load_tracer, parse_perf_llc
from amppatch.abtest.result import AbTestResult, ArmResult, Comparison, GateRecord, SettingRecord
from amppatch.abtest.runner import run_abtest, stop_rule
from amppatch.abtest.schedule import Slot, block_order, make_schedule, round_slots

__all__ = [
    "DEFAULT_ROUNDS",
    "GATE_MODES",
    "MIN_ROUNDS",
    "SCHEMA_VERSION",
    "STOP_MIN_ROUNDS",
    "STOP_RULE_N_BOOT",
    "TESTS",
    "AbTestOptions",
    "AbTestResult",
    "ArmResult",
    "ArmSpec",
    "Comparison",
    "GateRecord",
    "LlamaBenchExecutor",
    "Sample",
    "Setting",
    "SettingRecord",
    "Slot",
    "SlotExecutor",
    "_BenchFailed",
    "_bench_argv",
    "_flag_values",
    "_gate_pairs",
    "_proc_cpu_ticks",
    "analyze",
    "analyze_pairs",
    "arm_threads",
    "block_order",
    "busy_processes",
    "ceiling_for",
    "compare_arms",
    "comparison_json",
    "cpu_usage",
    "gate_args_for",
    "kernel_signature",
    "llc_counter_status",
    "load_tracer",
    "make_schedule",
    "own_cpu_ticks",
    "page_cache",
    "parse_arm",
    "parse_perf_llc",
    "per_round_medians",
    "play_round",
    "read_cpu_times",
    "read_cpufreq",
    "read_loadavg",
    "round_slots",
    "run_abtest",
    "samples_by_block",
    "samples_from_report",
    "settings_for",
    "settings_from_report",
    "slice_verdicts",
    "stop_rule",
    "validate",
    "warmup",
]  # fmt: skip
