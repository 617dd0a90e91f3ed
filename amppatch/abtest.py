"""ab-test: race two or more llama.cpp builds (or one build under two settings) fairly, and judge.

The order of events is what makes the numbers trustworthy on a noisy, shared machine:
1. correctness gate for every arm against the first (identical output for the same kernels, perplexity
   within a tolerance for different kernels by design) — a fast wrong binary is not a result;
2. the model is read once so the page cache holds it, then one warmup llama-bench run per arm;
3. rounds of randomized mirror-order blocks (A B B A, or a random permutation followed by its reverse for
   more arms), one block per setting, each slot one `llama-bench -o jsonl -r R` call; load that drifts
   during a block hits every arm alike, and the bootstrap resamples whole blocks;
4. statistics on the raw `samples_ns` (amppatch.stats), noise diagnostics, bandwidth, latency, report.

Arm syntax (``--arm``/``--a``/``--b``)::

    NAME=BUILD[::LLAMA-BENCH FLAGS][::VAR=VALUE]...

BUILD is a build directory (or its manifest.json) from `amppatch build`. A segment starting with ``-`` is
extra llama-bench flags for that arm (e.g. ``::--repack 0``); a segment ``VAR=VALUE`` sets an environment
variable for that arm. ``--a``/``--b`` take the same text without ``NAME=`` (their names are A and B).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from amppatch import __version__, stats
from amppatch.errors import (
    AmppatchError,
    CorrectnessError,
    RegressionError,
    UnmeasuredError,
    UsageError,
)
from amppatch.inputs import check_gguf, creating_dir
from amppatch.machine import cpu_model
from amppatch.proc import describe_returncode, progress, run

if TYPE_CHECKING:
    from amppatch.build import Build

SCHEMA_VERSION = 1
TESTS = ("tg", "pp")
GATE_MODES = ("auto", "identical", "tolerance")
DEFAULT_ROUNDS = 6
MIN_ROUNDS = 2  # the paired bootstrap needs at least two blocks
STOP_MIN_ROUNDS = stats.CLUSTER_MIN_BLOCKS  # the stop rule never calls a verdict final before this
STOP_RULE_N_BOOT = 1000  # bootstrap resamples of the look after each round (the report uses options.n_boot)

# llama-bench flags ab-test sets itself: an arm may not change what is measured or how it is reported.
_RESERVED_FLAGS = {
    "-m": "--model", "--model": "--model", "-o": "the report", "--output": "the report",
    "-oe": "the report", "--output-err": "the report", "-r": "--reps", "--repetitions": "--reps",
    "-p": "--prompt-tokens / --test pp", "--n-prompt": "--prompt-tokens / --test pp",
    "-n": "--tokens", "--n-gen": "--tokens", "-pg": "--test", "-d": "--depth", "--n-depth": "--depth",
    "-h": "", "--help": "", "--list-devices": "",
}  # fmt: skip
_THREAD_FLAGS = ("-t", "--threads")

# llama-bench flag → (llama-completion/llama-perplexity flags) for the gate; None: scheduling only, the
# computation is the same, nothing to pass.
_SCHEDULING_FLAGS = {"-C", "--cpu-mask", "--cpu-strict", "--prio", "--delay", "--no-warmup", "--progress",
                     "-v", "--verbose", "--numa"}
_SAME_NAME_FLAGS = {"-b", "--batch-size", "-ub", "--ubatch-size", "-ctk", "--cache-type-k", "-ctv",
                    "--cache-type-v", "-t", "--threads", "--poll", "-fa", "--flash-attn"}
# Flags whose value changes which kernels run (so the gate compares perplexity within a tolerance).
_KERNEL_FLAGS = {"--repack", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v", "-fa", "--flash-attn",
                 "-t", "--threads", "-b", "--batch-size", "-ub", "--ubatch-size"}


# ----------------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class ArmSpec:
    """One contestant: a build plus optional llama-bench flags and environment."""

    name: str
    build: Path
    bench_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        extras = " ".join(self.bench_args + tuple(f"{k}={v}" for k, v in self.env))
        return f"{self.name} ({extras})" if extras else self.name


@dataclass(frozen=True)
class AbTestOptions:
    arms: tuple[ArmSpec, ...]
    model: Path
    threads: tuple[int, ...] = (1,)
    tokens: int = 64
    prompt_tokens: int = 128
    depth: int = 0
    tests: tuple[str, ...] = ("tg",)
    reps: int = 3
    rounds: int | None = None  # fixed number of rounds (default DEFAULT_ROUNDS when max_time is None)
    max_time: float | None = None  # stop rule: add rounds until decisive or this many seconds have passed
    min_effect: float = 0.05
    seed: int = 0
    cpu_mask: str | None = None  # llama-bench -C MASK --cpu-strict 1 for every arm
    out: Path | None = None
    skip_correctness: bool = False
    gate_mode: str = "auto"
    gate_model: Path | None = None
    gate_args: tuple[str, ...] = ()
    ppl_tolerance: float = 0.01
    latency: str = "auto"  # auto | on | off (tracer token hooks in every arm)
    llc: bool = True  # perf stat LLC misses where hardware counters exist
    fail_on_regression: bool = False
    n_boot: int = 4000
    bench_timeout: float = 1800.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["arms"] = [
            {"name": a.name, "build": str(a.build), "bench_args": list(a.bench_args), "env": dict(a.env)}
            for a in self.arms
        ]
        for key in ("model", "out", "gate_model"):
            data[key] = str(data[key]) if data[key] is not None else None
        data["threads"] = list(self.threads)
        data["tests"] = list(self.tests)
        data["gate_args"] = list(self.gate_args)
        return data


_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
_ENV_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)


def parse_arm(text: str, name: str | None = None) -> ArmSpec:
    """Parse ``NAME=BUILD[::FLAGS][::VAR=VALUE]...`` (or, with `name` given, ``BUILD[::...]``)."""
    segments = text.split("::")
    head = segments[0].strip()
    if name is None:
        arm_name, sep, build = head.partition("=")
        if not sep or not arm_name or not build:
            raise UsageError(
                f"--arm {text!r} is not NAME=BUILD[::FLAGS][::VAR=VALUE]",
                next_step="e.g. --arm norepack=/path/to/build::--repack 0",
            )
    else:
        arm_name, build = name, head
    if not _NAME_RE.match(arm_name):
        raise UsageError(f"arm name {arm_name!r} may only use letters, digits and _.+-", next_step="rename it")
    if not build:
        raise UsageError(f"arm {arm_name!r} names no build", next_step="pass a build directory")
    bench_args: list[str] = []
    env: list[tuple[str, str]] = []
    for seg in segments[1:]:
        seg = seg.strip()
        if not seg:
            continue
        if seg.startswith("-"):
            bench_args.extend(shlex.split(seg))
            continue
        m = _ENV_RE.match(seg)
        if not m:
            raise UsageError(
                f"arm {arm_name!r}: segment {seg!r} is neither llama-bench flags (starting with -) nor VAR=VALUE",
                next_step="e.g. NAME=BUILD::--repack 0::GGML_SCHED_PRIO=1",
            )
        env.append((m.group(1), m.group(2)))
    for arg in bench_args:
        flag = arg.split("=", 1)[0]
        if flag in _RESERVED_FLAGS:
            instead = _RESERVED_FLAGS[flag]
            raise UsageError(
                f"arm {arm_name!r}: llama-bench flag {flag} is set by ab-test itself",
                next_step=f"use ab-test's {instead} instead" if instead else "remove it",
            )
    return ArmSpec(arm_name, Path(build).expanduser(), tuple(bench_args), tuple(env))


def validate(options: AbTestOptions) -> None:
    if len(options.arms) < 2:
        raise UsageError("ab-test needs at least two arms", next_step="pass --a BUILD --b BUILD (or --arm ...)")
    names = [a.name for a in options.arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"arm names must be unique: {', '.join(dupes)}", next_step="name each --arm differently")
    check_gguf(options.model)  # a truncated or foreign file fails here, in milliseconds, not in llama-bench
    if options.gate_model is not None:
        check_gguf(options.gate_model, what="gate model")
    bad_tests = [t for t in options.tests if t not in TESTS]
    if bad_tests or not options.tests:
        raise UsageError(f"unknown --test {','.join(bad_tests)}", next_step="use tg, pp or tg,pp")
    if not options.threads or any(t < 1 for t in options.threads):
        raise UsageError("--threads must list positive thread counts", next_step="e.g. --threads 1,2")
    for label, value in (("--tokens", options.tokens), ("--prompt-tokens", options.prompt_tokens),
                         ("--reps", options.reps)):
        if value < 1:
            raise UsageError(f"{label} must be at least 1", next_step=f"e.g. {label} 3")
    if options.depth < 0:
        raise UsageError("--depth must not be negative", next_step="e.g. --depth 0")
    if options.rounds is not None and options.max_time is not None:
        raise UsageError("--rounds and --max-time exclude each other", next_step="pass one of them")
    if options.rounds is not None and options.rounds < MIN_ROUNDS:
        raise UsageError(f"--rounds must be at least {MIN_ROUNDS}", next_step="blocks are the bootstrap's unit")
    if options.max_time is not None and options.max_time <= 0:
        raise UsageError("--max-time must be positive", next_step="e.g. --max-time 600")
    if not 0 < options.min_effect < 1:
        raise UsageError("--min-effect is a fraction between 0 and 1", next_step="e.g. 0.05 for ±5 %")
    if options.gate_mode not in GATE_MODES:
        raise UsageError(f"unknown --gate {options.gate_mode!r}", next_step=f"use {', '.join(GATE_MODES)}")
    if options.latency not in ("auto", "on", "off"):
        raise UsageError(f"unknown --latency {options.latency!r}", next_step="use auto, on or off")
    if options.cpu_mask is not None and not re.fullmatch(r"(0x)?[0-9a-fA-F]+", options.cpu_mask):
        raise UsageError(f"--cpu-mask {options.cpu_mask!r} is not a hex mask", next_step="e.g. --cpu-mask 0x1")


# ----------------------------------------------------------------------------------------------------
# Schedule (pure)


@dataclass(frozen=True)
class Setting:
    test: str  # "tg" or "pp"
    threads: int
    n_tokens: int
    depth: int = 0

    @property
    def id(self) -> str:
        depth = f"-d{self.depth}" if self.depth else ""
        return f"{self.test}{self.n_tokens}{depth}-t{self.threads}"

    @property
    def label(self) -> str:
        depth = f" at depth {self.depth}" if self.depth else ""
        return f"{self.test}{self.n_tokens}{depth}, {self.threads} thread{'s' if self.threads != 1 else ''}"


def settings_for(options: AbTestOptions) -> tuple[Setting, ...]:
    """Every (test, threads) pair in the order given; the first is the headline setting."""
    out = []
    for test in options.tests:
        n = options.tokens if test == "tg" else options.prompt_tokens
        for threads in options.threads:
            out.append(Setting(test, threads, n, options.depth))
    return tuple(out)


@dataclass(frozen=True)
class Slot:
    """One llama-bench call in the schedule."""

    round: int
    block: int
    slot: int  # position inside the block
    setting: str  # Setting.id
    arm: int  # index into the arms


def block_order(n_arms: int, rng: np.random.Generator) -> list[int]:
    """A random permutation followed by its mirror image (ABBA / BAAB for two arms): every arm sits at
    the same mean position, so a linear drift inside a block favours none of them."""
    perm = [int(i) for i in rng.permutation(n_arms)]
    return perm + perm[::-1]


def round_slots(round_index: int, settings: Sequence[str], n_arms: int, rng: np.random.Generator,
                first_block: int) -> list[Slot]:
    """One round: one mirror block per setting, settings in random order."""
    slots: list[Slot] = []
    order = [settings[int(i)] for i in rng.permutation(len(settings))]
    for b, setting in enumerate(order):
        for pos, arm in enumerate(block_order(n_arms, rng)):
            slots.append(Slot(round_index, first_block + b, pos, setting, arm))
    return slots


def make_schedule(n_rounds: int, settings: Sequence[str], n_arms: int, seed: int) -> list[Slot]:
    """The whole schedule for a fixed number of rounds (the stop rule builds it round by round with the
    same generator, so a run with --max-time is a prefix of the run with enough --rounds)."""
    rng = np.random.default_rng(seed)
    slots: list[Slot] = []
    for r in range(n_rounds):
        slots.extend(round_slots(r, settings, n_arms, rng, r * len(settings)))
    return slots


# ----------------------------------------------------------------------------------------------------
# Samples and their analysis (pure)


@dataclass(frozen=True)
class Sample:
    round: int
    block: int
    slot: int
    arm: str
    setting: str
    rep: int
    ns: int
    n_tokens: int

    @property
    def tok_s(self) -> float:
        return self.n_tokens * 1e9 / self.ns


def samples_by_block(samples: Iterable[Sample], arm: str, setting: str, blocks: Sequence[int]) -> list[list[float]]:
    grouped: dict[int, list[float]] = {b: [] for b in blocks}
    for s in samples:
        if s.arm == arm and s.setting == setting and s.block in grouped:
            grouped[s.block].append(s.tok_s)
    return [grouped[b] for b in blocks]


def compare_arms(samples: Sequence[Sample], base: str, other: str, setting: str, *, min_effect: float,
                 seed: int, n_boot: int, interval: str = stats.DEFAULT_INTERVAL) -> stats.Comparison | None:
    """`other` against `base` at one setting, paired by block; None when either has no samples."""
    blocks = sorted({s.block for s in samples if s.setting == setting})
    a = samples_by_block(samples, base, setting, blocks)
    b = samples_by_block(samples, other, setting, blocks)
    if not any(len(x) and len(y) for x, y in zip(a, b, strict=True)):
        return None
    return stats.compare(a, b, min_effect=min_effect, n_boot=n_boot, seed=seed, interval=interval)


def per_round_medians(samples: Sequence[Sample], arm: str, setting: str) -> list[float]:
    rounds = sorted({s.round for s in samples if s.arm == arm and s.setting == setting})
    return [
        float(np.median([s.tok_s for s in samples if s.arm == arm and s.setting == setting and s.round == r]))
        for r in rounds
    ]


def comparison_json(arm: str, base: str, setting: Setting, comp: stats.Comparison | None,
                    unavailable: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"arm": arm, "baseline": base, "setting": setting.id, "setting_label": setting.label}
    if comp is None:
        out.update(verdict="unavailable", ratio=None, ci95=None, unavailable=unavailable or "no samples")
        return out
    out.update(
        verdict=comp.verdict,
        ratio=comp.ratio,
        ci95=[comp.ci_low, comp.ci_high],
        resolution=comp.resolution,
        p_value=comp.p_value,
        p_method=comp.p_method,
        min_effect=comp.min_effect,
        n_a=comp.n_a,
        n_b=comp.n_b,
        n_blocks=comp.n_blocks,
        paired=comp.paired,
        bootstrap=comp.method,
        interval=comp.interval,
        ci95_bootstrap=[comp.boot_low, comp.boot_high],
        block_ratio=_finite(comp.block_ratio),
        ci95_blocks=None if math.isnan(comp.block_low) else [comp.block_low, comp.block_high],
        unavailable=None,
    )
    return out


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def analyze(samples: Sequence[Sample], arms: Sequence[str], settings: Sequence[Setting],
            failures: dict[tuple[str, str], str], *, min_effect: float, seed: int,
            n_boot: int, interval: str = stats.DEFAULT_INTERVAL) -> list[dict[str, Any]]:
    """Every arm against the first, at every setting."""
    out = []
    base = arms[0]
    for setting in settings:
        for arm in arms[1:]:
            reason = failures.get((base, setting.id)) or failures.get((arm, setting.id))
            if reason:
                who = base if (base, setting.id) in failures else arm
                out.append(comparison_json(arm, base, setting, None, f"{who}: {reason}"))
                continue
            comp = compare_arms(samples, base, arm, setting.id, min_effect=min_effect, seed=seed, n_boot=n_boot,
                                interval=interval)
            out.append(comparison_json(arm, base, setting, comp))
    return out


def slice_verdicts(samples: Sequence[Sample], arms: Sequence[str], settings: Sequence[Setting], n_slices: int,
                   *, min_effect: float, seed: int, n_boot: int) -> list[dict[str, Any]]:
    """Split the rounds into `n_slices` disjoint consecutive groups and judge each on its own (for A/A
    false-positive checks: ten slices of one long run are ten independent verdicts)."""
    rounds = sorted({s.round for s in samples})
    if n_slices < 1 or len(rounds) < n_slices * MIN_ROUNDS:
        raise UsageError(
            f"{len(rounds)} rounds cannot make {n_slices} slices of at least {MIN_ROUNDS} rounds",
            next_step="use fewer slices or a longer run",
        )
    groups = [list(g) for g in np.array_split(np.array(rounds), n_slices)]
    out = []
    for i, group in enumerate(groups):
        chosen = set(int(r) for r in group)
        part = [s for s in samples if s.round in chosen]
        for comp in analyze(part, arms, settings, {}, min_effect=min_effect, seed=seed, n_boot=n_boot):
            comp["slice"] = i
            comp["rounds"] = [int(group[0]), int(group[-1])]
            out.append(comp)
    return out


# ----------------------------------------------------------------------------------------------------
# The timed loop's moving parts: measurement (an executor) and the stop rule (pure)


class SlotExecutor(Protocol):
    """Measures one slot of the schedule: returns llama-bench's `samples_ns` for it, or raises
    `_BenchFailed`. The real one runs llama-bench (`LlamaBenchExecutor`); `amppatch.calibrate` replays
    recorded samples through the same loop, stop rule and statistics."""

    def __call__(self, slot: Slot, setting: Setting) -> list[int]: ...


def play_round(slots: Sequence[Slot], executor: SlotExecutor, arm_names: Sequence[str],
               settings_by_id: dict[str, Setting], samples: list[Sample],
               failures: dict[tuple[str, str], str]) -> None:
    """Measure every slot of one round, appending to `samples`; an arm that fails at a setting is recorded
    in `failures` and skipped for the rest of the run."""
    for slot in slots:
        name = arm_names[slot.arm]
        setting = settings_by_id[slot.setting]
        if (name, setting.id) in failures:
            continue
        try:
            samples_ns = executor(slot, setting)
        except _BenchFailed as exc:
            failures[(name, setting.id)] = f"failed during round {slot.round + 1}: {exc.reason}"
            progress(f"ab-test: {name} failed ({setting.label}): {exc.reason}")
            continue
        for rep, ns in enumerate(samples_ns):
            samples.append(Sample(slot.round, slot.block, slot.slot, name, setting.id, rep, int(ns),
                                  setting.n_tokens))


def stop_rule(rounds_done: int, comps: Sequence[dict[str, Any]], *, all_failed: bool, rounds: int | None,
              max_time: float | None, elapsed: float, round_seconds: float) -> str | None:
    """Why the timed loop stops after `rounds_done` rounds, or None to run another round.

    `rounds` is the fixed round count (None under `max_time`); `elapsed` the seconds since ab-test started
    and `round_seconds` what the last round took (the estimate for the next one)."""
    if all_failed and not any(c["ratio"] is not None for c in comps):
        return "every candidate arm failed"
    if rounds is not None:
        return f"{rounds} rounds done" if rounds_done >= rounds else None
    assert max_time is not None
    decisive = [c for c in comps if c["ratio"] is not None]
    # Stopping as soon as a verdict looks decisive inflates false calls (optional stopping); waiting for
    # enough blocks, and a verdict that needs the block-level t interval too (stats.compare), keeps that in
    # check — measured by amppatch.calibrate.
    if rounds_done >= STOP_MIN_ROUNDS and decisive and all(c["verdict"] != "inconclusive" for c in decisive):
        return f"every comparison decisive after {rounds_done} rounds"
    if rounds_done >= MIN_ROUNDS and elapsed + round_seconds > max_time:
        return (f"time limit: another round (~{round_seconds:.0f} s) would pass "
                f"--max-time {max_time:.0f} s after {rounds_done} rounds")
    return None


# ----------------------------------------------------------------------------------------------------
# Gate planning (pure)


def _flag_values(args: Sequence[str]) -> list[tuple[str, str | None]]:
    """Split a llama-bench argv into (flag, value) pairs ('--repack 0', '--repack=0', '-t 2')."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if "=" in arg and arg.startswith("--"):
            flag, value = arg.split("=", 1)
            out.append((flag, value))
            i += 1
        elif (i + 1 < len(args) and not args[i + 1].startswith("-")) or (
            i + 1 < len(args) and re.fullmatch(r"-?\d+", args[i + 1])
        ):
            out.append((arg, args[i + 1]))
            i += 2
        else:
            out.append((arg, None))
            i += 1
    return out


