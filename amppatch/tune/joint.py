"""The joint verification of `amppatch tune` (pure given the race function and the budget's clock).

Each site was kept on its own: its chosen setting against the site switched off, with the sites kept
before it at their settings. What ships is all of them at once, so after the per-site search the kept set
races against *every* site off — one interleaved ab-test with the rounds and the statistics of a
confirmation (the union CI of stats.compare). The set stands when that CI lies wholly above
``1 + min_gain``. Otherwise the site with the smallest own contribution (its confirming ratio against off,
then its CI lower bound) is dropped, with both measurements as the reason, and the rest race again — until
a set stands or none is left.

A lone site whose confirmation already measured it against every other site off needs no race: that
confirmation *is* its joint result. When the budget cannot pay a race, or the race gives no usable
measurement, the set is left as kept on its own confirmations and the outcome says so (status
``unverified``); nothing is dropped without a measurement.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from amppatch.tune.budget import Budget
from amppatch.tune.search import Candidate

STATUSES = ("verified", "single", "unverified", "emptied", "none")


@dataclass(frozen=True)
class RaceResult:
    """The kept set (each site at its setting) against every site off, at one thread count."""

    ratio: float | None
    ci95: tuple[float, float] | None
    verdict: str
    rounds: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def ci_low(self) -> float:
        return self.ci95[0] if self.ci95 else -math.inf

    def to_json(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "ci95": list(self.ci95) if self.ci95 else None, "verdict": self.verdict,
                "rounds": self.rounds, "batch_seconds": round(self.seconds, 2), **self.extra}


# race(settings by site index, threads, rounds) -> the set against every site off
RaceFn = Callable[[Mapping[int, Candidate], int, int], RaceResult]


@dataclass(frozen=True)
class Member:
    """A kept site as the joint verification sees it: its setting and its own measured contribution."""

    index: int
    key: str
    setting: Candidate
    ratio: float | None  # its confirming probe against the site off
    ci95: tuple[float, float] | None
    alone: bool  # that probe ran with every other site off

    @property
    def contribution(self) -> tuple[float, float]:
        """What "smallest contribution" orders by: the ratio, then the CI lower bound."""
        return (self.ratio if self.ratio is not None else -math.inf,
                self.ci95[0] if self.ci95 else -math.inf)

    def measured(self) -> str:
        if self.ratio is None:
            return "unmeasured"
        ci = f" [{self.ci95[0]:.3f}, {self.ci95[1]:.3f}]" if self.ci95 else ""
        return f"{self.ratio:.3f}{ci}"


@dataclass(frozen=True)
class JointStep:
    """One look at a set: a race, or a lone site's own confirmation; and the site it dropped, if any."""

    sites: tuple[str, ...]
    source: str  # "race" or "confirmation"
    result: RaceResult | None
    dropped: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"sites": list(self.sites), "source": self.source,
                **(self.result.to_json() if self.result else {"ratio": None, "ci95": None}),
                "dropped": self.dropped}


@dataclass
class JointOutcome:
    status: str
    threads: int
    rounds: int
    threshold: float
    kept: list[Member] = field(default_factory=list)
    dropped: list[tuple[Member, str]] = field(default_factory=list)
    steps: list[JointStep] = field(default_factory=list)
    reason: str = ""

    @property
    def result(self) -> RaceResult | None:
        """The measurement the kept set stands on (verified or single), else None."""
        return self.steps[-1].result if self.status in ("verified", "single") and self.steps else None

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {"status": self.status, "sites": [m.key for m in self.kept], "threads": self.threads,
                "rounds": self.rounds, "threshold": self.threshold,
                "ratio": r.ratio if r else None, "ci95": list(r.ci95) if r and r.ci95 else None,
                "reason": self.reason, "steps": [s.to_json() for s in self.steps],
                "dropped": [{"key": m.key, "reason": why} for m, why in self.dropped]}


def _ci(r: RaceResult) -> str:
    return f"{r.ratio:.3f} [{r.ci95[0]:.3f}, {r.ci95[1]:.3f}]" if r.ratio is not None and r.ci95 else "unmeasured"


def verify_jointly(race: RaceFn, members: Sequence[Member], budget: Budget, *, threads: int, rounds: int,
                   threshold: float) -> JointOutcome:
    """Race the kept set against every site off, dropping the weakest site while the CI is not wholly above
    `threshold` (see the module docstring). Each race is paid from `budget` (lock waits excluded)."""
    out = JointOutcome("none", threads, rounds, threshold, kept=list(members))
    if not members:
        out.reason = "no site was kept: nothing to verify"
        return out
    while out.kept:
        keys = tuple(m.key for m in out.kept)
        if len(out.kept) == 1 and out.kept[0].alone:
            m = out.kept[0]
            out.steps.append(JointStep(keys, "confirmation", RaceResult(m.ratio, m.ci95, "confirmation")))
            out.status = "single"
            out.reason = (f"one site kept; its confirmation measured it against every other site off: "
                          f"{m.measured()}")
            return out
        if not budget.fits(1, rounds):
            out.status = "unverified"
            out.reason = (f"the budget ran out before the joint race of {', '.join(keys)}: kept on their own "
                          "confirmations")
            return out
        t0, excluded0 = budget.clock(), budget.excluded
        result = race({m.index: m.setting for m in out.kept}, threads, rounds)
        seconds = budget.clock() - t0 - (budget.excluded - excluded0)
        budget.record(1, rounds, seconds)
        result = RaceResult(result.ratio, result.ci95, result.verdict, result.rounds or rounds, seconds, result.extra)
        if result.ratio is None or result.ci95 is None:
            out.steps.append(JointStep(keys, "race", result))
            out.status = "unverified"
            out.reason = (f"the joint race of {', '.join(keys)} gave no usable measurement: kept on their own "
                          "confirmations")
            return out
        if result.ci_low > threshold:
            out.steps.append(JointStep(keys, "race", result))
            out.status = "verified"
            out.reason = (f"{len(keys)} site(s) together against every site off: {_ci(result)} lies above "
                          f"{threshold:.3f}")
            return out
        weakest = min(out.kept, key=lambda m: m.contribution)
        why = (f"joint verification: {', '.join(keys)} together {_ci(result)} is not wholly above {threshold:.3f}, "
               f"and this site's own ratio {weakest.measured()} was the smallest")
        out.steps.append(JointStep(keys, "race", result, dropped=weakest.key))
        out.dropped.append((weakest, why))
        out.kept = [m for m in out.kept if m is not weakest]
    out.status = "emptied"
    out.reason = "the joint verification dropped every kept site"
    return out
