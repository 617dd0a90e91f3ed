"""tune's one budget over several sites: the split by kernel share, time moving to open decisions, the
--min-share threshold and the joint verification's drop loop — driven by a fake prober (no subprocess)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
from tune_fakes import FakeClock, FakeSites, helps, outcome

from amppatch.tune import (
    Budget,
    Candidate,
    Member,
    RaceResult,
    SearchConfig,
    SiteOutcome,
    SitePasses,
    site_weights,
    split_budget,
    tune_site,
    verify_jointly,
)
from amppatch.tune.budget import JOINT_RESERVE_FRACTION, SubBudget, extension_rounds, joint_reserve, open_width
from amppatch.tune.shares import kernel_share

GRID = (512, 1024, 2048, 4096, 8192, 16384)


# ---------------------------------------------------------------------------------------------------- the split


def test_weights_are_kernel_shares_divided_among_the_kernels_sites() -> None:
    # a Q4_K_M model: the repacked Q4_K gemv (one site) and the Q6_K dot product (two sites)
    weights = site_weights([0.76, 0.18, 0.18], ["ggml_gemv_q4_K_8x8_q8_K", "ggml_vec_dot_q6_K_q8_K",
                                                "ggml_vec_dot_q6_K_q8_K"])
    assert weights == pytest.approx([0.76, 0.09, 0.09])
    assert site_weights([0.6, None], ["a", "b"]) == pytest.approx([0.6, 0.6])  # unknown: the mean known share
    assert site_weights([None, None, None], ["a", "b", "c"]) == [1.0, 1.0, 1.0]  # no profile: equal


def test_split_is_proportional_to_weight_and_to_the_open_ci_width() -> None:
    assert split_budget([0.76, 0.09, 0.09], 940.0) == pytest.approx([760.0, 90.0, 90.0])
    assert sum(split_budget([3.0, 1.0], 100.0)) == pytest.approx(100.0)
    # extension pass: only open decisions share, by weight x CI width
    assert split_budget([0.4, 0.3, 0.2], 100.0, [0.04, None, 0.08]) == pytest.approx([50.0, 0.0, 50.0])
    assert split_budget([0.5, 0.5], 0.0) == [0.0, 0.0]
    assert split_budget([0.5, 0.5], -5.0) == [0.0, 0.0]
    assert split_budget([0.5, 0.5], 100.0, [None, None]) == [0.0, 0.0]
    assert split_budget([0.5], math.nan) == [0.0]


def test_open_width_only_for_a_decision_more_rounds_could_turn() -> None:
    assert open_width(1.03, (0.99, 1.07), 1.0) == pytest.approx(0.08)  # estimate above, CI reaches 1: open
    assert open_width(1.03, (1.01, 1.05), 1.0) is None  # kept: decided
    assert open_width(0.99, (0.95, 1.03), 1.0) is None  # the estimate itself does not gain
    assert open_width(1.03, (1.01, 1.05), 1.02) == pytest.approx(0.04)  # --min-gain moves the threshold
    assert open_width(None, None, 1.0) is None


def test_extension_rounds_fit_the_slice() -> None:
    assert extension_rounds(100.0, 10.0, 8) == 9  # 10 rounds of 10 s, one of them the warmup
    assert extension_rounds(15.0, 10.0, 8) == 2  # never fewer than two blocks
    assert extension_rounds(100.0, None, 8) == 8  # nothing measured yet: the confirmation's rounds


def test_lock_waits_are_excluded_and_counted_apart_from_replayed_time() -> None:
    clock = FakeClock()
    parent = Budget(1000.0, clock)
    share = SubBudget(parent, 300.0)
    share.wait_for_lock(40.0)
    share.charge(100.0)  # an earlier sitting's batch, replayed
    assert parent.spent() == pytest.approx(60.0) and share.spent() == pytest.approx(60.0)
    assert parent.lock_waited == share.lock_waited == 40.0


def test_joint_reserve() -> None:
    clock = FakeClock()
    b = Budget(1000.0, clock)
    assert joint_reserve(b, 8, 1) == 0.0  # one site: its confirmation is the joint result
    assert joint_reserve(b, 8, 3) == pytest.approx(1000.0 * JOINT_RESERVE_FRACTION)
    b.record(1, 8, 90.0)  # 2 arms x 9 calls = 18 calls in 90 s
    assert joint_reserve(b, 8, 3) == pytest.approx(90.0)


def test_kernel_share_is_the_sample_share_of_the_sites_function() -> None:
    hot = [{"name": "ggml_gemv_q4_K_8x8_q8_K", "share": 0.76}, {"name": "ggml_vec_dot_q6_K_q8_K", "share": 0.18},
           {"name": "void ggml::cpu::repack::gemv<block_q4_0, 8l, 8l, (ggml_type)2>(int, float*)", "share": 0.5}]
    assert kernel_share({"function": "ggml_gemv_q4_K_8x8_q8_K"}, hot, []) == 0.76
    assert kernel_share({"function": "gemv<block_q4_0, 8l, 8l, (ggml_type)2>"}, hot, []) == 0.5
    assert kernel_share({"function": "wrapper", "requested": "ggml_vec_dot_q6_K_q8_K"}, hot, []) == 0.18
    # not among the hot functions: the profile's loop shares of that function
    loops = [{"function": "k", "share": 0.03}, {"function": "k", "share": 0.02}]
    assert kernel_share({"function": "k"}, hot, loops) == pytest.approx(0.05)
    assert kernel_share({"function": "unknown"}, hot, loops) is None


# ---------------------------------------------------------------------------------------------------- passes


def passes(outcomes: list[SiteOutcome], prober: FakeSites, seconds: float, clock: FakeClock, *,
           min_share: float = 0.05) -> tuple[SitePasses, Budget]:
    budget = Budget(seconds, clock)
    return SitePasses(outcomes, prober, SearchConfig(grid=GRID), budget, threads=1, verify_threads=(),
                      min_share=min_share, search=tune_site), budget


def test_hottest_first_and_unused_time_returns_to_the_pool() -> None:
    clock = FakeClock()
    # the hot kernel is listed last; it never helps, so its search stops early and leaves time behind
    prober = FakeSites({0: helps(1.2), 1: helps(1.2), 2: lambda c: 0.97}, clock)
    sites = [outcome(0, "q6a", 0.18, 0.09), outcome(1, "q6b", 0.18, 0.09), outcome(2, "gemv", 0.76)]
    p, _ = passes(sites, prober, 3000.0, clock)
    p.search_pass()
    assert next(s for s, _, _, _ in prober.calls) == 2  # searched first
    hot, first_q6 = sites[2], sites[0]
    assert hot.allotted == pytest.approx(3000.0 * (1 - JOINT_RESERVE_FRACTION) * 0.76 / 0.94)
    assert hot.spent < hot.allotted / 2 and hot.dropped_by == "rollback"
    # half of what is left (less the joint reserve), not its 9.6 % of the start
    assert first_q6.allotted > 0.4 * (3000.0 - hot.spent) > 3 * 3000.0 * 0.09 / 0.94
    assert first_q6.kept and sites[1].kept
    # the second q6 site was tuned with the first at its setting
    assert first_q6.search is not None and sites[1].with_on == {0: first_q6.search.winner}


def test_a_kernel_below_min_share_is_not_tuned_and_says_why() -> None:
    clock = FakeClock()
    prober = FakeSites({0: helps(1.2), 1: helps(1.2)}, clock)
    sites = [outcome(0, "hot", 0.9), outcome(1, "cold", 0.03)]
    p, _ = passes(sites, prober, 3000.0, clock)
    joint = p.run()
    assert sites[1].dropped_by == "threshold" and "3.0%" in sites[1].reason and "5.0%" in sites[1].reason
    assert not prober.phases(1) and sites[1].search is None
    assert sites[0].kept and joint.status == "single" and not prober.races  # tuned alone: no race needed
    # without a profile nothing is known to be cold: every site is tuned
    sites = [outcome(0, "a", None, 1.0), outcome(1, "b", None, 1.0)]
    p, _ = passes(sites, FakeSites({0: helps(1.2), 1: helps(1.2)}, clock), 3000.0, clock)
    p.threshold_pass()
    assert all(s.dropped_by is None for s in sites)


def test_the_budget_running_out_is_said_plainly() -> None:
    clock = FakeClock()
    prober = FakeSites({0: helps(1.2), 1: helps(1.2)}, clock, run_seconds=5.0)
    sites = [outcome(0, "hot", 0.95), outcome(1, "cool", 0.05)]
    p, _ = passes(sites, prober, 300.0, clock)
    p.search_pass()
    assert sites[1].dropped_by == "budget" and "the budget ran out before its first probe" in sites[1].reason


def test_a_cooler_site_gets_at_least_one_decision_while_the_pool_lasts() -> None:
    clock = FakeClock()
    # the hot kernel never helps and spends most of the budget; three cooler sites share what is left, each
    # share too small for its first batch and confirmation
    prober = FakeSites({0: lambda c: 0.97, 1: helps(1.2), 2: helps(1.2), 3: helps(1.2)}, clock, run_seconds=5.0)
    sites = [outcome(0, "gemv", 0.6), outcome(1, "q6", 0.2), outcome(2, "q5", 0.1), outcome(3, "q8", 0.1)]
    p, _ = passes(sites, prober, 1000.0, clock)
    p.search_pass()
    floor = p.decision_floor(sites[1])
    assert floor is not None and floor == pytest.approx(5.0 * (5 * 5 + 2 * 9))  # coarse batch of 4 + confirm
    second = sites[1]
    assert second.allotted >= floor and "coarse" in prober.phases(1) and second.kept
    # hottest first: no cooler site is searched while a hotter one went without a probe for want of time
    searched = [bool(prober.phases(i)) for i in range(4)]
    assert searched == sorted(searched, reverse=True)
    assert any(s.dropped_by == "budget" for s in sites[2:])
    starved = next(s for s in sites if s.dropped_by == "budget")
    assert starved.allotted < floor


def test_an_open_decision_gets_leftover_time_and_is_decided_on_the_pooled_evidence() -> None:
    clock = FakeClock()
    # site 0 gains 3 % but its confirmation CI (± 5 %) reaches 1; pooled with more rounds it is ± 1 %
    prober = FakeSites({0: helps(1.03), 1: lambda c: 0.9}, clock, noise=0.05, extend_noise=0.01)
    sites = [outcome(0, "a", 0.5), outcome(1, "b", 0.4)]
    p, _ = passes(sites, prober, 5000.0, clock)
    p.search_pass()
    assert sites[0].dropped_by == "rollback" and "does not beat off" in sites[0].reason
    p.extension_pass()
    assert "extend" in prober.phases(0) and "extend" not in prober.phases(1)  # site 1 is decided: it loses
    assert sites[0].extension > 0 and sites[0].kept and sites[0].dropped_by is None
    ev = sites[0].evidence(1)
    assert ev is not None and ev.phase == "extend" and ev.ci_low > 1.0
    # the extension ran with every other site as at its confirmation (here: all off)
    assert all(fixed == {} for s, phase, _, fixed in prober.calls if phase == "extend")


def test_joint_verification_drops_the_smallest_contribution_until_the_set_stands() -> None:
    clock = FakeClock()
    budget = Budget(1000.0, clock)
    a, b, c = (Member(i, k, Candidate(4096, 3), r, (r - 0.01, r + 0.01), alone=i == 0)
               for i, (k, r) in enumerate([("A", 1.10), ("B", 1.05), ("C", 1.02)]))
    races: list[set[int]] = []

    def race(settings: Mapping[int, Candidate], threads: int, rounds: int) -> RaceResult:
        races.append(set(settings))
        clock.now += 30.0
        return RaceResult(0.99, (0.97, 1.01), "inconclusive") if 2 in settings else \
            RaceResult(1.12, (1.09, 1.15), "faster")

    out = verify_jointly(race, [a, b, c], budget, threads=1, rounds=8, threshold=1.0)
    assert races == [{0, 1, 2}, {0, 1}]
    assert out.status == "verified" and [m.key for m in out.kept] == ["A", "B"]
    ((dropped, why),) = out.dropped
    assert dropped.key == "C" and "0.990 [0.970, 1.010]" in why and "1.020 [1.010, 1.030]" in why
    assert out.result is not None and out.result.ratio == 1.12 and budget.spent() == pytest.approx(60.0)
    doc = out.to_json()
    assert doc["sites"] == ["A", "B"] and doc["ci95"] == [1.09, 1.15] and doc["steps"][0]["dropped"] == "C"


def test_joint_verification_without_a_measurement_drops_nothing() -> None:
    clock = FakeClock()
    a = Member(0, "A", Candidate(4096, 3), 1.1, (1.05, 1.15), alone=True)
    b = Member(1, "B", Candidate(2048, 0), 1.05, (1.01, 1.09), alone=False)

    def never(settings: Mapping[int, Candidate], threads: int, rounds: int) -> RaceResult:
        raise AssertionError("no race was affordable")

    spent = Budget(10.0, clock)
    clock.now = 20.0
    out = verify_jointly(never, [a, b], spent, threads=1, rounds=8, threshold=1.0)
    assert out.status == "unverified" and "budget ran out" in out.reason and not out.dropped
    assert len(out.kept) == 2

    def broken(settings: Mapping[int, Candidate], threads: int, rounds: int) -> RaceResult:
        return RaceResult(None, None, "unavailable")

    out = verify_jointly(broken, [a, b], Budget(1000.0, clock), threads=1, rounds=8, threshold=1.0)
    assert out.status == "unverified" and "no usable measurement" in out.reason and len(out.kept) == 2
    # a lone site measured alone needs no race; one measured with others on races, and may be dropped
    assert verify_jointly(never, [a], Budget(1000.0, clock), threads=1, rounds=8, threshold=1.0).status == "single"
    lost = verify_jointly(lambda s, t, r: RaceResult(1.0, (0.98, 1.02), "x"), [b], Budget(1000.0, clock),
                          threads=1, rounds=8, threshold=1.0)
    assert lost.status == "emptied" and not lost.kept and lost.dropped[0][0].key == "B"
    assert verify_jointly(never, [], Budget(1000.0, clock), threads=1, rounds=8, threshold=1.0).status == "none"


def test_passes_drop_a_site_the_joint_race_rejects() -> None:
    clock = FakeClock()

    def joint(settings: Mapping[int, Candidate]) -> tuple[float, float]:
        return (1.0, 0.03) if len(settings) > 1 else (1.08, 0.02)  # the two together gain nothing

    prober = FakeSites({0: helps(1.2), 1: helps(1.05)}, clock, joint=joint)
    sites = [outcome(0, "a", 0.6), outcome(1, "b", 0.3)]
    p, _ = passes(sites, prober, 5000.0, clock)
    out = p.run()
    assert sites[0].kept and sites[1].dropped_by == "joint" and not sites[1].kept
    assert "joint verification" in sites[1].reason and "1.000 [0.970, 1.030]" in sites[1].reason
    # site 1 was tuned with site 0 on, so the survivor's own confirmation (alone) is the joint result
    assert prober.races == [{0: Candidate(4096, 3), 1: Candidate(4096, 3)}]
    assert out.status == "single" and [m.key for m in out.kept] == ["a#0 x"]
    assert 1 not in prober.fixed


def test_an_extension_pools_its_blocks_with_the_confirmation() -> None:
    from amppatch.tune.probing import pooled_comparison

    def report(seed: int) -> dict[str, object]:
        samples = []
        for block in range(4):  # each report numbers its blocks from 0
            for slot, arm in enumerate(("off", "d4096-h3")):
                for rep in range(2):
                    ms = (100.0 if arm == "off" else 90.0) + (block * 7 + rep * 3 + seed) % 5 * 0.2
                    samples.append({"round": block, "block": block, "slot": slot, "arm": arm, "setting": "tg32-t1",
                                    "rep": rep, "ns": int(ms * 1e6), "n_tokens": 32})
        return {"samples": samples}

    one = pooled_comparison([report(0)], "off", "d4096-h3", "tg32-t1", min_effect=0.05, seed=0)
    both = pooled_comparison([report(0), report(1)], "off", "d4096-h3", "tg32-t1", min_effect=0.05, seed=0)
    assert one is not None and both is not None
    assert one.n_blocks == 4 and both.n_blocks == 8  # blocks stay apart, each one paired
    assert both.ratio == pytest.approx(100 / 90, rel=0.01)
