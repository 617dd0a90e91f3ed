"""How often does ab-test call a difference that is not there? Its whole decision procedure — schedule,
bootstrap, verdict, stop rule (`--rounds`, `--max-time`) — replayed thousands of times on A/A data
resampled from recorded real runs.

A recording is one setting of one real ab-test run: per round one interleaved block, per block the slots
(position in the mirror-order block, arm, llama-bench's `samples_ns`). An A/A run is made from it by

* pooling the slots of a block: both arms of an A/A recording as they are; for an A/B recording the
  second arm's times are first scaled by the recording's ratio of medians, so both arms share one level;
* replaying rounds in a moving-block bootstrap order (runs of `SEGMENT_ROUNDS` consecutive recorded
  rounds from random starts), which keeps the drift between neighbouring blocks and gives as many rounds
  as a stop rule asks for;
* letting ab-test's own schedule (`abtest.round_slots`, a random mirror order per block) decide which arm
  gets which position — the recorded slot at that position is what the arm "measured".

Both arms then draw from the same distribution with the block and slot structure and the load of the
recording, so every `faster`/`slower` verdict is a false call. Multiplying the second arm's speed by a
known ratio turns the same replay into a power measurement. The clock of `--max-time` is the recording's
own: the replayed `samples_ns` plus each slot's measured overhead (process start, model load).

Everything here is pure (no subprocess, no files): recordings come in as parsed JSON.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from amppatch import abtest, stats

DATA_SCHEMA_VERSION = 1
SEGMENT_ROUNDS = 3  # recorded rounds replayed in a row (keeps drift between neighbouring blocks)
CONDITIONS = ("quiet", "interfered")
FALSE_CALLS = ("faster", "slower")


@dataclass(frozen=True)
class RecordedSlot:
    pos: int  # position in the mirror-order block (0..3 for two arms)
    arm: int  # 0: baseline, 1: the other arm
    ns: tuple[int, ...]  # llama-bench samples_ns of this call


@dataclass(frozen=True)
class Recording:
    """One setting of one real ab-test run, one block per round."""

    id: str
    condition: str  # "quiet" or "interfered" (another llama-bench, a compile, another amppatch run)
    kind: str  # "aa" (both arms the same binary and settings) or "ab"
    n_tokens: int
    slot_overhead_s: float  # wall time of a slot beyond its samples (process start, model load)
    setup_s: float  # what ab-test spent before timing (gate, page cache, warmups): --max-time counts it
    rounds: tuple[tuple[RecordedSlot, ...], ...]
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "condition": self.condition, "kind": self.kind, "n_tokens": self.n_tokens,
            "slot_overhead_s": round(self.slot_overhead_s, 3), "setup_s": round(self.setup_s, 1),
            "note": self.note,
            "rounds": [[{"pos": s.pos, "arm": s.arm, "ns": list(s.ns)} for s in block] for block in self.rounds],
        }


def recordings_from_json(data: dict[str, Any]) -> list[Recording]:
    if data.get("schema_version") != DATA_SCHEMA_VERSION:
        raise ValueError(f"recordings schema_version {data.get('schema_version')!r}, expected {DATA_SCHEMA_VERSION}")
    out = []
    for r in data["recordings"]:
        if r["condition"] not in CONDITIONS or r["kind"] not in ("aa", "ab"):
            raise ValueError(f"recording {r['id']}: bad condition or kind")
        rounds = tuple(tuple(RecordedSlot(int(s["pos"]), int(s["arm"]), tuple(int(v) for v in s["ns"]))
                             for s in block) for block in r["rounds"])
        out.append(Recording(r["id"], r["condition"], r["kind"], int(r["n_tokens"]), float(r["slot_overhead_s"]),
                             float(r["setup_s"]), rounds, r.get("note", "")))
    return out


def recording_from_report(report: dict[str, Any], setting: str, *, id: str, condition: str, kind: str,
                          note: str = "") -> Recording:
    """One setting of an ab-test report.json (two arms: the first is arm 0)."""
    names = [a["name"] for a in report["arms"]]
    if len(names) != 2:
        raise ValueError(f"{id}: calibration takes two-arm runs, this one has {len(names)}")
    mine = [s for s in report["samples"] if s["setting"] == setting]
    if not mine:
        raise ValueError(f"{id}: no samples at {setting}")
    n_tokens = int(mine[0]["n_tokens"])
    rounds = []
    for r in sorted({s["round"] for s in mine}):
        slots: dict[int, list[dict[str, Any]]] = {}
        for s in mine:
            if s["round"] == r:
                slots.setdefault(int(s["slot"]), []).append(s)
        if sorted(slots) != [0, 1, 2, 3]:
            continue  # an incomplete block (interrupted run, failed call) has no mirror structure to keep
        rounds.append(tuple(RecordedSlot(pos, names.index(v[0]["arm"]),
                                         tuple(int(x["ns"]) for x in sorted(v, key=lambda x: x["rep"])))
                            for pos, v in sorted(slots.items())))
    diag = report.get("diagnostics", {})
    n_settings = max(len(report.get("settings", [])), 1)
    all_ns = sum(int(s["ns"]) for s in report["samples"]) / 1e9
    n_calls = len({(s["block"], s["slot"]) for s in report["samples"]})
    timed = float(diag.get("timed_seconds") or all_ns)
    overhead = max(timed - all_ns, 0.0) / max(n_calls, 1)
    setup = max(float(report.get("duration_s") or timed) - timed, 0.0) / n_settings
    return Recording(id, condition, kind, n_tokens, overhead, setup, tuple(rounds), note)


_PROBE_COUNT = re.compile(r"(?:^|/)(\d+)-[^/]*$")


def recording_from_probe(probe: dict[str, Any], tune_seed: int, *, id: str, condition: str,
                         slot_overhead_s: float, setup_s: float) -> Recording:
    """A tune probe of one candidate against "off" (learned.json keeps both arms' samples in the order
    measured, not their positions): the positions come back from the probe's schedule, which ab-test
    derives from its seed (tune's seed + the probe's number)."""
    match = _PROBE_COUNT.search(str(probe.get("report", "")))
    if match is None:
        raise ValueError(f"{id}: cannot tell the probe's number from {probe.get('report')!r}")
    seed = tune_seed + int(match.group(1))
    n_rounds = int(probe["rounds"])
    off, cand = list(probe["off_samples_ns"]), list(probe["samples_ns"])
    if len(off) != len(cand) or len(off) % (2 * n_rounds):
        raise ValueError(f"{id}: {len(off)}/{len(cand)} samples do not fill {n_rounds} two-arm rounds")
    reps = len(off) // (2 * n_rounds)
    setting = f"tg{probe['n_tokens']}-t{probe['threads']}"
    schedule = abtest.make_schedule(n_rounds, [setting], 2, seed)
    taken = {0: iter(off), 1: iter(cand)}
    rounds = []
    for r in range(n_rounds):
        block = sorted((s for s in schedule if s.round == r), key=lambda s: s.slot)
        rounds.append(tuple(RecordedSlot(s.slot, s.arm, tuple(int(next(taken[s.arm])) for _ in range(reps)))
                            for s in block))
    return Recording(id, condition, "ab", int(probe["n_tokens"]), slot_overhead_s, setup_s, tuple(rounds),
                     f"tune probe {probe.get('name')} vs off")


# ----------------------------------------------------------------------------------------------------
# A/A replay


@functools.lru_cache(maxsize=64)  # every simulated run of a recording replays the same pooled blocks
def aa_blocks(rec: Recording) -> list[dict[int, np.ndarray]]:
    """Per recorded round: position → samples_ns, both arms on one level (an A/B recording's second arm
    scaled by its ratio of medians)."""
    scale = 1.0
    if rec.kind == "ab":
        a = np.concatenate([s.ns for block in rec.rounds for s in block if s.arm == 0]).astype(float)
        b = np.concatenate([s.ns for block in rec.rounds for s in block if s.arm == 1]).astype(float)
        scale = float(np.median(1.0 / b) / np.median(1.0 / a))  # B/A in tok/s
    return [{s.pos: np.asarray(s.ns, dtype=float) * (scale if s.arm == 1 else 1.0) for s in block}
            for block in rec.rounds]


@dataclass
class RoundOrder:
    """Recorded round to replay for each simulated round: runs of `segment` consecutive recorded rounds
    (wrapping around) from random starts — a circular moving-block bootstrap of the recording."""

    n_recorded: int
    rng: np.random.Generator
    segment: int = SEGMENT_ROUNDS
    order: list[int] = field(default_factory=list)

    def __getitem__(self, i: int) -> int:
        while len(self.order) <= i:
            start = int(self.rng.integers(self.n_recorded))
            self.order.extend((start + k) % self.n_recorded for k in range(min(self.segment, self.n_recorded)))
        return self.order[i]


class ReplayExecutor:
    """An `abtest.SlotExecutor` that answers each slot with the recorded slot at the same position of the
    replayed block; arm 1's speed is multiplied by `effect`. `clock` advances by the replayed time."""

    def __init__(self, rec: Recording, rng: np.random.Generator, effect: float = 1.0) -> None:
        self.blocks = aa_blocks(rec)
        self.order = RoundOrder(len(self.blocks), rng)
        self.effect = effect
        self.overhead = rec.slot_overhead_s
        self.clock = rec.setup_s

    def __call__(self, slot: abtest.Slot, setting: abtest.Setting) -> list[int]:
        ns = self.blocks[self.order[slot.round]][slot.slot]
        if slot.arm == 1:
            ns = ns / self.effect
        self.clock += float(ns.sum()) / 1e9 + self.overhead
        return [max(int(v + 0.5), 1) for v in ns]


