"""amppatch.stats against scipy and against simulated benchmarks with known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from amppatch import stats


def test_tokens_per_second_from_samples_ns() -> None:
    tok = stats.tokens_per_second([1_000_000_000, 2_000_000_000], 64)
    assert tok.tolist() == [64.0, 32.0]
    with pytest.raises(ValueError):
        stats.tokens_per_second([0], 64)


def test_summarize_matches_numpy() -> None:
    x = [10.0, 12.0, 9.0, 11.0, 30.0]
    s = stats.summarize(x)
    assert s.n == 5
    assert s.median == pytest.approx(np.median(x))
    assert s.q1 == pytest.approx(np.percentile(x, 25))
    assert s.iqr == pytest.approx(np.percentile(x, 75) - np.percentile(x, 25))
    assert s.cv == pytest.approx(np.std(x, ddof=1) / np.mean(x))
    assert math.isnan(stats.summarize([5.0]).cv)
    with pytest.raises(ValueError):
        stats.summarize([])


@pytest.mark.parametrize("seed", range(12))
def test_mann_whitney_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(25):
        n1, n2 = int(rng.integers(1, 20)), int(rng.integers(1, 20))
        if rng.random() < 0.4:  # discrete values: ties, so the asymptotic path with tie correction
            x = rng.integers(0, 5, n1).astype(float)
            y = rng.integers(0, 5, n2).astype(float)
        else:
            x = rng.normal(0.0, 1.0, n1)
            y = rng.normal(rng.uniform(-1, 1), 1.0, n2)
        ours = stats.mann_whitney_u(x, y)
        ref = sps.mannwhitneyu(x, y, alternative="two-sided", method="auto")
        assert ours.u == pytest.approx(ref.statistic)
        assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-12), (n1, n2, ours.method)


def test_mann_whitney_exact_and_asymptotic_paths_are_both_taken() -> None:
    assert stats.mann_whitney_u([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]).method == "exact"
    many = stats.mann_whitney_u(np.arange(20.0), np.arange(20.0) + 0.5)
    assert many.method == "asymptotic"
    # all values equal: no evidence of a difference
    assert stats.mann_whitney_u([1.0] * 10, [1.0] * 10).p_value == 1.0


def test_u_distribution_counts_all_arrangements() -> None:
    counts = stats._u_distribution(3, 4)
    assert counts.sum() == pytest.approx(math.comb(7, 3))
    assert counts.tolist() == counts[::-1].tolist()  # symmetric


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (1.06, 1.20, "faster"),
        (0.80, 0.94, "slower"),
        (0.97, 1.03, "equivalent"),
        (0.95, 1.05, "equivalent"),  # the bounds themselves are inside
        (1.01, 1.08, "inconclusive"),  # above 1 but not beyond the effect that matters
        (0.90, 1.10, "inconclusive"),
    ],
)
def test_decide(low: float, high: float, expected: str) -> None:
    assert stats.decide(low, high, 0.05) == expected


def _blocks(rng: np.random.Generator, n_blocks: int, per_block: int, center: float, noise: float,
            block_load: np.ndarray | None = None) -> list[list[float]]:
    out = []
    for b in range(n_blocks):
        load = 1.0 if block_load is None else block_load[b]
        out.append((center * load * rng.lognormal(0.0, noise, per_block)).tolist())
    return out


def test_compare_detects_a_clear_speedup_and_slowdown() -> None:
    rng = np.random.default_rng(1)
    a = _blocks(rng, 8, 6, 100.0, 0.02)
    b = _blocks(rng, 8, 6, 120.0, 0.02)
    up = stats.compare(a, b, seed=3)
    assert up.verdict == "faster"
    assert up.ratio == pytest.approx(1.2, rel=0.03)
    assert up.ci_low < up.ratio < up.ci_high
    assert up.paired and up.n_blocks == 8 and up.n_a == 48
    assert up.p_value < 1e-6
    down = stats.compare(b, a, seed=3)
    assert down.verdict == "slower"


def test_compare_says_equivalent_for_tight_identical_arms_and_inconclusive_for_noisy_ones() -> None:
    rng = np.random.default_rng(2)
    a = _blocks(rng, 10, 6, 100.0, 0.01)
    b = _blocks(rng, 10, 6, 100.0, 0.01)
    assert stats.compare(a, b).verdict == "equivalent"
    a = _blocks(rng, 3, 2, 100.0, 0.5)
    b = _blocks(rng, 3, 2, 100.0, 0.5)
    noisy = stats.compare(a, b)
    assert noisy.verdict == "inconclusive"
    assert noisy.resolution > 0.05


def test_compare_is_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(4)
    a = _blocks(rng, 9, 4, 100.0, 0.1)
    b = _blocks(rng, 9, 4, 100.0, 0.1)
    assert stats.compare(a, b, seed=7) == stats.compare(a, b, seed=7)
    # the seed moves the bootstrap's interval; the block t interval has no randomness
    assert stats.compare(a, b, seed=7).boot_low != stats.compare(a, b, seed=8).boot_low


def test_bootstrap_method_follows_the_number_of_blocks() -> None:
    rng = np.random.default_rng(6)
    for n_blocks, method in ((1, "unpaired"), (2, "two-stage"), (4, "two-stage"), (5, "cluster"), (12, "cluster")):
        a = _blocks(rng, n_blocks, 3, 100.0, 0.05)
        b = _blocks(rng, n_blocks, 3, 100.0, 0.05)
        assert stats.compare(a, b, n_boot=200).method == method


def test_cluster_bootstrap_replicates_are_whole_blocks() -> None:
    """Blocks of constant values: a cluster replicate can only produce ratios made of whole blocks."""
    a = [[100.0] * 3 for _ in range(6)]
    b = [[100.0] * 3, [100.0] * 3, [100.0] * 3, [110.0] * 3, [110.0] * 3, [110.0] * 3]
    c = stats.compare(a, b, n_boot=2000, seed=1)
    assert c.method == "cluster"
    assert c.boot_low >= 1.0 and c.boot_high <= 1.1
    # the t interval over the six block ratios (three 1.0, three 1.1) reaches beyond them
    assert c.ci_low == c.block_low < 1.0 and c.ci_high == c.block_high > 1.1


def test_compare_skips_blocks_missing_an_arm_and_falls_back_to_unpaired() -> None:
    one = stats.compare([[10.0, 11.0], [], [10.5]], [[10.0, 10.2], [9.0], []])
    assert one.n_blocks == 1 and not one.paired
    assert one.n_a == 2 and one.n_b == 2
    with pytest.raises(ValueError):
        stats.compare([[1.0], []], [[], [1.0]])
    with pytest.raises(ValueError):
        stats.compare([[1.0]], [[1.0], [2.0]])


def test_unpaired_ci_agrees_with_scipy_bootstrap() -> None:
    """With one block the bootstrap resamples each arm independently: scipy's percentile bootstrap of the
    same statistic must give (nearly) the same interval."""
    rng = np.random.default_rng(5)
    a = rng.lognormal(np.log(100), 0.08, 40)
    b = rng.lognormal(np.log(104), 0.08, 40)
    ours = stats.compare([a.tolist()], [b.tolist()], n_boot=20000, seed=1)
    ref = sps.bootstrap(
        (a, b),
        lambda x, y, axis=-1: np.median(y, axis=axis) / np.median(x, axis=axis),
        n_resamples=20000,
        method="percentile",
        paired=False,
        vectorized=True,
        random_state=np.random.default_rng(1),
    )
    assert ours.ci_low == pytest.approx(ref.confidence_interval.low, abs=0.01)
    assert ours.ci_high == pytest.approx(ref.confidence_interval.high, abs=0.01)


def test_aa_false_verdicts_are_rare_even_with_load_that_drifts_between_blocks() -> None:
    """Simulated A/A: 10 % per-sample noise plus a ±15 % load level shared by both arms within a block.
    The block-paired bootstrap must almost never call faster/slower (a 95 % CI: ≤ ~5 % false calls)."""
    rng = np.random.default_rng(11)
    false_calls = 0
    trials = 150
    for _ in range(trials):
        load = rng.uniform(0.85, 1.15, 8)
        a = _blocks(rng, 8, 6, 100.0, 0.10, load)
        b = _blocks(rng, 8, 6, 100.0, 0.10, load)
        if stats.compare(a, b, n_boot=1000, seed=int(rng.integers(1 << 30))).verdict in ("faster", "slower"):
            false_calls += 1
    assert false_calls / trials <= 0.05


def test_true_effect_is_covered_by_the_ci_most_of_the_time() -> None:
    rng = np.random.default_rng(12)
    covered = 0
    trials = 120
    for _ in range(trials):
        load = rng.uniform(0.9, 1.1, 8)
        a = _blocks(rng, 8, 6, 100.0, 0.10, load)
        b = _blocks(rng, 8, 6, 110.0, 0.10, load)
        c = stats.compare(a, b, n_boot=1000, seed=int(rng.integers(1 << 30)))
        covered += c.ci_low <= 1.10 <= c.ci_high
    assert covered / trials >= 0.88


def test_spearman_and_drift_match_scipy() -> None:
    rng = np.random.default_rng(3)
    y = (np.arange(12) * 0.5 + rng.normal(0, 1, 12)).tolist()
    d = stats.drift(y)
    ref = sps.spearmanr(np.arange(12), y)
    assert d.spearman_rho == pytest.approx(ref.statistic)
    assert d.slope_per_round > 0
    assert d.p_value < 0.05
    ties = [1.0, 1.0, 2.0, 2.0, 3.0]
    assert stats.spearman(range(5), ties) == pytest.approx(sps.spearmanr(range(5), ties).statistic)
    flat = stats.drift([5.0, 5.0, 5.0, 5.0])
    assert math.isnan(flat.spearman_rho) and flat.slope_per_round == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(stats.drift([1.0, 2.0]).spearman_rho)


def test_percentile() -> None:
    values = list(range(1, 101))
    assert stats.percentile(values, 50) == pytest.approx(50.5)
    assert stats.percentile(values, 99) == pytest.approx(np.percentile(values, 99))