def gate_args_for(bench_args: Sequence[str]) -> tuple[list[str], str | None]:
    """The llama-completion/llama-perplexity flags equivalent to an arm's llama-bench flags, or the flag
    that has no equivalent (then the gate cannot check this arm as it is timed)."""
    out: list[str] = []
    for flag, value in _flag_values(bench_args):
        if flag in _SCHEDULING_FLAGS:
            continue
        if flag == "--repack":
            if value is None or "," in value:
                return [], f"{flag} {value or ''}".strip()
            out.append("--repack" if value.strip() in ("1", "on", "true") else "-nr")
        elif flag in _SAME_NAME_FLAGS and value is not None and "," not in value:
            if flag in ("-fa", "--flash-attn") and value in ("0", "1"):
                value = "on" if value == "1" else "off"
            out.extend([flag, value])
        else:
            return [], f"{flag} {value or ''}".strip()
    return out, None


def kernel_signature(spec: ArmSpec, manifest: dict[str, Any]) -> tuple[Any, ...]:
    """What decides which kernels run (not how fast they are): CMake options, disabled ISA features and
    the kernel-relevant llama-bench flags. Equal signatures → the gate demands identical output."""
    kernel_flags = tuple(sorted((f, v) for f, v in _flag_values(spec.bench_args) if f in _KERNEL_FLAGS))
    cmake = manifest.get("cmake_options") or {}
    return (
        tuple(sorted((k, str(v)) for k, v in cmake.items() if not k.startswith("CMAKE_C_COMPILER_LAUNCHER"))),
        tuple(manifest.get("isa_disabled") or ()),
        kernel_flags,
    )