# ----------------------------------------------------------------------------------------------------
# The procedure, replayed


@dataclass(frozen=True)
class Procedure:
    """The ab-test options that decide a verdict."""

    label: str
    rounds: int | None = abtest.DEFAULT_ROUNDS
    max_time: float | None = None
    min_effect: float = 0.05
    n_boot: int = 4000
    interval: str = stats.DEFAULT_INTERVAL  # the decision rule (stats.INTERVALS)

    def describe(self) -> str:
        stop = f"--max-time {self.max_time:.0f}" if self.max_time is not None else f"--rounds {self.rounds}"
        return f"{stop} --min-effect {self.min_effect:g}"


@dataclass(frozen=True)
class Outcome:
    verdict: str
    ratio: float
    ci95: tuple[float, float]
    rounds: int
    stopped_because: str


NO_CALL = "no call"  # equivalent or inconclusive, not told apart (simulate_run's calls_only)


def _judge(samples: list[abtest.Sample], setting: abtest.Setting, proc: Procedure, seed: int,
           n_boot: int, *, calls_only: bool = False) -> dict[str, Any]:
    """abtest.analyze's comparison of B with A — skipping the bootstrap where it cannot change the verdict:
    under "bootstrap+blocks" the CI contains the block t interval, so when that one is inconclusive so is
    the verdict, and when it is not faster/slower neither is the verdict (`calls_only`: the caller only
    counts faster/slower). Tests check this shortcut against the full analysis."""
    if proc.interval == "bootstrap+blocks":
        blocks = sorted({s.block for s in samples})
        a = abtest.samples_by_block(samples, "A", setting.id, blocks)
        b = abtest.samples_by_block(samples, "B", setting.id, blocks)
        t = stats.block_ratio_interval(a, b)
        if t is not None:
            verdict = stats.decide(t[1], t[2], proc.min_effect)
            if verdict == "inconclusive" or (calls_only and verdict not in FALSE_CALLS):
                return {"verdict": verdict if verdict == "inconclusive" else NO_CALL, "ratio": t[0],
                        "ci95": [t[1], t[2]]}
    return abtest.analyze(samples, ["A", "B"], [setting], {}, min_effect=proc.min_effect, seed=seed,
                          n_boot=n_boot, interval=proc.interval)[0]


