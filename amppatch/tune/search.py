"""The pure search of `amppatch tune`: candidates, the distance grid, the per-site search with rollback
(`tune_site`) and the time budget. It gets the probe as a function and never runs one itself.

How it searches (one site at a time, hottest first; sites already kept stay at their winners, the others off):

1. **Coarse** — a power-of-two distance grid (default 512 B .. 16 KiB). The first batch is the grid point
   nearest the site's starting distance (the profile's, or apply's default) and its two neighbours, each with
   the two main hints (3 = keep in every cache level, 0 = non-temporal), plus the starting point itself.
   Then **geometric expansion**: while a hint's best distance sits on the edge of what was probed, the next
   grid point beyond that edge is probed.
2. **Hints 1 and 2** at the best distance when the search is *promising* (some setting's CI lower bound > 1).
   "Best" always means the highest 95 % CI lower bound against off (then the ratio): a lower confidence
   bound, so a single disturbed probe with a wide CI cannot win on a lucky point estimate.
3. **Refinement** — bisection on a cache-line grid: the midpoints between the best distance and its probed
   neighbours (same hint), rounded to whole lines, until the bracket is one line wide or `refine_levels` ran.
   Only when some setting ran faster than off: a site where every setting is at or below off is rolled back
   right after the coarse grid and its expansion.
4. **Confirmation** — the winner alone against "off" with more rounds. The winner was picked as the maximum
   of many noisy ratios, so its own probe overstates it; the fresh, longer probe decides.
5. **Verification** at the other thread counts (the winner against "off" there). Where the winner *loses*
   (CI wholly below 1, or a point estimate below 1 − `loss_tolerance`), the site is retuned at that thread
   count around the winner and the best alternative is cross-checked at the tuning thread count; the
   candidate with the best worst-case ratio that loses nowhere is kept. One build serves every thread
   count, so a site that loses somewhere whatever its setting is dropped.

**Rollback rule** (documented in learned.json as `rule`): a site is kept only if its confirmation probe's 95 %
CI lower bound exceeds ``1 + min_gain`` (default ``min_gain`` 0: the CI must exclude "no gain") *and* it
loses at no verified thread count. Everything else is dropped, with the reason.

**Probes** (amppatch/tune/probing.py). Each probe batch is one interleaved ab-test
(`amppatch.abtest.run_abtest`): the arm "off" (the site's hint −1) and up to `max_batch` candidates, all the
*same* tunable binary differing only in the environment, so the correctness gate is skipped (apply gated the
tunable build; prefetches never change results) and so are latency hooks and LLC counters. Every candidate
is compared with "off" of its own batch, so slow drift between batches cancels in the ratio.

**Budget.** Wall time minutes, excluding time spent waiting for the measurement lock (``--lock``), which other
processes hold while they measure. Each site searches on its share of one budget (amppatch/tune/budget.py:
by kernel share, unused time back to the pool). Before each batch the search estimates its cost from the
batches so far; a phase that does not fit is skipped, time for confirmation and verification is reserved.
When the budget runs out the best result reached is reported (``budget.exhausted``) and decided on its own
probe's CI. A site whose decision is still open afterwards may get leftover time as more confirmation rounds
(`extend_confirmation`, phase "extend", pooled with the first confirmation's blocks).

The search core (`tune_site` and the grid helpers) is pure: it gets the probe as a function, so
tests/unit/test_tune_search.py drives it with synthetic probe results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from amppatch.errors import AmppatchError, UsageError
from amppatch.proc import progress
from amppatch.tune.budget import Budget, confirmation_cost

OFF = -1
PRIMARY_HINTS = (3, 0)
SECONDARY_HINTS = (1, 2)
DEFAULT_GRID_MIN = 512
DEFAULT_GRID_MAX = 16384
RULE = ("keep a site iff its confirmation probe's 95% CI lower bound exceeds 1 + min_gain against the site "
        "switched off, and at no verified thread count it loses (CI upper bound < 1, or ratio < "
        "1 - loss_tolerance); otherwise drop it. An open decision (ratio above 1 + min_gain, CI lower bound not) "
        "may get more confirmation rounds from leftover budget, pooled with the first. Then the kept sites race "
        "together against all off; while that CI is not wholly above 1 + min_gain the site with the smallest own "
        "ratio is dropped and the rest race again")
# Phases whose probe decides a site: the confirmation, and its extension with leftover budget (pooled blocks).
CONFIRMING = ("confirm", "extend")


@dataclass(frozen=True, order=True)
class Candidate:
    """One setting of a site: bytes ahead and locality hint (-1: off)."""

    distance: int
    hint: int

    @property
    def name(self) -> str:
        return "off" if self.hint == OFF else f"d{self.distance}-h{self.hint}"


@dataclass(frozen=True)
class ProbeResult:
    """A candidate against "off" in one interleaved batch."""

    candidate: Candidate
    threads: int
    phase: str
    ratio: float | None  # median tok/s candidate / off; None when unavailable
    ci95: tuple[float, float] | None
    verdict: str
    seconds: float = 0.0  # wall time of the whole batch
    batch: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def ci_low(self) -> float:
        return self.ci95[0] if self.ci95 else -math.inf

    @property
    def ci_high(self) -> float:
        return self.ci95[1] if self.ci95 else math.inf

    def to_json(self) -> dict[str, Any]:
        return {"distance_bytes": self.candidate.distance, "hint": self.candidate.hint,
                "name": self.candidate.name, "threads": self.threads, "phase": self.phase, "batch": self.batch,
                "ratio": self.ratio, "ci95": list(self.ci95) if self.ci95 else None, "verdict": self.verdict,
                "batch_seconds": round(self.seconds, 2), **self.extra}


# probe(candidates, threads, rounds, phase) -> one result per candidate (same order)
ProbeFn = Callable[[list[Candidate], int, int, str], list[ProbeResult]]


@dataclass(frozen=True)
class SearchConfig:
    grid: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    line_size: int = 64
    hints: tuple[int, ...] = PRIMARY_HINTS
    secondary_hints: tuple[int, ...] = SECONDARY_HINTS
    refine_levels: int = 3
    max_batch: int = 4
    probe_rounds: int = 4
    confirm_rounds: int = 8
    min_gain: float = 0.0
    loss_tolerance: float = 0.01


def power_grid(low: int, high: int) -> tuple[int, ...]:
    """Powers of two from `low` rounded up to `high` rounded down (both clamped to >= 1)."""
    if low < 1 or high < low:
        raise UsageError(f"distance grid {low}..{high} is empty", next_step="pass --grid-min <= --grid-max, both > 0")
    p = 1 << max(0, math.ceil(math.log2(low)))
    out = []
    while p <= high:
        out.append(p)
        p <<= 1
    if not out:
        raise UsageError(f"no power of two lies in {low}..{high}", next_step="widen the distance grid")
    return tuple(out)


def round_to_line(distance: float, line_size: int) -> int:
    """Nearest whole number of cache lines, at least one."""
    return max(line_size, round(distance / line_size) * line_size)


def nearest_grid_index(grid: Sequence[int], distance: int) -> int:
    """Index of the grid point nearest `distance` on a log scale (ties go to the smaller)."""
    d = max(distance, 1)
    return min(range(len(grid)), key=lambda i: (abs(math.log2(grid[i]) - math.log2(d)), grid[i]))


def initial_candidates(start: Candidate, config: SearchConfig) -> list[Candidate]:
    """The grid point nearest the start and its neighbours, with every main hint; plus the start itself."""
    grid = config.grid
    i = nearest_grid_index(grid, start.distance)
    distances = [grid[j] for j in (i - 1, i, i + 1) if 0 <= j < len(grid)]
    out = [Candidate(d, h) for h in config.hints for d in distances]
    first = Candidate(round_to_line(start.distance, config.line_size), start.hint)
    if first.hint != OFF and first not in out:
        out.insert(0, first)
    return out


def _at(results: Sequence[ProbeResult], threads: int) -> list[ProbeResult]:
    return [r for r in results if r.threads == threads and r.ratio is not None]


def latest_by_candidate(results: Sequence[ProbeResult], threads: int) -> dict[Candidate, ProbeResult]:
    """Each candidate's most informative result at `threads`: confirmation probes win, else the latest."""
    out: dict[Candidate, ProbeResult] = {}
    for r in _at(results, threads):
        prev = out.get(r.candidate)
        if prev is None or r.phase in CONFIRMING or prev.phase not in CONFIRMING:
            out[r.candidate] = r
    return out