# ----------------------------------------------------------------------------------------------------
# Environment and noise (reads /proc and /sys; no subprocess)


def read_loadavg() -> dict[str, Any] | None:
    try:
        parts = Path("/proc/loadavg").read_text().split()
    except OSError:
        return None
    running, total = parts[3].split("/")
    return {"1min": float(parts[0]), "5min": float(parts[1]), "15min": float(parts[2]),
            "runnable": int(running), "threads": int(total)}


def read_cpufreq() -> dict[str, Any]:
    """Governor and boost/turbo where the kernel exposes them (VMs often expose neither)."""
    base = Path("/sys/devices/system/cpu")
    governors = sorted({p.read_text().strip() for p in base.glob("cpu[0-9]*/cpufreq/scaling_governor")
                        if p.is_file()})
    boost: str | None = None
    for path, meaning in ((base / "cpufreq/boost", "boost"), (base / "intel_pstate/no_turbo", "no_turbo")):
        try:
            value = path.read_text().strip()
        except OSError:
            continue
        boost = f"{meaning}={value}"
        break
    return {
        "governor": ",".join(governors) if governors else "not readable (no cpufreq in sysfs)",
        "boost": boost or "not readable",
    }


def read_cpu_times() -> dict[str, int] | None:
    """Machine-wide CPU ticks from /proc/stat (all CPUs summed)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    values = [int(v) for v in first[1 : 1 + len(names)]]
    return dict(zip(names, values, strict=False))


def own_cpu_ticks() -> int:
    """This process's CPU ticks plus those of its reaped children (every llama-bench it ran)."""
    text = Path("/proc/self/stat").read_text()
    rest = text[text.rfind(")") + 2 :].split()
    return sum(int(v) for v in rest[11:15])


