"""ab-test's measurement: one llama-bench call per slot (`LlamaBenchExecutor`), the warmup, and a round
played through any `SlotExecutor` (`amppatch.calibrate` replays recorded samples through the same code).

Every llama-bench call goes through this module's `_run_bench`, so a test that replaces it here replaces
all of them."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from amppatch.abtest.analysis import Sample
from amppatch.abtest.gating import _flag_values
from amppatch.abtest.options import _THREAD_FLAGS, AbTestOptions, ArmSpec, Setting, _Arm
from amppatch.abtest.probes import _Tracer
from amppatch.abtest.schedule import Slot
from amppatch.errors import AmppatchError
from amppatch.proc import describe_returncode, progress, run


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
        # Per-token latency is a generation figure: a prompt, or the context fill before a generation at
        # depth, is a decode call of many tokens, not a token.
        if self.tracer is not None and setting.test == "tg" and trace_path.exists():
            try:
                trace = self.tracer.read(trace_path)
                steps = list(trace.generation_ns)
                if steps:
                    self.traces.setdefault((arm.spec.name, setting.id), []).extend(float(t) for t in steps)
                elif trace.token_ns:
                    self.trace_errors.append(f"{trace_path.name}: the tracer saw {len(trace.token_ns)} decode "
                                             "call(s) but could not tell their batch sizes, so no generation step")
            except (AmppatchError, OSError, ValueError) as exc:
                self.trace_errors.append(f"{trace_path.name}: {exc}")
            trace_path.unlink(missing_ok=True)
        return [int(ns) for ns in record["samples_ns"]]




WARMUP_DEPTH = 64  # context a long-context setting's warmup fills (see warmup_setting)


def warmup_setting(setting: Setting) -> Setting:
    """What a warmup call runs for `setting`: the same, but a long context filled only WARMUP_DEPTH deep.
    Every timed call at depth fills its whole context before it times anything, which warms the caches as a
    warmup would; a warmup at full depth would add one more whole fill per arm (at 4096 tokens minutes on a
    2-core machine, the dearest calls of a race) to learn only whether the arm runs at depth."""
    return replace(setting, depth=min(setting.depth, WARMUP_DEPTH)) if setting.depth else setting


def warmup(arms: Sequence[_Arm], options: AbTestOptions, settings: Sequence[Setting],
           failures: dict[tuple[str, str], str]) -> None:
    """One untimed llama-bench run per arm and setting (a long context at a short depth: `warmup_setting`);
    an arm that cannot run a setting is recorded in `failures` (and never timed at it). Each arm's first
    warmup that runs is watched for the model file's huge-page share (`arm.pages`)."""
    from amppatch.childpages import ChildPages
    from amppatch.weightpages import WeightPages

    for setting in settings:
        for arm in arms:
            short = warmup_setting(setting)
            timed = f" (timed at depth {setting.depth})" if short != setting else ""
            progress(f"ab-test: warmup {arm.spec.name} {short.label}{timed} ...")
            try:
                # the first warmup an arm runs also shows where its weights sit: untimed, same binary and flags
                watch = ChildPages(options.model) if arm.pages is None else None
                with watch or contextlib.nullcontext():
                    record = _run_bench(_bench_argv(arm, options, short, 1), arm.env, options.bench_timeout,
                                        arm.spec.name)
                if watch is not None:
                    arm.pages = WeightPages.watched(watch.result, options.model.stat().st_size,
                                                    f"warmup ({setting.label})")
                arm.bench_meta.setdefault("first_record", {k: v for k, v in record.items()
                                                           if k not in ("samples_ns", "samples_ts")})
            except _BenchFailed as exc:
                what = "cannot run prompts on this machine" if setting.test == "pp" else "cannot run"
                failures[(arm.spec.name, setting.id)] = f"{what}: {exc.reason}"
                progress(f"ab-test: {arm.spec.name} {what} ({setting.label}): {exc.reason}")
