"""ab-test's decision procedure replayed on recorded real runs (amppatch.calibrate): its false-call rate
at the defaults, its power, and the pieces the replay relies on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sst

from amppatch import abtest, calibrate, stats

DATA = Path(__file__).resolve().parent.parent / "data" / "abtest-recordings.json"


@pytest.fixture(scope="module")
def recordings() -> list[calibrate.Recording]:
    return calibrate.recordings_from_json(json.loads(DATA.read_text()))


def _by(recs: list[calibrate.Recording], condition: str) -> list[calibrate.Recording]:
    out = [r for r in recs if r.condition == condition]
    assert out, f"no {condition} recordings"
    return out


def test_recordings_are_complete_mirror_blocks(recordings: list[calibrate.Recording]) -> None:
    assert {r.condition for r in recordings} == set(calibrate.CONDITIONS)
    for rec in recordings:
        assert len(rec.rounds) >= 4, rec.id
        for block in rec.rounds:
            arm_at = {s.pos: s.arm for s in block}
            assert sorted(arm_at) == [0, 1, 2, 3], rec.id
            # mirror order: ABBA or BAAB, never AABB
            assert arm_at[0] == arm_at[3] != arm_at[1] == arm_at[2], rec.id
            assert len({len(s.ns) for s in block}) == 1 and all(v > 0 for s in block for v in s.ns)


def test_aa_blocks_put_an_ab_recordings_arms_on_one_level(recordings: list[calibrate.Recording]) -> None:
    rec = next(r for r in recordings if r.kind == "ab" and r.id.endswith("tg64-t1"))  # the 1.19× run
    def level(arm: int, blocks: list[dict[int, np.ndarray]]) -> float:
        pos = [[s.pos for s in b if s.arm == arm] for b in rec.rounds]
        return float(np.median(1 / np.concatenate([blk[p] for blk, ps in zip(blocks, pos, strict=True) for p in ps])))
    raw = [{s.pos: np.asarray(s.ns, float) for s in b} for b in rec.rounds]
    assert level(1, raw) / level(0, raw) > 1.15
    pooled = calibrate.aa_blocks(rec)
    assert level(1, pooled) / level(0, pooled) == pytest.approx(1.0, abs=1e-9)


def test_round_order_replays_runs_of_consecutive_rounds() -> None:
    order = calibrate.RoundOrder(5, np.random.default_rng(0), segment=3)
    seq = [order[i] for i in range(30)]
    for k in range(0, 30, 3):
        assert seq[k + 1] == (seq[k] + 1) % 5 and seq[k + 2] == (seq[k] + 2) % 5
    assert len(set(seq[::3])) > 1


def _toy(kind: str = "aa") -> calibrate.Recording:
    rounds = []
    for r in range(4):
        order = (0, 1, 1, 0) if r % 2 == 0 else (1, 0, 0, 1)
        rounds.append(tuple(calibrate.RecordedSlot(p, a, (1_000_000 * (10 * r + p + 1),) * 2)
                            for p, a in enumerate(order)))
    return calibrate.Recording("toy", "quiet", kind, 32, 0.5, 10.0, tuple(rounds))


def test_replay_executor_answers_with_the_recorded_slot_at_that_position() -> None:
    rec = _toy()
    ex = calibrate.ReplayExecutor(rec, np.random.default_rng(1), effect=2.0)
    setting = abtest.Setting("tg", 1, 32)
    first = ex.order[0]
    a = ex(abtest.Slot(0, 0, 2, setting.id, 0), setting)
    assert a == [1_000_000 * (10 * first + 3)] * 2
    b = ex(abtest.Slot(0, 0, 1, setting.id, 1), setting)  # arm 1 runs `effect` times faster
    assert b == [1_000_000 * (10 * first + 2) // 2] * 2
    assert ex.clock == pytest.approx(10.0 + 2 * 0.5 + (sum(a) + sum(b)) / 1e9)


def test_play_round_records_a_failing_arm_and_skips_it_afterwards() -> None:
    setting = abtest.Setting("tg", 1, 32)
    calls: list[int] = []

    def executor(slot: abtest.Slot, s: abtest.Setting) -> list[int]:
        calls.append(slot.arm)
        if slot.arm == 1:
            raise abtest._BenchFailed("killed by SIGILL")
        return [1000, 1001]

    samples: list[abtest.Sample] = []
    failures: dict[tuple[str, str], str] = {}
    slots = abtest.round_slots(0, [setting.id], 2, np.random.default_rng(0), 0)
    abtest.play_round(slots, executor, ["A", "B"], {setting.id: setting}, samples, failures)
    assert calls.count(1) == 1 and calls.count(0) == 2  # B is not retried within the round
    assert [s.ns for s in samples] == [1000, 1001, 1000, 1001]
    assert failures == {("B", setting.id): "failed during round 1: killed by SIGILL"}


def _comp(verdict: str) -> dict[str, object]:
    return {"verdict": verdict, "ratio": 1.0}


@pytest.mark.parametrize(
    ("done", "comps", "kw", "expected"),
    [
        (3, [_comp("inconclusive")], {"rounds": 6}, None),
        (6, [_comp("inconclusive")], {"rounds": 6}, "6 rounds done"),
        (4, [_comp("equivalent")], {"rounds": None, "max_time": 600.0}, None),  # never decisive before 5
        (5, [_comp("equivalent"), _comp("faster")], {"rounds": None, "max_time": 600.0},
         "every comparison decisive after 5 rounds"),
        (5, [_comp("equivalent"), _comp("inconclusive")], {"rounds": None, "max_time": 600.0}, None),
        (1, [_comp("inconclusive")], {"rounds": None, "max_time": 1.0}, None),  # at least MIN_ROUNDS
        (2, [_comp("inconclusive")], {"rounds": None, "max_time": 100.0}, "time limit"),
    ],
)
def test_stop_rule(done: int, comps: list[dict[str, object]], kw: dict[str, object], expected: str | None) -> None:
    got = abtest.stop_rule(done, comps, all_failed=False, elapsed=90.0, round_seconds=20.0,
                           **{"max_time": None, **kw})  # type: ignore[arg-type]
    assert (got is None) if expected is None else (got is not None and got.startswith(expected))


def test_stop_rule_ends_when_every_candidate_failed() -> None:
    unavailable = [{"verdict": "unavailable", "ratio": None}]
    assert abtest.stop_rule(1, unavailable, all_failed=True, rounds=6, max_time=None, elapsed=1.0,
                            round_seconds=1.0) == "every candidate arm failed"


@pytest.mark.parametrize("df", [1, 2, 4, 7, 11, 40, 300])
def test_student_t_matches_scipy(df: int) -> None:
    for p in (0.6, 0.9, 0.975, 0.995):
        assert stats.student_t_quantile(p, df) == pytest.approx(sst.t.ppf(p, df), rel=1e-9)
        assert stats.student_t_quantile(1 - p, df) == pytest.approx(sst.t.ppf(1 - p, df), rel=1e-9)
    for t in (-3.0, -0.4, 0.0, 1.7):
        assert stats.student_t_cdf(t, df) == pytest.approx(sst.t.cdf(t, df), abs=1e-12)


def test_block_ratio_interval_is_the_t_interval_of_log_block_ratios() -> None:
    rng = np.random.default_rng(4)
    a = [list(rng.normal(20, 1, 6)) for _ in range(7)]
    b = [list(rng.normal(21, 1, 6)) for _ in range(7)]
    logs = np.log([np.median(y) / np.median(x) for x, y in zip(a, b, strict=True)])
    lo, hi = sst.t.interval(0.95, len(logs) - 1, loc=logs.mean(), scale=sst.sem(logs))
    got = stats.block_ratio_interval(a, b)
    assert got is not None
    assert got == pytest.approx((math.exp(logs.mean()), math.exp(lo), math.exp(hi)), rel=1e-9)
    assert stats.block_ratio_interval(a[:1], b[:1]) is None


def test_the_ci_is_the_union_of_bootstrap_and_block_intervals() -> None:
    rng = np.random.default_rng(9)
    a = [list(rng.normal(20 + k, 0.3, 6)) for k in range(6)]
    b = [list(rng.normal((20 + k) * 1.1, 0.3, 6)) for k in range(6)]
    both = stats.compare(a, b, seed=1)
    boot = stats.compare(a, b, seed=1, interval="bootstrap")
    assert (boot.ci_low, boot.ci_high) == (both.boot_low, both.boot_high)
    assert both.ci_low == min(both.boot_low, both.block_low) and both.ci_high == max(both.boot_high, both.block_high)
    assert both.verdict == "faster"


def test_the_replay_shortcut_gives_the_full_analysis_verdicts(recordings: list[calibrate.Recording]) -> None:
    procs = [calibrate.Procedure("defaults"), calibrate.Procedure("stop rule", rounds=None, max_time=300.0)]
    for i in range(8):
        rec = recordings[i % len(recordings)]
        for proc in procs:
            full = calibrate.simulate_run(rec, proc, i, shortcut=False)
            fast = calibrate.simulate_run(rec, proc, i)
            assert (fast.verdict, fast.rounds) == (full.verdict, full.rounds)
            if proc.rounds is not None:
                calls = calibrate.simulate_run(rec, proc, i, calls_only=True).verdict
                if full.verdict in calibrate.FALSE_CALLS:
                    assert calls == full.verdict
                else:
                    assert calls in (calibrate.NO_CALL, "inconclusive")


# The calibration itself: 2000+ simulated A/A runs per condition at ab-test's defaults (--rounds 6,
# --min-effect 0.05). With 2000 runs a true rate of 1 % would show about 20 false calls, so an observed
# rate at or below 1 % is a real check.
N_RUNS = 2400


@pytest.mark.parametrize("condition", calibrate.CONDITIONS)
def test_false_call_rate_at_the_defaults_is_at_most_one_percent(recordings: list[calibrate.Recording],
                                                                condition: str) -> None:
    rate = calibrate.false_call_rate(_by(recordings, condition), calibrate.Procedure("defaults"), N_RUNS, seed=11,
                                     calls_only=True)
    assert rate.n == N_RUNS
    assert rate.share(*calibrate.FALSE_CALLS) <= 0.01, rate.counts


def test_a_recorded_1_19x_effect_is_still_found(recordings: list[calibrate.Recording]) -> None:
    quiet = _by(recordings, "quiet")
    rate = calibrate.false_call_rate(quiet, calibrate.Procedure("defaults"), 48, seed=5, effect=1.19)
    assert rate.share("faster") >= 0.95, rate.counts


def test_clopper_pearson_upper_bound() -> None:
    assert calibrate.clopper_pearson_upper(0, 2000) == pytest.approx(1 - 0.05 ** (1 / 2000), rel=1e-6)
    assert calibrate.clopper_pearson_upper(20, 2000) == pytest.approx(sst.beta.ppf(0.95, 21, 1980), rel=1e-6)
