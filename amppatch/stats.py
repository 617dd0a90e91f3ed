"""Pure statistics for ab-test: no subprocess, no I/O, only numbers in and numbers out.

Everything works on raw llama-bench ``samples_ns`` turned into tokens per second, never on llama-bench's
``avg_ts`` (a mean of rates). The comparison of two arms is a ratio of medians with a bootstrap confidence
interval that resamples whole interleaved blocks (so load that drifts across blocks widens the interval,
as it should; with fewer than five blocks it also resamples samples inside each chosen block), widened to
cover a Student t interval over the per-block ratios (few blocks; see block_ratio_interval); the
Mann–Whitney U p-value is computed here too (exact for small samples without ties, normal approximation
with tie and continuity corrections otherwise, the same rule scipy's ``method="auto"`` uses), so scipy
stays a test-only dependency.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

VERDICTS = ("faster", "slower", "equivalent", "inconclusive")

# How the CI behind a verdict is made (see compare()). "bootstrap": the percentile block bootstrap alone
# (before 2026-12); "bootstrap+blocks": the union of that and a Student t interval over the per-block
# ratios, so a verdict needs both to agree.
INTERVALS = ("bootstrap", "bootstrap+blocks")
DEFAULT_INTERVAL = "bootstrap+blocks"

# What the rank tests accept: plain sequences from callers, arrays from the bootstrap (both go through np.asarray).
Floats = Sequence[float] | np.ndarray

# From this many shared blocks on, the bootstrap resamples whole blocks only (see compare()).
CLUSTER_MIN_BLOCKS = 5

# scipy's rule: below this size (on either side) and without ties the exact U distribution is used.
_EXACT_MAX_N = 8


def tokens_per_second(samples_ns: Sequence[float], n_tokens: int) -> np.ndarray:
    """llama-bench's per-repetition wall times (ns for n_tokens tokens) as tokens per second."""
    ns = np.asarray(samples_ns, dtype=float)
    if ns.size and np.any(ns <= 0):
        raise ValueError("samples_ns must be positive")
    return n_tokens * 1e9 / ns


@dataclass(frozen=True)
class Summary:
    """Location and spread of one arm's samples (tokens per second)."""

    n: int
    median: float
    q1: float
    q3: float
    iqr: float
    mean: float
    cv: float  # sample standard deviation / mean; nan with fewer than two samples
    minimum: float
    maximum: float


def summarize(values: Sequence[float]) -> Summary:
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no samples to summarize")
    q1, median, q3 = (float(v) for v in np.percentile(x, [25, 50, 75]))
    mean = float(x.mean())
    cv = float(x.std(ddof=1) / mean) if x.size > 1 and mean != 0 else math.nan
    return Summary(
        n=int(x.size),
        median=median,
        q1=q1,
        q3=q3,
        iqr=q3 - q1,
        mean=mean,
        cv=cv,
        minimum=float(x.min()),
        maximum=float(x.max()),
    )