def best_result(results: Sequence[ProbeResult], threads: int, hint: int | None = None) -> ProbeResult | None:
    """The best result at `threads` (optionally for one hint): highest CI lower bound, then ratio, then the
    shorter distance. Ranking by the lower bound keeps one disturbed, wide-CI probe (a compile started next
    to it) from steering the search with a lucky point estimate."""
    pool = [r for r in latest_by_candidate(results, threads).values() if hint is None or r.candidate.hint == hint]
    if not pool:
        return None
    return max(pool, key=lambda r: (r.ci_low, r.ratio, -r.candidate.distance))


def promising(results: Sequence[ProbeResult], threads: int) -> bool:
    """Some setting beats off beyond the noise (CI lower bound > 1): worth trying hints 1 and 2."""
    return any(r.ci_low > 1.0 for r in latest_by_candidate(results, threads).values())


def nothing_beats_off(results: Sequence[ProbeResult], threads: int) -> bool:
    """Every setting probed at `threads` ran at or below off (point estimates): the site is rolled back."""
    return all((r.ratio or 0.0) <= 1.0 for r in latest_by_candidate(results, threads).values())


def expansion_candidates(results: Sequence[ProbeResult], threads: int, config: SearchConfig) -> list[Candidate]:
    """Geometric expansion: for each main hint whose best distance is the smallest (largest) probed grid
    point, the next grid point below (above) it, if any and not probed yet."""
    grid = config.grid
    seen = set(latest_by_candidate(results, threads))
    out: list[Candidate] = []
    for hint in config.hints:
        best = best_result(results, threads, hint)
        if best is None:
            continue
        probed = sorted(c.distance for c in seen if c.hint == hint and c.distance in grid)
        if not probed or best.candidate.distance not in grid:
            continue
        i = grid.index(best.candidate.distance)
        if best.candidate.distance == probed[0] and i > 0:
            out.append(Candidate(grid[i - 1], hint))
        if best.candidate.distance == probed[-1] and i + 1 < len(grid):
            out.append(Candidate(grid[i + 1], hint))
    return [c for c in dict.fromkeys(out) if c not in seen]