def cpu_usage(before: dict[str, int] | None, after: dict[str, int] | None, own_ticks: int) -> dict[str, float] | None:
    """Shares of the whole machine's CPU capacity during timing: ours (ab-test and its llama-bench
    children), everybody else's, and the hypervisor's steal."""
    if not before or not after:
        return None
    delta = {k: after[k] - before.get(k, 0) for k in after}
    total = sum(delta.values())
    if total <= 0:
        return None
    busy = total - delta.get("idle", 0) - delta.get("iowait", 0) - delta.get("steal", 0)
    return {
        "busy": busy / total,
        "ours": min(own_ticks / total, 1.0),
        "others": max(busy - own_ticks, 0) / total,
        "steal": delta.get("steal", 0) / total,
    }


def _proc_cpu_ticks() -> dict[int, tuple[str, int]]:
    """pid → (name, CPU ticks of the process and of its reaped children). Counting reaped children makes
    a build tool visible even when each compiler it runs lives only a few seconds."""
    out: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue  # the process ended while we looked
        comm = text[text.find("(") + 1 : text.rfind(")")]
        rest = text[text.rfind(")") + 2 :].split()
        out[int(entry.name)] = (comm, sum(int(v) for v in rest[11:15]))
    return out


def busy_processes(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]], seconds: float,
                   *, exclude: set[int], threshold: float = 0.05) -> list[dict[str, Any]]:
    """Processes that used more than `threshold` of a CPU between two snapshots (ours excluded)."""
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (comm, ticks) in after.items():
        if pid in exclude:
            continue
        start = before.get(pid, (comm, 0))[1] if pid in before else 0
        share = (ticks - start) / hz / max(seconds, 1e-9)
        if share >= threshold:
            busy.append({"pid": pid, "comm": comm, "cpu_share": round(share, 3)})
    return sorted(busy, key=lambda p: -p["cpu_share"])[:8]