def simulate_run(rec: Recording, proc: Procedure, seed: int, *, effect: float = 1.0,
                 shortcut: bool = True, calls_only: bool = False) -> Outcome:
    """One ab-test run (two arms, one setting) on data replayed from `rec`: the loop of
    `abtest.run_abtest` with the same schedule, executor interface, statistics and stop rule. The
    verdict is the one ab-test would report; with `shortcut`, an inconclusive one may carry the block
    interval instead of the reported ratio and CI; with `calls_only` (only faster/slower counted), an
    equivalent one may come back as NO_CALL."""
    data_rng = np.random.default_rng([seed, 1])
    executor = ReplayExecutor(rec, data_rng, effect)
    setting = abtest.Setting("tg", 1, rec.n_tokens)
    names = ["A", "B"]
    by_id = {setting.id: setting}
    rng = np.random.default_rng(seed)  # the schedule's generator, as run_abtest seeds it
    samples: list[abtest.Sample] = []
    failures: dict[tuple[str, str], str] = {}
    round_index = 0

    def judge(n_boot: int) -> dict[str, Any]:
        if shortcut:
            return _judge(samples, setting, proc, seed, n_boot)
        return abtest.analyze(samples, names, [setting], failures, min_effect=proc.min_effect, seed=seed,
                              n_boot=n_boot, interval=proc.interval)[0]

    while True:
        start = executor.clock
        slots = abtest.round_slots(round_index, [setting.id], 2, rng, round_index)
        abtest.play_round(slots, executor, names, by_id, samples, failures)
        round_seconds = executor.clock - start
        # The look after a round matters only to the stop rule of --max-time, and only from STOP_MIN_ROUNDS
        # on; otherwise it just feeds the progress line.
        comps = [judge(abtest.STOP_RULE_N_BOOT)] if (
            proc.rounds is None and round_index + 1 >= abtest.STOP_MIN_ROUNDS) else []
        round_index += 1
        stop = abtest.stop_rule(round_index, comps, all_failed=False, rounds=proc.rounds, max_time=proc.max_time,
                                elapsed=executor.clock, round_seconds=round_seconds)
        if stop is not None:
            break
    final = (_judge(samples, setting, proc, seed, proc.n_boot, calls_only=True) if calls_only and shortcut
             else judge(proc.n_boot))
    return Outcome(final["verdict"], final["ratio"], (final["ci95"][0], final["ci95"][1]), round_index, stop)


