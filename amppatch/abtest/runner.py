"""ab-test's run: setup, correctness gate and warmup, the timed rounds with the stop rule, then the report.

`run_abtest` is the entry point; each phase is its own function so the order of events (see the package
docstring) reads top to bottom in `_run_abtest`."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from amppatch.abtest import checkpoint as ckpt
from amppatch.abtest.analysis import Sample, analyze, analyze_pairs
from amppatch.abtest.assemble import Timed, build_report
from amppatch.abtest.execute import LlamaBenchExecutor, SlotExecutor, arm_threads, page_cache, play_round, warmup
from amppatch.abtest.gating import _flag_values, _gate_pairs
from amppatch.abtest.hostload import (
    _proc_cpu_ticks,
    cpu_usage,
    own_cpu_ticks,
    read_cpu_times,
    read_cpufreq,
    read_loadavg,
)
from amppatch.abtest.options import (
    DEFAULT_ROUNDS,
    MIN_ROUNDS,
    STOP_MIN_ROUNDS,
    STOP_RULE_N_BOOT,
    AbTestOptions,
    Setting,
    _Arm,
    settings_for,
    validate,
)
from amppatch.abtest.probes import _Tracer, llc_counter_status, load_tracer, stream_ceiling
from amppatch.abtest.result import AbTestResult
from amppatch.abtest.schedule import round_slots
from amppatch.errors import RegressionError, UnmeasuredError
from amppatch.inputs import creating_dir
from amppatch.proc import progress

if TYPE_CHECKING:
    from amppatch.gguf_info import GgufInfo
    from amppatch.limit import KernelRun


def stop_rule(rounds_done: int, comps: Sequence[dict[str, Any]], *, all_failed: bool, rounds: int | None,
              max_time: float | None, elapsed: float, round_seconds: float,
              min_rounds: int = MIN_ROUNDS) -> str | None:
    """Why the timed loop stops after `rounds_done` rounds, or None to run another round.

    `rounds` is the fixed round count (None under `max_time`); `elapsed` the seconds since ab-test started
    and `round_seconds` what the last round took (the estimate for the next one); the time limit does not stop
    the race before `min_rounds`."""
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
    if rounds_done >= max(MIN_ROUNDS, min_rounds) and elapsed + round_seconds > max_time:
        return (f"time limit: another round (~{round_seconds:.0f} s) would pass "
                f"--max-time {max_time:.0f} s after {rounds_done} rounds")
    return None




def overrun_note(rounds_done: int, *, max_time: float | None, min_rounds: int, elapsed: float,
                 round_seconds: float) -> str | None:
    """A line saying the race will outlast `max_time` because the time limit does not stop it before
    `min_rounds` rounds, or None when it will not (or no time limit was given).

    `elapsed` and `round_seconds` are as in `stop_rule`; the projection takes the last round's time for each
    round still owed."""
    floor = max(MIN_ROUNDS, min_rounds)
    if max_time is None or rounds_done >= floor:
        return None
    projected = elapsed + (floor - rounds_done) * round_seconds
    if projected <= max_time:
        return None
    return (f"ab-test: a round takes ~{round_seconds / 60:.0f} min here, so the {floor} rounds a verdict needs "
            f"end after ~{projected / 60:.0f} min, past the {max_time / 60:.0f} min limit; the race goes on "
            "(no verdict is called on fewer rounds), and an interrupted race resumes from the rounds "
            "it recorded")


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


def run_abtest(options: AbTestOptions, executor: SlotExecutor | None = None) -> AbTestResult:
    """Run the whole ab-test and write report.md/.json/.png; returns the result (its `path` is the report
    directory). Ctrl-C during the rounds writes the report of the rounds done, then re-raises
    KeyboardInterrupt.

    `executor` measures one slot of the schedule (default: llama-bench through `LlamaBenchExecutor`); a
    replay of recorded samples can stand in for it."""
    validate(options)
    out = Path(options.out or _default_out()).expanduser().resolve()
    with creating_dir(out):  # a run that fails before its report leaves no empty directory
        return _run_abtest(options, out, executor)


@dataclass
class Setup:
    """What the run knows before timing: loaded arms, settings, the model and the optional collaborators."""

    t0: float
    options: AbTestOptions  # with the model path resolved and `out` set
    arms: list[_Arm]
    settings: tuple[Setting, ...]
    info: GgufInfo
    ceiling: dict[int, float] | None
    ceiling_note: str
    probe_cpu: str | None
    tracer: _Tracer | None
    latency_note: str
    llc_ok: bool
    llc_note: str
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.names = [a.spec.name for a in self.arms]


def _setup(options: AbTestOptions, out: Path) -> Setup:
    from amppatch.build import load_build, run_env
    from amppatch.gguf_info import read_gguf

    t0 = time.monotonic()
    arms = []
    for spec in options.arms:
        build = load_build(spec.build)
        build.binary("llama-bench")
        arms.append(_Arm(spec, build, {**run_env(build), **dict(spec.env)}))
    settings = settings_for(options)
    model = Path(options.model).resolve()
    options = replace(options, model=model, out=out)
    info = read_gguf(model)
    ceiling, ceiling_note, probe_cpu = stream_ceiling()
    tracer, latency_note = load_tracer(options.latency)
    llc_ok, llc_note = llc_counter_status() if options.llc else (False, "not measured (--no-llc)")
    return Setup(t0, options, arms, settings, info, ceiling, ceiling_note, probe_cpu, tracer, latency_note,
                 llc_ok, llc_note)


def _run_abtest(options: AbTestOptions, out: Path, executor: SlotExecutor | None) -> AbTestResult:
    from amppatch.report import write_report

    setup = _setup(options, out)
    options = setup.options
    fingerprint = ckpt.fingerprint(options, setup.arms, setup.settings)
    resumed: ckpt.Checkpoint | None = None
    if options.resume:
        resumed, why = ckpt.load(out, fingerprint)
        progress(f"ab-test: {why}")
    # 1. correctness first (a resumed race passed its gate in the sitting that recorded its rounds)
    correctness = list(resumed.correctness) if resumed else _gate_pairs(setup.arms, options)
    failures: dict[tuple[str, str], str] = dict(resumed.failures) if resumed else {}
    # a resumed race that already meets the stop rule (more rounds or time were not given) plays no round
    done = None
    if resumed is not None:
        done = _stop(setup, failures, resumed.rounds, _look(list(resumed.samples), setup, failures),
                     resumed.elapsed_seconds, resumed.elapsed_seconds / resumed.rounds)
    # 2. page cache and warmup (every sitting that times a round: the caches and the page cache are its own)
    cache_seconds = 0.0
    if done is not None and resumed is not None and ckpt.restore_warmups(resumed, setup.arms):
        progress(f"ab-test: the {resumed.rounds} recorded round(s) already meet the stop rule ({done}): "
                 "no warmup, no new round")
    else:
        progress(f"ab-test: reading {options.model.name} into the page cache ...")
        cache_seconds = page_cache(options.model)
        warmup(setup.arms, options, setup.settings, failures)
    # 3. timed rounds, each one recorded in the checkpoint as it finishes
    timed = _timed_rounds(setup, executor, failures, Resume(fingerprint, correctness, resumed, done))
    timed.correctness, timed.cache_seconds = correctness, cache_seconds
    if not timed.samples and timed.interrupted:
        raise KeyboardInterrupt
    if not timed.samples:
        reasons = "; ".join(f"{a} {s}: {r}" for (a, s), r in failures.items())
        raise UnmeasuredError(
            f"ab-test collected no samples: {reasons or 'nothing ran'}",
            next_step="run the arms' llama-bench by hand to see why (command in the error above)",
        )
    # 4. the roofline of the model's weight kernels, then statistics, diagnostics, report
    if options.roofline and not timed.interrupted:
        try:
            timed.kernels = kernel_roofline(setup)
        except KeyboardInterrupt:  # the rounds' report is still written, then ab-test exits 130
            timed.interrupted = True
    comps = analyze(timed.samples, setup.names, setup.settings, failures, min_effect=options.min_effect,
                    seed=options.seed, n_boot=options.n_boot)
    pair_comps = analyze_pairs(timed.samples, options.pairs, setup.settings, failures,
                               min_effect=options.min_effect, seed=options.seed, n_boot=options.n_boot)
    result = AbTestResult.from_json(build_report(setup, timed, comps, pair_comps), out)
    write_report(out, result)
    if timed.interrupted:
        progress(f"ab-test: partial report of {timed.rounds} rounds in {out}")
        raise KeyboardInterrupt  # the exit status says the run did not finish (130), the report is kept
    if options.fail_on_regression:
        slower = [c for c in comps if c["verdict"] == "slower"]
        if slower:
            listed = ", ".join(f"{c['arm']} {c['setting']} ({c['ratio']:.3f}×)" for c in slower)
            raise RegressionError(f"measurably slower than {setup.names[0]}: {listed}; report in {out}",
                                  next_step="see report.md; drop --fail-on-regression to only report")
    return result


def kernel_roofline(setup: Setup) -> KernelRun | None:
    """The roofline of the model's dominant weight kernels on the first arm's build, at the thread count of
    every tg setting (None without one: a prompt batch reuses each weight, n = 1 is not its shape). The first
    arm's `--repack 0` puts the weights in the plain CPU buffer, as llama-bench does."""
    from amppatch.limit import measure_model

    first = setup.arms[0]
    threads = sorted({arm_threads(first.spec, s) for s in setup.settings if s.test == "tg"})
    if not threads:
        return None
    buffer = "cpu" if dict(_flag_values(first.spec.bench_args)).get("--repack") == "0" else "auto"
    progress(f"ab-test: roofline of the model's weight kernels on {first.spec.name}'s build "
             f"({', '.join(map(str, threads))} thread(s)) ...")
    return measure_model(first.build.dir, setup.info, threads, buffer=buffer)