# ----------------------------------------------------------------------------------------------------
# Optional collaborators: machine probe (stream ceiling), tracer (per-token latency), perf (LLC misses)


def stream_ceiling() -> tuple[dict[int, float] | None, str, str | None]:
    """(ceiling GB/s by thread count, note, cpu model) from the machine probe, if that module exists."""
    try:
        from amppatch import machine  # type: ignore[attr-defined]
    except ImportError:
        return None, "not measured (run amppatch profile / machine probe)", None
    probe = getattr(machine, "probe_machine", None)
    if probe is None:
        return None, "not measured (run amppatch profile / machine probe)", None
    try:
        info = probe(refresh=False)
    except AmppatchError as exc:
        return None, f"not measured (machine probe failed: {exc.message})", None
    ceiling = getattr(info, "stream_ceiling_gbps", None)
    model = getattr(info, "cpu_model", None)
    if not ceiling:
        return None, "not measured (machine probe has no stream-read ceiling)", model
    return {int(k): float(v) for k, v in dict(ceiling).items()}, "machine probe stream-read ceiling", model


def ceiling_for(ceiling: dict[int, float] | None, threads: int) -> tuple[float | None, int | None]:
    """The ceiling measured with `threads` threads, else the closest thread count below (then above)."""
    if not ceiling:
        return None, None
    if threads in ceiling:
        return ceiling[threads], threads
    below = [t for t in ceiling if t < threads]
    key = max(below) if below else min(ceiling)
    return ceiling[key], key


@dataclass
class _Tracer:
    env_for: Any  # callable(out_path) -> dict[str, str]
    read: Any  # callable(path) -> Trace


def load_tracer(mode: str) -> tuple[_Tracer | None, str]:
    if mode == "off":
        return None, "per-token latency off (--latency off)"
    try:
        from amppatch import tracer  # type: ignore[attr-defined]
    except ImportError:
        tracer = None
    env_for = getattr(tracer, "tracer_env", None)
    read = getattr(tracer, "read_trace", None)
    if env_for is None or read is None:
        if mode == "on":
            raise UsageError("--latency on needs the amppatch tracer, which is not available in this install",
                             next_step="use --latency auto or off")
        return None, "per-token latency unavailable (the amppatch tracer is not available)"
    return _Tracer(lambda p: env_for(p, sample_hz=0), read), "tracer token hooks loaded in every arm"


def llc_counter_status() -> tuple[bool, str]:
    """Whether `perf stat` can count last-level cache misses here."""
    perf = shutil.which("perf")
    if perf is None:
        return False, "unavailable on this machine (perf is not installed)"
    done = run([perf, "stat", "-x", ",", "-e", "LLC-load-misses", "true"], check=False, timeout=30,
               what="perf stat probe")
    text = done.stderr + done.stdout
    if done.returncode != 0 or "<not supported>" in text or "<not counted>" in text:
        return False, "unavailable on this machine (no hardware cache counters: perf reports <not supported>)"
    return True, "perf stat -e LLC-load-misses"


def parse_perf_llc(text: str) -> int | None:
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) >= 3 and "LLC-load-misses" in parts[2] and parts[0].strip().isdigit():
            return int(parts[0])
    return None


# ----------------------------------------------------------------------------------------------------
# Running


@dataclass
class _Arm:
    spec: ArmSpec
    build: Build
    env: dict[str, str]
    bench_meta: dict[str, Any] = field(default_factory=dict)


def page_cache(model: Path) -> float:
    """Read the whole model once so every arm starts from the page cache; returns seconds taken."""
    start = time.monotonic()
    with open(model, "rb") as fh:
        while fh.read(1 << 24):
            pass
    return time.monotonic() - start


def arm_threads(spec: ArmSpec, setting: Setting) -> int:
    """Threads this arm really runs with at this setting (an arm may override -t on purpose)."""
    for flag, value in _flag_values(spec.bench_args):
        if flag in _THREAD_FLAGS and value and value.isdigit():
            return int(value)
    return setting.threads


