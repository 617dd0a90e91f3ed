"""The pure search core of `amppatch tune`, driven by synthetic probe results (no subprocess)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from amppatch.errors import UsageError
from amppatch.tune import (
    OFF,
    Budget,
    Candidate,
    ProbeResult,
    SearchConfig,
    best_result,
    expansion_candidates,
    initial_candidates,
    keep_decision,
    loses,
    nearest_grid_index,
    power_grid,
    refinement_candidates,
    round_to_line,
    tune_site,
)

GRID = (512, 1024, 2048, 4096, 8192, 16384)


def result(d: int, h: int, ratio: float, half_width: float = 0.02, threads: int = 1,
           phase: str = "coarse") -> ProbeResult:
    return ProbeResult(Candidate(d, h), threads, phase, ratio, (ratio - half_width, ratio + half_width), "x")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeProbe:
    """A machine whose speed-up is a function of (distance, hint, threads); each llama-bench call costs
    `run_seconds` of fake time, and the CI is ± `noise` around the true ratio."""

    def __init__(self, speedup: Callable[[Candidate, int], float], clock: FakeClock, *, run_seconds: float = 1.0,
                 noise: float = 0.02) -> None:
        self.speedup = speedup
        self.clock = clock
        self.run_seconds = run_seconds
        self.noise = noise
        self.calls: list[tuple[list[Candidate], int, int, str]] = []

    def __call__(self, candidates: list[Candidate], threads: int, rounds: int, phase: str) -> list[ProbeResult]:
        self.calls.append((list(candidates), threads, rounds, phase))
        self.clock.now += self.run_seconds * (len(candidates) + 1) * (rounds + 1)
        return [ProbeResult(c, threads, phase, r, (r - self.noise, r + self.noise), "x")
                for c in candidates for r in [self.speedup(c, threads)]]

    def probed(self, threads: int | None = None) -> list[Candidate]:
        return [c for cands, t, _, _ in self.calls for c in cands if threads is None or t == threads]


def peaked(best_d: int, best_h: int, height: float = 1.5) -> Callable[[Candidate, int], float]:
    """Log-distance tent around (best_d, best_h); other hints get a third of the gain."""
    def f(c: Candidate, threads: int) -> float:
        gain = (height - 1.0) * max(0.0, 1.0 - abs(math.log2(c.distance / best_d)) / 2.0)
        if c.hint != best_h:
            gain /= 3.0
        return 1.0 + gain
    return f


# ---------------------------------------------------------------------------------------------------- grid


def test_power_grid_and_rounding() -> None:
    assert power_grid(512, 16384) == GRID
    assert power_grid(500, 1100) == (512, 1024)  # rounded inwards
    with pytest.raises(UsageError):
        power_grid(3000, 4000)  # no power of two inside
    with pytest.raises(UsageError):
        power_grid(0, 10)
    assert round_to_line(3000, 64) == 3008 and round_to_line(10, 64) == 64 and round_to_line(4096, 64) == 4096


def test_nearest_grid_point_is_on_a_log_scale() -> None:
    assert GRID[nearest_grid_index(GRID, 4096)] == 4096
    assert GRID[nearest_grid_index(GRID, 2800)] == 2048  # log2(2800) = 11.45: nearer 11 than 12
    assert GRID[nearest_grid_index(GRID, 3000)] == 4096
    assert GRID[nearest_grid_index(GRID, 10)] == 512 and GRID[nearest_grid_index(GRID, 1 << 20)] == 16384


def test_initial_candidates_start_at_the_profile_value() -> None:
    cfg = SearchConfig(grid=GRID)
    got = initial_candidates(Candidate(4096, 0), cfg)
    assert set(got) == {Candidate(d, h) for d in (2048, 4096, 8192) for h in (3, 0)}
    # an off-grid start is probed as given (rounded to a line) on top of its grid neighbourhood
    got = initial_candidates(Candidate(3000, 0), cfg)
    assert got[0] == Candidate(3008, 0) and Candidate(4096, 3) in got and len(got) == 7
    # at the edge of the grid only one neighbour exists
    assert {c.distance for c in initial_candidates(Candidate(512, 3), cfg)} == {512, 1024}


def test_expansion_follows_the_best_edge_per_hint() -> None:
    cfg = SearchConfig(grid=GRID)
    rs = [result(2048, 3, 1.1), result(4096, 3, 1.2), result(8192, 3, 1.3),  # rising: go up
          result(2048, 0, 1.2), result(4096, 0, 1.1), result(8192, 0, 1.0)]  # falling: go down
    assert expansion_candidates(rs, 1, cfg) == [Candidate(16384, 3), Candidate(1024, 0)]
    # an interior maximum stops the expansion; so does the grid's end
    rs = [result(2048, 3, 1.1), result(4096, 3, 1.3), result(8192, 3, 1.2), result(16384, 0, 1.4),
          result(8192, 0, 1.0)]
    assert expansion_candidates(rs, 1, cfg) == []
    # results at another thread count do not count
    assert expansion_candidates([result(4096, 3, 1.3, threads=2)], 1, cfg) == []


def test_refinement_bisects_on_the_line_grid() -> None:
    cfg = SearchConfig(grid=GRID, line_size=64)
    rs = [result(2048, 3, 1.2), result(4096, 3, 1.4), result(8192, 3, 1.1), result(4096, 0, 1.45)]
    # best is d4096-h0: only hint 0 has no neighbours, so nothing to bisect for it
    assert refinement_candidates(rs, 1, cfg) == []
    rs = rs[:3]
    assert refinement_candidates(rs, 1, cfg) == [Candidate(3072, 3), Candidate(6144, 3)]
    rs += [result(3072, 3, 1.45), result(6144, 3, 1.2)]
    assert refinement_candidates(rs, 1, cfg) == [Candidate(2560, 3), Candidate(3584, 3)]
    # one line apart: nothing strictly inside
    tight = [result(4096, 3, 1.3), result(4160, 3, 1.2), result(4032, 3, 1.2)]
    assert refinement_candidates(tight, 1, cfg) == []


def test_best_prefers_confirmation_over_search_results() -> None:
    rs = [result(4096, 3, 1.6), result(2048, 3, 1.4), result(4096, 3, 1.3, phase="confirm")]
    best = best_result(rs, 1)
    assert best is not None and best.candidate == Candidate(2048, 3)
    assert best_result(rs, 2) is None
    # a disturbed probe (wide CI) does not beat a clean one on its lucky point estimate
    noisy = [result(8192, 3, 1.25, half_width=0.4), result(4096, 3, 1.15, half_width=0.03)]
    best = best_result(noisy, 1)
    assert best is not None and best.candidate == Candidate(4096, 3)
    assert best_result([ProbeResult(Candidate(512, 3), 1, "coarse", None, None, "unavailable")], 1) is None


# ---------------------------------------------------------------------------------------------------- rules


def test_rollback_rule_needs_the_ci_above_one() -> None:
    assert keep_decision(result(4096, 3, 1.05, half_width=0.03), 0.0)[0] is True
    assert keep_decision(result(4096, 3, 1.05, half_width=0.06), 0.0)[0] is False  # CI reaches 0.99
    kept, why = keep_decision(result(4096, 3, 0.946, half_width=0.05), 0.0)
    assert not kept and "runs slower than off" in why and "lies wholly below 1.000" in why  # [0.896, 0.996]
    assert "does not lie above 1.000" in keep_decision(result(4096, 3, 1.02, half_width=0.05), 0.0)[1]
    assert keep_decision(result(4096, 3, 1.05, half_width=0.03), 0.03)[0] is False  # min gain 3 %
    assert keep_decision(None, 0.0)[0] is False
    assert loses(result(4096, 3, 0.95, half_width=0.02), 0.01) is True  # CI wholly below 1
    assert loses(result(4096, 3, 0.985, half_width=0.05), 0.01) is True  # point estimate below -1 %
    assert loses(result(4096, 3, 0.995, half_width=0.05), 0.01) is False


def test_budget_estimates_from_measured_batches() -> None:
    clock = FakeClock()
    b = Budget(100.0, clock)
    assert b.estimate(3, 4) is None and b.fits(3, 4)
    b.record(3, 4, 40.0)  # 4 arms x 5 calls = 20 calls in 40 s
    assert b.estimate(1, 4) == pytest.approx(20.0)
    clock.now = 70.0
    assert b.fits(1, 4) and not b.fits(1, 4, reserve=15.0)
    b.exclude(50.0)  # lock wait is not spent
    assert b.remaining() == pytest.approx(80.0)


# ---------------------------------------------------------------------------------------------------- search


def test_search_finds_hint_3_a_few_kib_ahead_against_a_hint_0_start() -> None:
    """A peaked response: hint 3 at 4 KiB ~1.5x, hint 0 gains far less, twice the distance is
    worse. The profile says hint 0; the search must overturn it."""
    clock = FakeClock()
    probe = FakeProbe(peaked(4096, 3), clock)
    out = tune_site(probe, Candidate(4096, 0), SearchConfig(grid=GRID), Budget(10_000, clock), threads=1,
                    verify_threads=(2,))
    assert out.kept and out.winner == Candidate(4096, 3)
    assert {c.hint for c in probe.probed()} >= {0, 1, 2, 3}  # promising: hints 1 and 2 were tried too
    phases = [p for _, _, _, p in probe.calls]
    assert phases[0] == "coarse" and "confirm" in phases and phases[-1] == "verify"
    assert all(len(c) <= 4 for c, _, _, _ in probe.calls)  # batches capped
    assert out.by_threads[1].phase == "confirm" and out.by_threads[2].phase == "verify"


def test_search_expands_to_a_far_optimum_and_refines_between_grid_points() -> None:
    clock = FakeClock()

    def speed(c: Candidate, threads: int) -> float:
        return 1.0 + 0.4 * max(0.0, 1.0 - abs(c.distance - 12288) / 12288) * (1.0 if c.hint == 3 else 0.2)

    probe = FakeProbe(speed, clock, noise=0.01)
    out = tune_site(probe, Candidate(1024, 3), SearchConfig(grid=GRID), Budget(10_000, clock))
    probed = probe.probed()
    assert Candidate(16384, 3) in probed and Candidate(8192, 3) in probed  # geometric expansion went up
    assert out.kept and out.winner is not None and out.winner.hint == 3
    assert out.winner.distance not in GRID and out.winner.distance % 64 == 0  # refined between grid points
    assert abs(out.winner.distance - 12288) <= 2048


def test_site_that_never_helps_is_rolled_back_without_confirmation() -> None:
    clock = FakeClock()
    probe = FakeProbe(lambda c, t: 0.97, clock)
    out = tune_site(probe, Candidate(2048, 3), SearchConfig(grid=GRID), Budget(10_000, clock), verify_threads=(2,))
    assert not out.kept and "no setting beats off" in out.reason
    assert probe.calls and all(p not in ("confirm", "verify") for _, _, _, p in probe.calls)
    # nothing above off to bisect toward: no refinement batch either (the grid and its expansion decide)
    assert {p for _, _, _, p in probe.calls} <= {"coarse", "expand"}


def test_winner_curse_is_caught_by_the_confirmation() -> None:
    """A noisy search probe looks like a win; the longer confirmation probe does not: dropped."""
    clock = FakeClock()

    class Lucky(FakeProbe):
        def __call__(self, candidates, threads, rounds, phase):  # type: ignore[no-untyped-def]
            got = super().__call__(candidates, threads, rounds, phase)
            if phase == "confirm":
                return [ProbeResult(r.candidate, threads, phase, 1.01, (0.98, 1.04), "x") for r in got]
            return got

    probe = Lucky(lambda c, t: 1.08 if c == Candidate(2048, 3) else 0.99, clock)
    out = tune_site(probe, Candidate(2048, 3), SearchConfig(grid=GRID), Budget(10_000, clock))
    assert not out.kept and out.confirmed and "does not beat off" in out.reason


def test_loss_at_another_thread_count_triggers_a_retune_and_a_compromise() -> None:
    """At 2 threads the 1-thread winner (4 KiB) is slower than off, 2 KiB is fine at both: keep 2 KiB."""
    clock = FakeClock()

    def speed(c: Candidate, threads: int) -> float:
        if c.hint != 3:
            return 1.0
        table1 = {2048: 1.35, 4096: 1.5}
        table2 = {2048: 1.05, 4096: 0.9}
        return (table1 if threads == 1 else table2).get(c.distance, 1.0)

    probe = FakeProbe(speed, clock, noise=0.01)
    out = tune_site(probe, Candidate(4096, 3), SearchConfig(grid=GRID), Budget(10_000, clock), threads=1,
                    verify_threads=(2,))
    assert any(t == 2 and p == "coarse" for _, t, _, p in probe.calls)  # retuned at 2 threads
    assert out.kept and out.winner == Candidate(2048, 3)
    assert out.by_threads[1].ratio == pytest.approx(1.35) and out.by_threads[2].ratio == pytest.approx(1.05)


def test_loss_everywhere_else_drops_the_site() -> None:
    clock = FakeClock()
    probe = FakeProbe(lambda c, t: 1.3 if t == 1 and c.hint == 3 else 0.9, clock, noise=0.01)
    out = tune_site(probe, Candidate(4096, 3), SearchConfig(grid=GRID), Budget(10_000, clock), verify_threads=(2,))
    assert not out.kept and "loses elsewhere" in out.reason


def test_budget_stops_the_search_and_reports_what_was_reached() -> None:
    clock = FakeClock()
    probe = FakeProbe(peaked(4096, 3), clock, run_seconds=1.0)
    # the first batch (4 candidates + off, 5 calls each) costs 25 s; the budget allows little more
    out = tune_site(probe, Candidate(4096, 0), SearchConfig(grid=GRID), Budget(60, clock), verify_threads=(2,))
    assert out.phases_skipped and out.stopped_because in ("budget", "rolled back")
    assert clock.now <= 60 + 25  # no batch started that the estimate said would not fit (+ the first)
    assert out.winner is not None and out.winner.hint == 3


def test_nothing_fits_when_the_budget_is_gone() -> None:
    clock = FakeClock()
    probe = FakeProbe(peaked(4096, 3), clock)
    budget = Budget(10, clock)
    clock.now = 20
    out = tune_site(probe, Candidate(4096, 0), SearchConfig(grid=GRID), budget)
    assert not probe.calls and not out.kept and out.winner is None and "budget" in out.reason


def test_candidate_names() -> None:
    assert Candidate(4096, 3).name == "d4096-h3" and Candidate(0, OFF).name == "off"