def percentile(values: Sequence[float], q: float) -> float:
    """One percentile (linear interpolation); with n < 100, p99 is essentially the maximum — say so."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values")
    return float(np.percentile(x, q))


# ----------------------------------------------------------------------------------------------------
# Mann–Whitney U


@dataclass(frozen=True)
class MannWhitney:
    u: float  # U statistic of the first sample (scipy's convention)
    p_value: float  # two-sided
    method: str  # "exact" or "asymptotic"


def _rank_with_ties(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks (1-based) and the sizes of the tie groups."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(x.size, dtype=float)
    # Boundaries of runs of equal values.
    change = np.flatnonzero(np.diff(sorted_x) != 0) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [x.size]))
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + 1 + end) / 2.0
    return ranks, (ends - starts)


def _u_distribution(m: int, n: int) -> np.ndarray:
    """Number of arrangements giving U = 0..m*n for sample sizes m and n (no ties).

    These are the coefficients of the Gaussian binomial [m+n choose m]_q, built as
    prod_{i=1..m} (1 - q^(n+i)) / (1 - q^i); float64 keeps large counts (relative precision is enough
    for a p-value)."""
    size = m * n + 1
    coeffs = np.zeros(size, dtype=float)
    coeffs[0] = 1.0
    for i in range(1, m + 1):
        # multiply by (1 - q^(n+i)), going downwards so each term uses the old coefficient
        shift = n + i
        if shift < size:
            coeffs[shift:] -= coeffs[: size - shift].copy()
        # divide by (1 - q^i): a running sum with stride i
        for k in range(i, size):
            coeffs[k] += coeffs[k - i]
    return coeffs


def mann_whitney_u(x: Floats, y: Floats) -> MannWhitney:
    """Two-sided Mann–Whitney U test of x against y."""
    a = np.asarray(x, dtype=float)
    b = np.asarray(y, dtype=float)
    n1, n2 = a.size, b.size
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples need at least one value")
    ranks, ties = _rank_with_ties(np.concatenate((a, b)))
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2.0)
    u2 = n1 * n2 - u1
    u_big = max(u1, u2)
    has_ties = bool(np.any(ties > 1))
    if (n1 <= _EXACT_MAX_N or n2 <= _EXACT_MAX_N) and not has_ties:
        counts = _u_distribution(min(n1, n2), max(n1, n2))
        k = round(u_big)
        p = 2.0 * float(counts[k:].sum() / counts.sum())
        return MannWhitney(u=u1, p_value=min(p, 1.0), method="exact")
    n = n1 + n2
    tie_term = float((ties.astype(float) ** 3 - ties).sum()) / (n * (n - 1))
    sigma = math.sqrt(n1 * n2 / 12.0 * ((n + 1) - tie_term))
    if sigma == 0.0:
        # every value equal: no evidence of any difference
        return MannWhitney(u=u1, p_value=1.0, method="asymptotic")
    z = (u_big - n1 * n2 / 2.0 - 0.5) / sigma  # continuity correction, as scipy's default
    p = math.erfc(z / math.sqrt(2.0))  # = 2 * normal survival function
    return MannWhitney(u=u1, p_value=min(max(p, 0.0), 1.0), method="asymptotic")


# ----------------------------------------------------------------------------------------------------
# Ratio of medians with a bootstrap confidence interval


@dataclass(frozen=True)
class Comparison:
    """Arm B against arm A (B/A of median tokens per second: > 1 means B is faster)."""

    ratio: float
    ci_low: float
    ci_high: float
    resolution: float  # half-width of the CI: the smallest effect this data could resolve
    p_value: float
    p_method: str
    verdict: str
    min_effect: float
    n_a: int
    n_b: int
    n_blocks: int  # blocks holding both arms (the bootstrap's resampling unit)
    paired: bool  # True when the bootstrap resampled whole blocks
    method: str = ""  # "cluster" (blocks only), "two-stage" (blocks, then samples in them) or "unpaired"
    interval: str = DEFAULT_INTERVAL  # how ci_low/ci_high were made (INTERVALS)
    boot_low: float = math.nan  # the percentile bootstrap's own interval
    boot_high: float = math.nan
    block_ratio: float = math.nan  # geometric mean of the per-block ratios, and its t interval (nan: < 2 blocks)
    block_low: float = math.nan
    block_high: float = math.nan


def _padded(blocks: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    counts = np.array([len(b) for b in blocks], dtype=int)
    out = np.full((len(blocks), int(counts.max())), np.nan)
    for i, block in enumerate(blocks):
        out[i, : len(block)] = block
    return out, counts


def _resampled_medians(
    data: np.ndarray, counts: np.ndarray, chosen: np.ndarray, rng: np.random.Generator, *, within: bool
) -> np.ndarray:
    """Median of each bootstrap replicate made of the blocks `chosen` (n_boot × n_blocks); with `within`,
    each chosen block's samples are also drawn with replacement (its own count of them)."""
    n_boot, n_blocks = chosen.shape
    width = data.shape[1]
    c = counts[chosen]  # n_boot × n_blocks
    if within:
        pick = np.floor(rng.random((n_boot, n_blocks, width)) * c[..., None]).astype(int)
        if np.all(counts == width):
            # Blocks of equal size (the usual case) need no padding: the same medians, several times faster.
            return np.median(data[chosen[..., None], pick].reshape(n_boot, -1), axis=1)
    elif np.all(counts == width):
        return np.median(data[chosen].reshape(n_boot, -1), axis=1)
    else:
        pick = np.broadcast_to(np.arange(width), (n_boot, n_blocks, width))
    values = data[chosen[..., None], pick]
    # Positions beyond the block's own size are not part of the replicate.
    values[np.arange(width)[None, None, :] >= c[..., None]] = np.nan
    return np.nanmedian(values.reshape(n_boot, -1), axis=1)