def _bench_argv(arm: _Arm, options: AbTestOptions, setting: Setting, reps: int) -> list[str]:
    from amppatch.build import runtime_args

    argv = [str(arm.build.binary("llama-bench")), "-m", str(options.model), "-r", str(reps), "-o", "jsonl"]
    if setting.test == "tg":
        argv += ["-p", "0", "-n", str(setting.n_tokens)]
    else:
        argv += ["-p", str(setting.n_tokens), "-n", "0"]
    if setting.depth:
        argv += ["-d", str(setting.depth)]
    if not any(a.split("=", 1)[0] in _THREAD_FLAGS for a in arm.spec.bench_args):
        argv += ["-t", str(setting.threads)]
    if options.cpu_mask:
        argv += ["-C", options.cpu_mask, "--cpu-strict", "1"]
    argv += runtime_args(arm.build, arm.spec.bench_args)  # -ub 1 where only the AMX batch-1 kernels run
    return argv + list(arm.spec.bench_args)


class _BenchFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _run_bench(argv: list[str], env: dict[str, str], timeout: float, label: str) -> dict[str, Any]:
    done = run(argv, env=env, timeout=timeout, check=False, what=f"llama-bench ({label})")
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise _BenchFailed(f"llama-bench {describe_returncode(done.returncode)}" + (f": {tail}" if tail else ""))
    records = []
    for line in done.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            records.append(json.loads(line))
    if len(records) != 1:
        raise _BenchFailed(
            f"llama-bench printed {len(records)} results where one was expected "
            "(an arm's flags must select exactly one configuration: no comma lists)"
        )
    return records[0]


class LlamaBenchExecutor:
    """The real measurement: one `llama-bench -o jsonl -r R` call per slot, with the tracer's token hooks
    when latency is on (per-token latencies collect in `traces`)."""

    def __init__(self, arms: Sequence[_Arm], options: AbTestOptions, tracer: _Tracer | None, latency_note: str,
                 trace_dir: Path) -> None:
        self.arms = arms
        self.options = options
        self.tracer = tracer
        self.latency_note = latency_note
        self.trace_dir = trace_dir
        self.traces: dict[tuple[str, str], list[float]] = {}
        self.trace_errors: list[str] = []

    def __call__(self, slot: Slot, setting: Setting) -> list[int]:
        arm = self.arms[slot.arm]
        env = dict(arm.env)
        trace_path = self.trace_dir / f"r{slot.round}-b{slot.block}-s{slot.slot}.trace"
        if self.tracer is not None:
            try:
                env.update(self.tracer.env_for(trace_path))
            except AmppatchError as exc:
                self.trace_errors.append(str(exc))
                self.tracer, self.latency_note = None, f"per-token latency unavailable ({exc.message})"
        argv = _bench_argv(arm, self.options, setting, self.options.reps)
        record = _run_bench(argv, env, self.options.bench_timeout, arm.spec.name)
        arm.bench_meta.setdefault("first_record", {k: v for k, v in record.items()
                                                   if k not in ("samples_ns", "samples_ts")})
        # Per-token latency is a generation figure; a prompt is one decode call, not a token.
        if self.tracer is not None and setting.test == "tg" and trace_path.exists():
            try:
                token_ns = list(self.tracer.read(trace_path).token_ns)
                self.traces.setdefault((arm.spec.name, setting.id), []).extend(float(t) for t in token_ns)
            except (AmppatchError, OSError, ValueError) as exc:
                self.trace_errors.append(f"{trace_path.name}: {exc}")
            trace_path.unlink(missing_ok=True)
        return [int(ns) for ns in record["samples_ns"]]


def _progress_line(round_index: int, total: str, comps: list[dict[str, Any]], elapsed: float) -> str:
    parts = []
    for c in comps:
        if c["ratio"] is None:
            parts.append(f"{c['arm']}/{c['baseline']} {c['setting']}: unavailable")
        else:
            lo, hi = c["ci95"]
            parts.append(f"{c['arm']}/{c['baseline']} {c['setting']}: {c['ratio']:.3f} [{lo:.3f}, {hi:.3f}] "
                         f"{c['verdict']}")
    return f"ab-test: round {round_index + 1}{total} done ({elapsed:.0f} s): " + "; ".join(parts)


def _default_out() -> Path:
    return Path.cwd() / time.strftime("abtest-%Y%m%d-%H%M%S")


def _gate_pairs(arms: list[_Arm], options: AbTestOptions) -> list[dict[str, Any]]:
    """Run the correctness gate for every arm against the first; returns one record per pair."""
    from amppatch.gate import GateOptions, run_gate

    records: list[dict[str, Any]] = []
    base = arms[0]
    if options.skip_correctness:
        return [{"arm": a.spec.name, "baseline": base.spec.name, "mode": None, "passed": None,
                 "detail": "not checked (--skip-correctness)", "commands": []} for a in arms[1:]]
    gate_model = Path(options.gate_model or options.model)
    base_args, base_untranslatable = gate_args_for(base.spec.bench_args)
    for arm in arms[1:]:
        record: dict[str, Any] = {"arm": arm.spec.name, "baseline": base.spec.name}
        args, untranslatable = gate_args_for(arm.spec.bench_args)
        bad = base_untranslatable or untranslatable
        if bad:
            record.update(mode=None, passed=None, commands=[],
                          detail=f"not checked: llama-bench flag `{bad}` has no llama-completion equivalent")
            records.append(record)
            continue
        if options.gate_mode == "auto":
            same = kernel_signature(base.spec, base.build.manifest) == kernel_signature(arm.spec, arm.build.manifest)
            mode = "identical" if same else "tolerance"
        else:
            mode = options.gate_mode
        gopts = GateOptions(model=gate_model, mode=mode, ppl_rel_tolerance=options.ppl_tolerance,
                            extra_args=tuple(options.gate_args))
        progress(f"ab-test: correctness gate {arm.spec.name} vs {base.spec.name} ({mode}) ...")
        try:
            result = run_gate(base.build, arm.build, gopts, args_a=base_args, args_b=args,
                              env_a=dict(base.spec.env), env_b=dict(arm.spec.env))
        except CorrectnessError as exc:
            raise CorrectnessError(
                f"{arm.spec.name} vs {base.spec.name}: {exc.message}",
                next_step=(exc.next_step or "") + "; ab-test does not time arms that compute differently "
                "(--gate tolerance for different kernels by design, or --skip-correctness)",
            ) from exc
        record.update(result.to_json())
        record["gate_model"] = str(gate_model)
        records.append(record)
    return records


