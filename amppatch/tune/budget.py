"""The time budget of `amppatch tune` and how it is split between sites (pure: numbers in, numbers out).

One budget serves every site. **Search pass**: sites are searched hottest first; each gets the remaining
time (less a reserve for the joint verification) in proportion to its weight among the sites not searched
yet — its kernel's sample share from the profile, divided among that kernel's sites (`site_weights`; without
a profile every site weighs the same) — but at least what one decision costs (`decision_cost`: its first
coarse batch, a confirmation and a verification per other thread count, estimated from the batches so far),
as far as the pool reaches. Without that floor a cooler site's share could not pay its first batch, it
would be dropped unmeasured, and its time would flow on to the coolest site, the last one searched. Time a
site does not use (it was rolled back early, or confirmed quickly) stays in the pool and so goes to the
sites after it. **Extension pass**: what is left after every site was searched goes to the sites whose
decision is still open — a confirmation CI that straddles the keep threshold with its point estimate above
it (`open_width`) — in proportion to weight × CI width (`split_budget` with widths), as more rounds of the
same confirmation. Then the joint verification.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence

# Held back for the joint verification before any batch was measured (then: the estimated cost of one race).
JOINT_RESERVE_FRACTION = 0.1
# A site raised to the decision floor gets this much more than the estimate: the estimate is a mean, and the
# search's own fit check runs a moment later on a clock that has moved on.
DECISION_FLOOR_MARGIN = 1.1


def site_weights(shares: Sequence[float | None], kernels: Sequence[str]) -> list[float]:
    """Each site's weight in the split: its kernel's sample share divided among that kernel's sites. A site
    whose share is unknown weighs the mean known share (every share unknown: all weigh the same)."""
    if len(shares) != len(kernels):
        raise ValueError("one share and one kernel per site")
    known = [s for s in shares if s is not None and s > 0]
    fill = sum(known) / len(known) if known else 1.0
    per_kernel = Counter(kernels)
    return [(s if s is not None and s > 0 else fill) / per_kernel[k] for s, k in zip(shares, kernels, strict=True)]


def split_budget(weights: Sequence[float], remaining: float,
                 widths: Sequence[float | None] | None = None) -> list[float]:
    """Seconds for each site out of `remaining`: in proportion to its weight, or — with `widths` (the
    extension pass) — to weight × the width of its still-open confirmation CI, where None (decided) gets
    nothing. Nothing to share (no time, no weight) gives every site 0."""
    if widths is not None and len(widths) != len(weights):
        raise ValueError("one width per site")
    factors = [1.0] * len(weights) if widths is None else [w if w is not None and w > 0 else 0.0 for w in widths]
    parts = [max(0.0, w) * f for w, f in zip(weights, factors, strict=True)]
    total = sum(parts)
    if not remaining > 0 or not total > 0 or not math.isfinite(remaining):
        return [0.0] * len(weights)
    return [remaining * p / total for p in parts]


def confirmation_cost(budget: Budget, confirm_rounds: int, thread_counts: int) -> float | None:
    """Seconds of one single-candidate confirmation at each of `thread_counts` thread counts (the tuning one
    and every verified one), estimated from the batches measured so far; None before any batch. The search
    holds this back before every batch, so a site it starts can still be decided."""
    confirm = budget.estimate(1, confirm_rounds)
    return None if confirm is None else confirm * max(1, thread_counts)


def decision_cost(budget: Budget, first_batch: int, probe_rounds: int, confirm_rounds: int,
                  thread_counts: int) -> float | None:
    """Seconds the smallest complete decision of a site costs, estimated from the batches measured so far:
    its first coarse batch of `first_batch` candidates, then its confirmations (`confirmation_cost`). None
    before any batch."""
    coarse = budget.estimate(first_batch, probe_rounds)
    confirm = confirmation_cost(budget, confirm_rounds, thread_counts)
    return None if coarse is None or confirm is None else coarse + confirm


def allotment(share: float, floor: float | None, pool: float) -> float:
    """A site's seconds in the search pass: its `share` of the pool, raised to the decision `floor` (with
    DECISION_FLOOR_MARGIN) where that is more, and never more than the `pool`."""
    want = share if floor is None else max(share, floor * DECISION_FLOOR_MARGIN)
    return max(0.0, min(want, pool))


def open_width(ratio: float | None, ci95: tuple[float, float] | None, threshold: float) -> float | None:
    """The CI width of a decision more rounds could still turn: the point estimate above the keep threshold,
    the CI lower bound not (yet). None when decided (CI wholly above, or the estimate itself at or below)."""
    if ratio is None or ci95 is None or ratio <= threshold or ci95[0] > threshold:
        return None
    return ci95[1] - ci95[0]


def extension_rounds(seconds: float, round_seconds: float | None, default: int, minimum: int = 2) -> int:
    """Rounds of one candidate against off that fit `seconds` (one warmup round included), at least
    `minimum`; `default` before any batch was measured."""
    if round_seconds is None or round_seconds <= 0:
        return default
    return max(minimum, int(seconds / round_seconds) - 1)


def joint_reserve(budget: Budget, confirm_rounds: int, n_sites: int) -> float:
    """Seconds held back for the joint race: none for one site (its confirmation is the joint result), else
    one confirmation-sized race as estimated, or a fixed fraction of the budget before anything was measured."""
    if n_sites < 2:
        return 0.0
    est = budget.estimate(1, confirm_rounds)
    return est if est is not None else budget.seconds * JOINT_RESERVE_FRACTION


class Budget:
    """Working seconds left (lock waits excluded) and the cost estimate of a batch from those so far."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self.start = clock()
        self.excluded = 0.0  # seconds not counted as spent: lock waits and replays, less earlier sittings' charges
        self.lock_waited = 0.0  # of them, the waits for the measurement lock (reported on their own)
        self._runs = 0.0  # llama-bench calls measured so far
        self._run_seconds = 0.0

    def spent(self) -> float:
        return self.clock() - self.start - self.excluded

    def remaining(self) -> float:
        return self.seconds - self.spent()

    def exclude(self, seconds: float) -> None:
        self.excluded += max(0.0, seconds)

    def wait_for_lock(self, seconds: float) -> None:
        """Exclude `seconds` spent waiting for the measurement lock, and count them as such."""
        # this budget's own exclusion only: a sub-budget reaches its parent through the parent's wait_for_lock
        Budget.exclude(self, seconds)
        self.lock_waited += max(0.0, seconds)

    def charge(self, seconds: float) -> None:
        """Count `seconds` as spent now: what an earlier sitting measured of a batch this one replays from
        its checkpoint, so a resumed tune spends the budget an uninterrupted one would have."""
        self.excluded -= max(0.0, seconds)

    def record(self, n_candidates: int, rounds: int, seconds: float) -> None:
        # one warmup call per arm plus one per arm and round; "off" is an arm too
        self._runs += (n_candidates + 1) * (rounds + 1)
        self._run_seconds += seconds

    def estimate(self, n_candidates: int, rounds: int) -> float | None:
        """Seconds a batch will take, or None before anything was measured."""
        if self._runs == 0:
            return None
        return self._run_seconds / self._runs * (n_candidates + 1) * (rounds + 1)

    def fits(self, n_candidates: int, rounds: int, reserve: float = 0.0) -> bool:
        est = self.estimate(n_candidates, rounds)
        if est is None:
            return self.remaining() > reserve
        return self.remaining() - reserve >= est


class SubBudget(Budget):
    """A share of a parent budget: spends (and excludes) on the parent's clock, capped at `seconds`."""

    def __init__(self, parent: Budget, seconds: float) -> None:
        super().__init__(seconds, parent.clock)
        self.parent = parent

    def exclude(self, seconds: float) -> None:
        super().exclude(seconds)
        self.parent.exclude(seconds)

    def wait_for_lock(self, seconds: float) -> None:
        super().wait_for_lock(seconds)
        self.parent.wait_for_lock(seconds)

    def charge(self, seconds: float) -> None:
        super().charge(seconds)
        self.parent.charge(seconds)

    def remaining(self) -> float:
        return min(super().remaining(), self.parent.remaining())

    def record(self, n_candidates: int, rounds: int, seconds: float) -> None:
        super().record(n_candidates, rounds, seconds)
        self.parent.record(n_candidates, rounds, seconds)

    def estimate(self, n_candidates: int, rounds: int) -> float | None:
        # a later site starts with what the earlier ones measured (same binary, model and machine)
        own = super().estimate(n_candidates, rounds)
        return own if own is not None else self.parent.estimate(n_candidates, rounds)
