"""ab-test's options and arms: the `--arm` syntax, the option set and its validation, and the settings
(test, threads, tokens, depth) an option set asks for. Pure: no file is read beyond the GGUF header check."""

from __future__ import annotations

import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amppatch import stats
from amppatch.errors import UsageError
from amppatch.inputs import check_gguf

if TYPE_CHECKING:
    from amppatch.build import Build
    from amppatch.weightpages import WeightPages

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
    # the time limit never stops the race before this many rounds (at 2, the block-level t interval has one
    # degree of freedom and hardly ever excludes 1; the stop rule itself calls nothing before STOP_MIN_ROUNDS)
    min_rounds: int = MIN_ROUNDS
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
    # the roofline of the model's dominant weight kernels on the first arm's build, after the timed rounds;
    # the command and run's final race turn it on, callers racing many small batches (tune, bench) leave it off
    roofline: bool = False
    fail_on_regression: bool = False
    # go on from the rounds recorded in `out`'s checkpoint (rounds.json, written after every round) when it
    # belongs to this race
    resume: bool = False
    n_boot: int = 4000
    bench_timeout: float = 1800.0
    # Settings measured after the tests x threads grid (e.g. tg at a long depth at one thread count only).
    extra_settings: tuple[Setting, ...] = ()
    # Comparisons beyond every arm against the first: (arm, baseline) pairs, judged at every setting.
    pairs: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["arms"] = [
            {"name": a.name, "build": str(a.build), "bench_args": list(a.bench_args), "env": dict(a.env)}
            for a in self.arms
        ]
        data["extra_settings"] = [asdict(s) for s in self.extra_settings]
        data["pairs"] = [list(p) for p in self.pairs]
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
            try:
                bench_args.extend(shlex.split(seg))
            except ValueError as exc:  # an unbalanced quote
                raise UsageError(f"arm {arm_name!r}: llama-bench flags {seg!r} are not valid shell words ({exc})",
                                 next_step="close the quote, or escape it with a backslash") from None
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
    if options.min_rounds < MIN_ROUNDS:
        raise UsageError(f"--min-rounds must be at least {MIN_ROUNDS}", next_step="blocks are the bootstrap's unit")
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
    for s in options.extra_settings:
        if s.test not in TESTS or s.threads < 1 or s.n_tokens < 1 or s.depth < 0:
            raise UsageError(f"setting {s.id} is not a measurable setting",
                             next_step="a test tg or pp, at least one thread and one token, a depth of 0 or more")
    for arm, base in options.pairs:
        if arm not in names or base not in names or arm == base:
            raise UsageError(f"comparison {arm} vs {base} needs two different arms of this ab-test",
                             next_step=f"name two of: {', '.join(names)}")


def settings_for(options: AbTestOptions) -> tuple[Setting, ...]:
    """Every (test, threads) pair in the order given, then the extra settings (one already in the grid is not
    measured twice); the first is the headline setting."""
    out: dict[str, Setting] = {}
    for test in options.tests:
        n = options.tokens if test == "tg" else options.prompt_tokens
        for threads in options.threads:
            setting = Setting(test, threads, n, options.depth)
            out.setdefault(setting.id, setting)
    for setting in options.extra_settings:
        out.setdefault(setting.id, setting)
    return tuple(out.values())



@dataclass
class _Arm:
    """An arm once its build is loaded: the spec, the build, the environment llama-bench runs with, what
    llama-bench reported about itself (its first record, for the report) and where its weights sat."""

    spec: ArmSpec
    build: Build
    env: dict[str, str]
    bench_meta: dict[str, Any] = field(default_factory=dict)
    pages: WeightPages | None = None  # the model file's huge-page share, watched during this arm's warmup