def refinement_candidates(results: Sequence[ProbeResult], threads: int, config: SearchConfig) -> list[Candidate]:
    """Bisection on the cache-line grid: midpoints between the best distance and its nearest probed
    neighbours of the same hint (rounded to lines), skipping points already probed or not strictly inside."""
    best = best_result(results, threads)
    if best is None:
        return []
    hint, d = best.candidate.hint, best.candidate.distance
    seen = set(latest_by_candidate(results, threads))
    same = sorted({c.distance for c in seen if c.hint == hint})
    lower = [x for x in same if x < d]
    upper = [x for x in same if x > d]
    out = []
    for neighbour in ([lower[-1]] if lower else []) + ([upper[0]] if upper else []):
        mid = round_to_line((d + neighbour) / 2, config.line_size)
        if min(d, neighbour) < mid < max(d, neighbour):
            c = Candidate(mid, hint)
            if c not in seen:
                out.append(c)
    return out


def _measured(result: ProbeResult) -> str:
    """A ratio with its CI, as the reasons quote it."""
    ci = f" [{result.ci_low:.3f}, {result.ci_high:.3f}]" if result.ci95 else ""
    return f"{result.ratio:.3f}{ci}" if result.ratio is not None else "unmeasured"


def keep_decision(result: ProbeResult | None, min_gain: float) -> tuple[bool, str]:
    """The rollback rule at the tuning thread count."""
    if result is None or result.ratio is None or result.ci95 is None:
        return False, "no usable measurement"
    if result.ci_low > 1.0 + min_gain:
        return True, (f"{result.candidate.name}: ratio {result.ratio:.3f}, CI [{result.ci_low:.3f}, "
                      f"{result.ci_high:.3f}] lies above {1.0 + min_gain:.3f}")
    ci = f"CI [{result.ci_low:.3f}, {result.ci_high:.3f}]"
    if result.ci_high < 1.0:  # not only no gain: measurably slower
        return False, (f"best setting {result.candidate.name} runs slower than off: ratio {result.ratio:.3f}, "
                       f"{ci} lies wholly below 1.000")
    return False, (f"best setting {result.candidate.name} does not beat off beyond the noise: ratio "
                   f"{result.ratio:.3f}, {ci} does not lie above {1.0 + min_gain:.3f}")


def loses(result: ProbeResult | None, tolerance: float) -> bool:
    """Measurably slower than off (CI wholly below 1), or a point estimate below 1 - tolerance."""
    if result is None or result.ratio is None:
        return False
    return result.ci_high < 1.0 or result.ratio < 1.0 - tolerance