# ----------------------------------------------------------------------------------------------------
# Student t quantiles (no scipy at run time)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln_front) * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betai(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@functools.lru_cache(maxsize=256)  # a handful of (p, df) pairs per run, asked after every round
def student_t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom (bisection on the CDF)."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must lie in (0, 1)")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


def block_ratio_interval(a_blocks: Sequence[Sequence[float]], b_blocks: Sequence[Sequence[float]], *,
                         confidence: float = 0.95) -> tuple[float, float, float] | None:
    """(geometric mean, low, high) of the per-block ratios median(B)/median(A): a Student t interval with
    (blocks − 1) degrees of freedom on their logarithms; None with fewer than two shared blocks.

    Why next to the bootstrap: a percentile bootstrap over G blocks spreads like the data's variance times
    (G − 1)/G and takes normal-like quantiles, so with 5–12 blocks its interval is too narrow (in the few-
    cluster literature it over-rejects; Cameron, Gelbach & Miller 2008 recommend t(G − 1) critical values).
    Each block is a paired comparison (both arms under the same load, in mirror order), and under A/A the
    random mirror order makes its log ratio symmetric about 0, where the t interval is exact for normal data
    and conservative for heavier tails. A block hit by a neighbour's burst becomes an outlier ratio, which
    widens this interval instead of moving it — a noise gate that needs no threshold."""
    logs = [math.log(float(np.median(b)) / float(np.median(a)))
            for a, b in zip(a_blocks, b_blocks, strict=True) if len(a) and len(b)]
    g = len(logs)
    if g < 2:
        return None
    x = np.asarray(logs)
    mean = float(x.mean())
    half = student_t_quantile(0.5 + confidence / 2.0, g - 1) * float(x.std(ddof=1)) / math.sqrt(g)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def decide(ci_low: float, ci_high: float, min_effect: float) -> str:
    """faster/slower when the whole CI is beyond ±min_effect, equivalent when it lies inside, else
    inconclusive."""
    if ci_low > 1.0 + min_effect:
        return "faster"
    if ci_high < 1.0 - min_effect:
        return "slower"
    if ci_low >= 1.0 - min_effect and ci_high <= 1.0 + min_effect:
        return "equivalent"
    return "inconclusive"