@dataclass(frozen=True)
class Resume:
    """What the timed loop needs to record each round, and the rounds of an earlier sitting (None: none)."""

    fingerprint: dict[str, Any]
    correctness: list[dict[str, Any]]
    checkpoint: ckpt.Checkpoint | None = None
    stopped_because: str | None = None  # the checkpoint's rounds already meet the stop rule: play none


def _look(samples: list[Sample], setup: Setup, failures: dict[tuple[str, str], str]) -> list[dict[str, Any]]:
    """The stop rule's look at the samples so far: every arm against the first, and the extra pairs — a race is
    decisive when every comparison asked for is."""
    options = setup.options
    comps = analyze(samples, setup.names, setup.settings, failures, min_effect=options.min_effect,
                    seed=options.seed, n_boot=STOP_RULE_N_BOOT)
    return comps + analyze_pairs(samples, options.pairs, setup.settings, failures, min_effect=options.min_effect,
                                 seed=options.seed, n_boot=STOP_RULE_N_BOOT)


def _round_target(options: AbTestOptions) -> int | None:
    """The fixed number of rounds, or None when the time limit and the statistics decide."""
    if options.max_time is not None:
        return None
    return options.rounds if options.rounds is not None else DEFAULT_ROUNDS


def _stop(setup: Setup, failures: dict[tuple[str, str], str], rounds_done: int, comps: list[dict[str, Any]],
          elapsed: float, round_seconds: float) -> str | None:
    """The stop rule after `rounds_done` rounds (failures grow round by round, so read them now)."""
    options = setup.options
    all_failed = all((arm.spec.name, s.id) in failures for arm in setup.arms[1:] for s in setup.settings)
    return stop_rule(rounds_done, comps, all_failed=all_failed, rounds=_round_target(options),
                     max_time=options.max_time, elapsed=elapsed, round_seconds=round_seconds,
                     min_rounds=options.min_rounds)