def run_abtest(options: AbTestOptions, executor: SlotExecutor | None = None) -> Path:
    """Run the whole ab-test and write report.md/.json/.png; returns the report directory. Ctrl-C during
    the rounds writes the report of the rounds done, then re-raises KeyboardInterrupt.

    `executor` measures one slot of the schedule (default: llama-bench through `LlamaBenchExecutor`); a
    replay of recorded samples can stand in for it."""
    validate(options)
    out = Path(options.out or _default_out()).expanduser().resolve()
    with creating_dir(out):  # a run that fails before its report leaves no empty directory
        return _run_abtest(options, out, executor)


def _run_abtest(options: AbTestOptions, out: Path, executor: SlotExecutor | None) -> Path:
    from amppatch.build import load_build, run_env
    from amppatch.gguf_info import bytes_per_token, generation_context, read_gguf
    from amppatch.report import write_report

    t0 = time.monotonic()
    arms = []
    for spec in options.arms:
        build = load_build(spec.build)
        build.binary("llama-bench")
        arms.append(_Arm(spec, build, {**run_env(build), **dict(spec.env)}))
    names = [a.spec.name for a in arms]
    settings = settings_for(options)
    setting_ids = [s.id for s in settings]
    by_id = {s.id: s for s in settings}
    model = Path(options.model).resolve()
    options = replace(options, model=model, out=out)

    info = read_gguf(model)
    ceiling, ceiling_note, probe_cpu = stream_ceiling()
    tracer, latency_note = load_tracer(options.latency)
    llc_ok, llc_note = llc_counter_status() if options.llc else (False, "not measured (--no-llc)")

    # 1. correctness first
    correctness = _gate_pairs(arms, options)

    # 2. page cache and warmup
    progress(f"ab-test: reading {model.name} into the page cache ...")
    cache_seconds = page_cache(model)
    failures: dict[tuple[str, str], str] = {}
    for setting in settings:
        for arm in arms:
            progress(f"ab-test: warmup {arm.spec.name} {setting.label} ...")
            try:
                record = _run_bench(_bench_argv(arm, options, setting, 1), arm.env, options.bench_timeout,
                                    arm.spec.name)
                arm.bench_meta.setdefault("first_record", {k: v for k, v in record.items()
                                                           if k not in ("samples_ns", "samples_ts")})
            except _BenchFailed as exc:
                what = "cannot run prompts on this machine" if setting.test == "pp" else "cannot run"
                failures[(arm.spec.name, setting.id)] = f"{what}: {exc.reason}"
                progress(f"ab-test: {arm.spec.name} {what} ({setting.label}): {exc.reason}")

    # 3. timed rounds
    loadavg_start = read_loadavg()
    cpufreq = read_cpufreq()
    ticks_before = _proc_cpu_ticks()
    cpu_before = read_cpu_times()
    own_before = own_cpu_ticks()
    timed_start = time.monotonic()
    rng = np.random.default_rng(options.seed)
    samples: list[Sample] = []
    trace_dir = Path(tempfile.mkdtemp(prefix="amppatch-abtest-traces-"))
    bench = executor if executor is not None else LlamaBenchExecutor(arms, options, tracer, latency_note, trace_dir)
    n_rounds_target = options.rounds if options.max_time is None else None
    if n_rounds_target is None and options.max_time is None:
        n_rounds_target = DEFAULT_ROUNDS
    stopped_because = ""
    interrupted = False
    round_index = 0
    comps: list[dict[str, Any]] = []
    try:
        while True:
            round_start = time.monotonic()
            slots = round_slots(round_index, setting_ids, len(arms), rng, round_index * len(setting_ids))
            play_round(slots, bench, names, by_id, samples, failures)
            round_seconds = time.monotonic() - round_start
            comps = analyze(samples, names, settings, failures, min_effect=options.min_effect,
                            seed=options.seed, n_boot=STOP_RULE_N_BOOT)
            elapsed = time.monotonic() - t0
            total = f"/{n_rounds_target}" if n_rounds_target else ""
            progress(_progress_line(round_index, total, comps, elapsed))
            round_index += 1
            stop = stop_rule(round_index, comps, all_failed=all(
                (arm.spec.name, sid) in failures for arm in arms[1:] for sid in setting_ids),
                rounds=n_rounds_target, max_time=options.max_time, elapsed=elapsed, round_seconds=round_seconds)
            if stop is not None:
                stopped_because = stop
                break
    except KeyboardInterrupt:
        stopped_because = f"interrupted after {round_index} rounds"
        interrupted = True
        progress("ab-test: interrupted; writing the report of the rounds done so far")
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    traces = getattr(bench, "traces", {})
    trace_errors: list[str] = getattr(bench, "trace_errors", [])
    latency_note = getattr(bench, "latency_note", latency_note)
    timed_seconds = time.monotonic() - timed_start
    ticks_after = _proc_cpu_ticks()
    usage = cpu_usage(cpu_before, read_cpu_times(), own_cpu_ticks() - own_before)
    loadavg_end = read_loadavg()

    if not samples and interrupted:
        raise KeyboardInterrupt
    if not samples:
        reasons = "; ".join(f"{a} {s}: {r}" for (a, s), r in failures.items())
        raise UnmeasuredError(
            f"ab-test collected no samples: {reasons or 'nothing ran'}",
            next_step="run the arms' llama-bench by hand to see why (command in the error above)",
        )

    # 4. statistics, diagnostics, report
    comps = analyze(samples, names, settings, failures, min_effect=options.min_effect, seed=options.seed,
                    n_boot=options.n_boot)
    token_bytes = bytes_per_token(info, context_len=generation_context(options.depth, options.tokens))
    arm_records = []
    diag_arms: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for arm in arms:
        by_setting: dict[str, Any] = {}
        for setting in settings:
            key = (arm.spec.name, setting.id)
            mine = [s for s in samples if s.arm == arm.spec.name and s.setting == setting.id]
            entry: dict[str, Any] = {"setting": setting.id, "failed": failures.get(key)}
            if mine:
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
                lat = traces.get(key)
                if lat:
                    entry["latency_ms"] = {"p50": stats.percentile(lat, 50) / 1e6,
                                           "p99": stats.percentile(lat, 99) / 1e6, "n_tokens": len(lat)}
                if not math.isnan(summ.cv) and summ.cv > 0.10:
                    warnings.append(f"{arm.spec.name} {setting.label}: CV {summ.cv:.1%} > 10 % — very noisy")
                if not math.isnan(drift.p_value) and drift.p_value < 0.05 and abs(drift.spearman_rho) >= 0.5:
                    warnings.append(f"{arm.spec.name} {setting.label}: speed drifted across rounds "
                                    f"(Spearman rho {drift.spearman_rho:+.2f}, {drift.slope_per_round:+.2%}/round)")
            by_setting[setting.id] = entry
            diag_arms.setdefault(arm.spec.name, {})[setting.id] = {
                "cv": entry.get("cv"), "drift": entry.get("drift")}
        first = by_setting[settings[0].id]
        meta = arm.bench_meta.get("first_record", {})
        arm_records.append({
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
        })

    # The LLC pass runs after timing, once per arm and tg setting, so perf never perturbs the timed runs.
    if llc_ok:
        perf = shutil.which("perf") or "perf"
        for arm, rec in zip(arms, arm_records, strict=True):
            for setting in settings:
                if setting.test != "tg" or (arm.spec.name, setting.id) in failures:
                    continue
                argv = [perf, "stat", "-x", ",", "-e", "LLC-load-misses", "--",
                        *_bench_argv(arm, options, setting, 1)]
                done = run(argv, env=arm.env, check=False, timeout=options.bench_timeout, what="perf stat")
                misses = parse_perf_llc(done.stderr)
                if misses is not None:
                    # one warmup token plus one repetition of n tokens
                    rec["by_setting"][setting.id]["llc_misses_per_token"] = misses / (setting.n_tokens + 1)

    blocks_done = len({s.block for s in samples})
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
                            f"verdict at ±{options.min_effect:.0%} (resolution reached ±{comp['resolution']:.1%})")
    ncpu = os.cpu_count() or 1
    max_threads = max(options.threads)
    if loadavg_start and loadavg_start["1min"] > max(ncpu - max_threads, 0) + 0.5:
        warnings.append(f"the machine was busy: load average {loadavg_start['1min']:.2f} on {ncpu} CPUs with "
                        f"{max_threads} benchmark thread(s)")
    busy = busy_processes(ticks_before, ticks_after, timed_seconds, exclude={os.getpid()})
    if usage and usage["others"] > 0.10:
        warnings.append(f"other processes used {usage['others']:.0%} of the machine's CPU capacity while "
                        f"timing (ab-test itself {usage['ours']:.0%})")
    if usage and usage["steal"] > 0.05:
        warnings.append(f"the hypervisor stole {usage['steal']:.0%} of the CPU time while timing")
    headline = next((c for c in comps if c["setting"] == settings[0].id), comps[0] if comps else None)
    cpu = probe_cpu or cpu_model()
    uname = os.uname()
    report: dict[str, Any] = {
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
        "correctness": correctness,
        "bandwidth": {
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
            "ceiling_gbps": {str(k): v for k, v in ceiling.items()} if ceiling else None,
            "ceiling_note": ceiling_note,
        },
        "latency": {"available": bool(traces), "note": latency_note if not trace_errors
                    else f"{latency_note}; trace errors: {'; '.join(trace_errors[:3])}"},
        "llc": {"available": llc_ok, "note": llc_note},
        "diagnostics": {
            "per_arm": diag_arms,
            "loadavg_start": loadavg_start,
            "loadavg_end": loadavg_end,
            "cpufreq": cpufreq,
            "busy_processes": busy,
            "cpu_usage": usage,
            "warnings": warnings,
            "rounds": round_index,
            "blocks": blocks_done,
            "stopped_because": stopped_because,
            "page_cache_seconds": cache_seconds,
            "timed_seconds": timed_seconds,
            "failures": [{"arm": a, "setting": s, "reason": r} for (a, s), r in failures.items()],
        },
        "environment": {
            "cpu_model": cpu,
            "cpus": ncpu,
            "kernel": f"{uname.sysname} {uname.release}",
            "machine": uname.machine,
            "python": sys.version.split()[0],
            "compilers": sorted({str(a.build.manifest.get("compiler_version")) for a in arms}),
            "commits": {a.spec.name: a.build.manifest.get("commit") for a in arms},
            "model": {"path": str(model), "architecture": info.architecture, "file_size": info.file_size,
                      "types": info.type_histogram, "n_layer": info.n_layer, "n_embd": info.n_embd,
                      "n_expert": info.n_expert, "n_expert_used": info.n_expert_used},
        },
        "samples": [asdict(s) | {"tok_s": s.tok_s} for s in samples],
        "duration_s": time.monotonic() - t0,
    }
    write_report(out, report)
    if interrupted:
        progress(f"ab-test: partial report of {round_index} rounds in {out}")
        raise KeyboardInterrupt  # the exit status says the run did not finish (130), the report is kept
    if options.fail_on_regression:
        slower = [c for c in comps if c["verdict"] == "slower"]
        if slower:
            listed = ", ".join(f"{c['arm']} {c['setting']} ({c['ratio']:.3f}×)" for c in slower)
            raise RegressionError(f"measurably slower than {names[0]}: {listed}; report in {out}",
                                  next_step="see report.md; drop --fail-on-regression to only report")
    return out