@dataclass
class SiteSearch:
    """Everything the search did for one site."""

    results: list[ProbeResult] = field(default_factory=list)
    winner: Candidate | None = None
    kept: bool = False
    reason: str = ""
    confirmed: bool = False
    stopped_because: str = ""
    phases_skipped: list[str] = field(default_factory=list)
    by_threads: dict[int, ProbeResult] = field(default_factory=dict)  # the decision's evidence per thread count


def other_thread_counts(threads: int, verify_threads: Sequence[int]) -> list[int]:
    """The thread counts a kept setting is verified at: `verify_threads` without the tuning count, once each."""
    return [t for t in dict.fromkeys(verify_threads) if t != threads]


class _Searcher:
    def __init__(self, probe: ProbeFn, config: SearchConfig, budget: Budget, threads: int,
                 verify_threads: Sequence[int]) -> None:
        self.probe = probe
        self.config = config
        self.budget = budget
        self.threads = threads
        self.verify_threads = other_thread_counts(threads, verify_threads)
        self.out = SiteSearch()
        self.batch = 0

    def reserve(self) -> float:
        """Time kept for confirmation and verification (one single-candidate batch each)."""
        est = confirmation_cost(self.budget, self.config.confirm_rounds, 1 + len(self.verify_threads))
        return 0.0 if est is None else est

    def run(self, candidates: list[Candidate], threads: int, phase: str, rounds: int,
            reserve: float = 0.0) -> list[ProbeResult] | None:
        """Probe in batches of at most max_batch; None (and nothing probed) when the budget cannot pay."""
        got: list[ProbeResult] = []
        todo = list(dict.fromkeys(candidates))
        while todo:
            chunk, todo = todo[: self.config.max_batch], todo[self.config.max_batch:]
            if not self.budget.fits(len(chunk), rounds, reserve):
                self.out.phases_skipped.append(f"{phase} at {threads} thread(s): {len(chunk) + len(todo)} "
                                               "candidate(s) did not fit the budget")
                return got or None
            t0 = self.budget.clock()
            excluded0 = self.budget.excluded
            self.batch += 1
            results = self.probe(chunk, threads, rounds, phase)
            if len(results) != len(chunk):
                raise AmppatchError(f"probe returned {len(results)} results for {len(chunk)} candidates")
            seconds = self.budget.clock() - t0 - (self.budget.excluded - excluded0)
            self.budget.record(len(chunk), rounds, seconds)
            results = [replace(r, batch=self.batch, seconds=seconds, phase=phase, threads=threads) for r in results]
            self.out.results.extend(results)
            got.extend(results)
        return got

    def search(self, start: Candidate, threads: int, rounds: int) -> ProbeResult | None:
        """Coarse grid + expansion, secondary hints, refinement at `threads`; the best result."""
        cfg = self.config
        if self.run(initial_candidates(start, cfg), threads, "coarse", rounds, self.reserve()) is None:
            return best_result(self.out.results, threads)
        while True:
            more = expansion_candidates(self.out.results, threads, cfg)
            if not more or self.run(more, threads, "expand", rounds, self.reserve()) is None:
                break
        best = best_result(self.out.results, threads)
        if best is not None and promising(self.out.results, threads):
            extra = [Candidate(best.candidate.distance, h) for h in cfg.secondary_hints]
            seen = set(latest_by_candidate(self.out.results, threads))
            extra = [c for c in extra if c not in seen]
            if extra:
                self.run(extra, threads, "hints", rounds, self.reserve())
        # Refinement bisects toward a better setting; where every setting is at or below off, the site is
        # rolled back whatever a midpoint between two losers gives, so its batches would only spend budget.
        if nothing_beats_off(self.out.results, threads):
            return best_result(self.out.results, threads)
        for _ in range(cfg.refine_levels):
            more = refinement_candidates(self.out.results, threads, cfg)
            if not more or self.run(more, threads, "refine", rounds, self.reserve()) is None:
                break
        return best_result(self.out.results, threads)

    def confirm(self, candidate: Candidate, threads: int) -> ProbeResult | None:
        got = self.run([candidate], threads, "confirm" if threads == self.threads else "verify",
                       self.config.confirm_rounds)
        return got[0] if got else None