@dataclass(frozen=True)
class Rate:
    n: int
    counts: dict[str, int]

    @property
    def false_calls(self) -> int:
        return sum(self.counts.get(v, 0) for v in FALSE_CALLS)

    def share(self, *verdicts: str) -> float:
        return sum(self.counts.get(v, 0) for v in verdicts) / self.n if self.n else float("nan")

    def upper95(self, *verdicts: str) -> float:
        """One-sided 95 % upper bound of the rate (Clopper–Pearson's, via the beta quantile's bisection)."""
        k = sum(self.counts.get(v, 0) for v in verdicts)
        return clopper_pearson_upper(k, self.n)


def clopper_pearson_upper(k: int, n: int, level: float = 0.95) -> float:
    """Smallest p with P(X <= k | n, p) <= 1 - level: the exact one-sided upper confidence bound."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    from math import comb

    def cdf(p: float) -> float:
        return sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))

    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if cdf(mid) > 1 - level:
            lo = mid
        else:
            hi = mid
    return hi


def false_call_rate(recordings: Sequence[Recording], proc: Procedure, n_runs: int, seed: int, *,
                    effect: float = 1.0, calls_only: bool = False) -> Rate:
    """`n_runs` simulated runs spread evenly over `recordings` (each run a fresh resample and schedule)."""
    counts: dict[str, int] = {}
    for i in range(n_runs):
        rec = recordings[i % len(recordings)]
        out = simulate_run(rec, proc, seed * 1_000_003 + i, effect=effect, calls_only=calls_only)
        counts[out.verdict] = counts.get(out.verdict, 0) + 1
    return Rate(n_runs, counts)