def _timed_rounds(setup: Setup, executor: SlotExecutor | None, failures: dict[tuple[str, str], str],
                  resume: Resume) -> Timed:
    """The timed loop: rounds until the stop rule says stop (or Ctrl-C), with host load read around it; after
    each round the samples so far go to the checkpoint."""
    options, arms, settings = setup.options, setup.arms, setup.settings
    assert options.out is not None
    setting_ids = [s.id for s in settings]
    by_id = {s.id: s for s in settings}
    timed = Timed(failures=failures, loadavg_start=read_loadavg(), cpufreq=read_cpufreq(),
                  ticks_before=_proc_cpu_ticks(), latency_note=setup.latency_note)
    cpu_before = read_cpu_times()
    own_before = own_cpu_ticks()
    timed_start = time.monotonic()
    rng = np.random.default_rng(options.seed)
    samples: list[Sample] = timed.samples
    trace_dir = Path(tempfile.mkdtemp(prefix="amppatch-abtest-traces-"))
    bench = executor if executor is not None else LlamaBenchExecutor(arms, options, setup.tracer,
                                                                     setup.latency_note, trace_dir)
    n_rounds_target = _round_target(options)
    round_index = 0
    earlier_seconds = 0.0
    earlier = resume.checkpoint
    if earlier is not None:
        samples.extend(earlier.samples)
        if hasattr(bench, "traces"):
            for key, token_ns in earlier.traces.items():
                bench.traces.setdefault(key, []).extend(token_ns)
        for r in range(earlier.rounds):  # the generator as an uninterrupted race would have left it
            round_slots(r, setting_ids, len(arms), rng, r * len(setting_ids))
        round_index = timed.resumed_rounds = earlier.rounds
        earlier_seconds = timed.resumed_seconds = earlier.elapsed_seconds

    overrun_said = False  # the projection is said once, after the first round that shows it
    try:
        stop = resume.stopped_because
        if stop is not None:
            timed.stopped_because = stop
        while stop is None:
            round_start = time.monotonic()
            slots = round_slots(round_index, setting_ids, len(arms), rng, round_index * len(setting_ids))
            play_round(slots, bench, setup.names, by_id, samples, failures)
            round_seconds = time.monotonic() - round_start
            comps = _look(samples, setup, failures)
            elapsed = earlier_seconds + time.monotonic() - setup.t0
            total = f"/{n_rounds_target}" if n_rounds_target else ""
            progress(_progress_line(round_index, total, comps, elapsed))
            round_index += 1
            ckpt.save(options.out, ckpt.Checkpoint(
                resume.fingerprint, round_index, elapsed, tuple(samples), dict(failures),
                tuple(resume.correctness), dict(getattr(bench, "traces", {})), ckpt.warmup_records(arms)))
            stop = _stop(setup, failures, round_index, comps, elapsed, round_seconds)
            note = None if stop is not None or overrun_said else overrun_note(
                round_index, max_time=options.max_time, min_rounds=options.min_rounds, elapsed=elapsed,
                round_seconds=round_seconds)
            if note is not None:
                progress(note)
                overrun_said = True
            if stop is not None:
                timed.stopped_because = stop
    except KeyboardInterrupt:
        timed.stopped_because = f"interrupted after {round_index} rounds"
        timed.interrupted = True
        progress("ab-test: interrupted; writing the report of the rounds done so far")
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    timed.rounds = round_index
    # A replaying executor has no traces; the real one may have switched latency off mid-run.
    timed.traces = getattr(bench, "traces", {})
    timed.trace_errors = getattr(bench, "trace_errors", [])
    timed.latency_note = getattr(bench, "latency_note", setup.latency_note)
    timed.timed_seconds = time.monotonic() - timed_start
    timed.ticks_after = _proc_cpu_ticks()
    timed.usage = cpu_usage(cpu_before, read_cpu_times(), own_cpu_ticks() - own_before)
    timed.loadavg_end = read_loadavg()
    return timed