def tune_site(probe: ProbeFn, start: Candidate, config: SearchConfig, budget: Budget, *, threads: int = 1,
              verify_threads: Sequence[int] = ()) -> SiteSearch:
    """Search one site (see the module docstring); pure given `probe` and `budget.clock`."""
    s = _Searcher(probe, config, budget, threads, verify_threads)
    out = s.out
    best = s.search(start, threads, config.probe_rounds)
    if best is None:
        out.reason = "no probe could run within the budget" if out.phases_skipped else "no usable measurement"
        out.stopped_because = "budget" if out.phases_skipped else "no data"
        return out
    winner = best.candidate
    if nothing_beats_off(out.results, threads):
        out.winner, out.by_threads = winner, {threads: best}
        out.reason = f"no setting beats off: the best, {winner.name}, has ratio {_measured(best)}"
        out.stopped_because = "rolled back"
        return out
    # Confirmation: a fresh, longer probe of the winner decides (the search's maximum is biased upward).
    confirm = s.confirm(winner, threads)
    return _decide(s, winner, confirm or best, confirmed=confirm is not None)


def extend_confirmation(probe: ProbeFn, prior: SiteSearch, config: SearchConfig, budget: Budget, rounds: int, *,
                        threads: int = 1, verify_threads: Sequence[int] = ()) -> SiteSearch:
    """More rounds for a site whose decision is still open (see budget.open_width): its chosen setting against
    off once more, in phase "extend" — the probe pools these blocks with the site's earlier confirmation — and
    the same rollback rule and verification on the pooled evidence. `prior` is updated and returned; when the
    extension does not fit `budget`, it keeps its decision and says so in `phases_skipped`."""
    if prior.winner is None:
        raise ValueError("only a searched site with a chosen setting can be extended")
    s = _Searcher(probe, config, budget, threads, verify_threads)
    s.out = prior
    s.batch = max((r.batch for r in prior.results), default=0)
    got = s.run([prior.winner], threads, "extend", rounds)
    if not got:
        return prior
    return _decide(s, prior.winner, got[0], confirmed=True)


def _decide(s: _Searcher, winner: Candidate, evidence: ProbeResult, *, confirmed: bool) -> SiteSearch:
    """The rollback rule on the winner's confirming evidence, then verification at the other thread counts
    (retuning where it loses); fills and returns `s.out`."""
    out, config, threads = s.out, s.config, s.threads
    out.confirmed = confirmed
    out.by_threads = {threads: evidence}
    keep, why = keep_decision(evidence, config.min_gain)
    out.winner, out.kept = winner, False
    if not keep:
        out.reason = why + ("" if out.confirmed else " (unconfirmed: the budget ran out)")
        out.stopped_because = "rolled back"
        return out
    # Verification at the other thread counts (one constant build serves them all).
    candidates: dict[Candidate, dict[int, ProbeResult]] = {winner: {threads: evidence}}
    for t in s.verify_threads:
        v = s.confirm(winner, t)
        if v is None:
            out.phases_skipped.append(f"verify at {t} thread(s): did not fit the budget")
            continue
        candidates[winner][t] = v
        if not loses(v, config.loss_tolerance):
            continue
        progress(f"tune: {winner.name} loses at {t} threads (ratio {v.ratio:.3f}); retuning there")
        around = Candidate(winner.distance, winner.hint)
        alt = s.search(around, t, config.probe_rounds)
        if alt is None or alt.candidate == winner:
            continue
        alt_results = {t: alt}
        cross = s.confirm(alt.candidate, threads)
        if cross is not None:
            alt_results[threads] = cross
            candidates[alt.candidate] = alt_results
    # The candidate whose worst ratio is best, among those kept at the tuning count and losing nowhere.
    valid = {c: r for c, r in candidates.items()
             if threads in r and keep_decision(r[threads], config.min_gain)[0]
             and not any(loses(x, config.loss_tolerance) for x in r.values())}
    if not valid:
        where = ", ".join(f"{t} thread(s) ratio {_measured(r)}" for c, rs in candidates.items()
                          for t, r in rs.items() if loses(r, config.loss_tolerance) and r.ratio is not None)
        out.reason = f"faster at {threads} thread(s) but every setting tried loses elsewhere ({where})"
        out.stopped_because = "rolled back"
        return out
    chosen = max(valid, key=lambda c: (min(r.ratio or 0.0 for r in valid[c].values()), -c.distance))
    out.winner, out.kept = chosen, True
    out.by_threads = valid[chosen]
    _, out.reason = keep_decision(valid[chosen][threads], config.min_gain)
    checked = sorted(valid[chosen])
    out.reason += f"; checked at {', '.join(str(t) for t in checked)} thread(s)"
    out.stopped_because = "done" if not out.phases_skipped else "budget"
    return out