def compare(
    a_blocks: Sequence[Sequence[float]],
    b_blocks: Sequence[Sequence[float]],
    *,
    min_effect: float = 0.05,
    n_boot: int = 4000,
    seed: int = 0,
    confidence: float = 0.95,
    interval: str = DEFAULT_INTERVAL,
) -> Comparison:
    """Compare B with A from per-block samples (tokens per second).

    `a_blocks[i]` and `b_blocks[i]` were measured in the same interleaved block i; blocks missing either
    arm are left out of the pairing. With two or more shared blocks the bootstrap resamples whole blocks
    (paired) and then samples within them; with a single block it resamples each arm on its own.

    With `interval="bootstrap+blocks"` (the default) the CI is the union of the bootstrap's interval and
    the t interval over per-block ratios (block_ratio_interval), so a verdict needs both to be decisive;
    amppatch.calibrate measures what that does to false calls and power on recorded runs.
    """
    if interval not in INTERVALS:
        raise ValueError(f"interval must be one of {INTERVALS}")
    if len(a_blocks) != len(b_blocks):
        raise ValueError("a_blocks and b_blocks must list the same blocks")
    shared = [(a, b) for a, b in zip(a_blocks, b_blocks, strict=True) if len(a) and len(b)]
    if not shared:
        raise ValueError("no block has samples of both arms")
    a_all = np.concatenate([np.asarray(a, dtype=float) for a, _ in shared])
    b_all = np.concatenate([np.asarray(b, dtype=float) for _, b in shared])
    ratio = float(np.median(b_all) / np.median(a_all))
    rng = np.random.default_rng(seed)
    a_data, a_counts = _padded([a for a, _ in shared])
    b_data, b_counts = _padded([b for _, b in shared])
    n_blocks = len(shared)
    paired = n_blocks >= 2
    chosen = rng.integers(0, n_blocks, size=(n_boot, n_blocks)) if paired else np.zeros((n_boot, 1), dtype=int)
    # With enough blocks, resampling whole blocks alone is the cluster bootstrap: it carries all the
    # variance (within and between blocks) without the double counting of also resampling inside them.
    # With few blocks that distribution is too coarse, so samples are resampled inside blocks as well
    # (a slightly conservative two-stage bootstrap); with one block, only inside it.
    within = n_blocks < CLUSTER_MIN_BLOCKS
    med_a = _resampled_medians(a_data, a_counts, chosen, rng, within=within)
    med_b = _resampled_medians(b_data, b_counts, chosen, rng, within=within)
    ratios = med_b / med_a
    alpha = 1.0 - confidence
    boot_low, boot_high = (float(v) for v in np.quantile(ratios, [alpha / 2.0, 1.0 - alpha / 2.0]))
    blocks = block_ratio_interval([a for a, _ in shared], [b for _, b in shared], confidence=confidence)
    low, high = boot_low, boot_high
    if interval == "bootstrap+blocks" and blocks is not None:
        low, high = min(low, blocks[1]), max(high, blocks[2])
    mw = mann_whitney_u(b_all, a_all)
    return Comparison(
        ratio=ratio,
        ci_low=low,
        ci_high=high,
        resolution=(high - low) / 2.0,
        p_value=mw.p_value,
        p_method=mw.method,
        verdict=decide(low, high, min_effect),
        min_effect=min_effect,
        n_a=int(a_all.size),
        n_b=int(b_all.size),
        n_blocks=n_blocks,
        paired=paired,
        method="unpaired" if not paired else ("two-stage" if within else "cluster"),
        interval=interval,
        boot_low=boot_low,
        boot_high=boot_high,
        block_ratio=blocks[0] if blocks else math.nan,
        block_low=blocks[1] if blocks else math.nan,
        block_high=blocks[2] if blocks else math.nan,
    )


# ----------------------------------------------------------------------------------------------------
# Drift across rounds


@dataclass(frozen=True)
class Drift:
    """Trend of per-round medians against the round index."""

    n_rounds: int
    spearman_rho: float  # nan with fewer than three rounds or constant data
    p_value: float  # normal approximation z = rho * sqrt(n - 1); nan when rho is nan
    slope_per_round: float  # least-squares slope relative to the overall median (0.01 = +1 % per round)


def spearman(x: Floats, y: Floats) -> float:
    """Spearman's rank correlation (average ranks for ties); nan when either side is constant."""
    rx, _ = _rank_with_ties(np.asarray(x, dtype=float))
    ry, _ = _rank_with_ties(np.asarray(y, dtype=float))
    if np.all(rx == rx[0]) or np.all(ry == ry[0]):
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def drift(per_round: Sequence[float]) -> Drift:
    y = np.asarray(per_round, dtype=float)
    n = int(y.size)
    if n < 3:
        return Drift(n_rounds=n, spearman_rho=math.nan, p_value=math.nan, slope_per_round=math.nan)
    x = np.arange(n, dtype=float)
    rho = spearman(x, y)
    p = math.erfc(abs(rho) * math.sqrt(n - 1) / math.sqrt(2.0)) if not math.isnan(rho) else math.nan
    slope = float(np.polyfit(x, y, 1)[0])
    center = float(np.median(y))
    return Drift(
        n_rounds=n,
        spearman_rho=rho,
        p_value=p,
        slope_per_round=slope / center if center else math.nan,
    )
