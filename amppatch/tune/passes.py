"""The passes of `amppatch tune` over its sites, on one budget (pure given the prober and the budget's clock).

1. **Threshold** — a site whose kernel's sample share is below `--min-share` is not tuned (dropped, with its
   share as the reason).
2. **Search** — the other sites, hottest first, each searched and rolled back on its own (`tune_site`) with
   the time budget.py's split gives it (its share, at least one decision's cost while the pool lasts); the
   sites kept before it stay at their settings while it is probed.
3. **Extension** — leftover time goes to the sites whose confirmation CI is still open (ratio above the
   threshold, CI lower bound not), by weight × CI width, as more confirmation rounds pooled with the first
   (`extend_confirmation`), with every other site set as it was when that site was confirmed.
4. **Joint verification** — the kept set against every site off (amppatch/tune/joint.py).

Each site ends kept or dropped with `dropped_by` (threshold, budget, unmeasured, rollback, joint) and a
reason that carries the measurement behind it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from amppatch.proc import progress
from amppatch.tune.budget import (
    Budget,
    SubBudget,
    allotment,
    decision_cost,
    extension_rounds,
    joint_reserve,
    open_width,
    split_budget,
)
from amppatch.tune.joint import JointOutcome, Member, RaceResult, verify_jointly
from amppatch.tune.search import (
    Candidate,
    ProbeResult,
    SearchConfig,
    SiteSearch,
    extend_confirmation,
    initial_candidates,
    other_thread_counts,
)

DROPPED_BY = ("threshold", "budget", "unmeasured", "rollback", "joint")


class Prober(Protocol):
    """What the passes need of a prober (amppatch/tune/probing.py `_Prober`, or a test's fake)."""

    site: int
    fixed: dict[int, Candidate]
    budget: Budget

    def __call__(self, candidates: list[Candidate], threads: int, rounds: int, phase: str) -> list[ProbeResult]: ...

    def race(self, settings: Mapping[int, Candidate], threads: int, rounds: int) -> RaceResult: ...


SearchFn = Callable[..., SiteSearch]  # tune_site's signature


@dataclass
class SiteOutcome:
    """One site through the passes."""

    index: int  # position in the tunable manifest (its environment variables' order)
    site: dict[str, Any]  # the manifest's site
    share: float | None  # its kernel's sample share (None: unknown)
    weight: float  # its weight in the budget split
    start: Candidate
    search: SiteSearch | None = None
    dropped_by: str | None = None
    reason: str = ""
    allotted: float = 0.0  # seconds given in the search pass
    extension: float = 0.0  # seconds given in the extension pass
    spent: float = 0.0
    with_on: dict[int, Candidate] = field(default_factory=dict)  # other sites on while it was decided

    @property
    def key(self) -> str:
        return str(self.site["key"])

    @property
    def kept(self) -> bool:
        return self.search is not None and self.search.kept and self.dropped_by is None

    @property
    def settled(self) -> bool:
        return self.search is not None or self.dropped_by is not None

    def evidence(self, threads: int) -> ProbeResult | None:
        return self.search.by_threads.get(threads) if self.search else None


class SitePasses:
    def __init__(self, outcomes: Sequence[SiteOutcome], prober: Prober, config: SearchConfig, budget: Budget, *,
                 threads: int, verify_threads: Sequence[int], min_share: float, search: SearchFn,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.outcomes = list(outcomes)
        self.prober = prober
        self.config = config
        self.budget = budget
        self.threads = threads
        self.verify_threads = tuple(verify_threads)
        self.min_share = min_share
        self.search_fn = search
        self.on_change = on_change
        self.threshold = 1.0 + config.min_gain
        self.joint: JointOutcome | None = None

    def run(self) -> JointOutcome:
        self.threshold_pass()
        self.search_pass()
        self.extension_pass()
        return self.joint_pass()

    def threshold_pass(self) -> None:
        for o in self.outcomes:
            if o.share is not None and o.share < self.min_share:
                o.dropped_by = "threshold"
                o.reason = (f"kernel share {o.share:.1%} of the profile's samples is below --min-share "
                            f"{self.min_share:.1%}: not tuned")
                progress(f"tune: site {o.key}: dropped — {o.reason}")
        self.on_change()

    def search_pass(self) -> None:
        todo = sorted((o for o in self.outcomes if o.dropped_by is None), key=lambda o: -o.weight)
        for k, o in enumerate(todo):
            pool = max(0.0, self.budget.remaining() - joint_reserve(self.budget, self.config.confirm_rounds,
                                                                    len(todo)))
            by_share = split_budget([x.weight for x in todo[k:]], pool)[0]
            floor = self.decision_floor(o)
            o.allotted = allotment(by_share, floor, pool)
            o.with_on = {i: c for i, c in self.prober.fixed.items() if i != o.index}
            share = f"kernel share {o.share:.0%}" if o.share is not None else "share unknown"
            raised = (f" (its share, {by_share / 60:.1f} min, is less than one decision's "
                      f"{floor / 60:.1f})" if floor is not None and o.allotted > by_share else "")
            progress(f"tune: site {k + 1}/{len(todo)} {o.key} ({share}): start {o.start.name}, "
                     f"{o.allotted / 60:.1f}{raised} of {self.budget.remaining() / 60:.1f} min left, tuned at "
                     f"{self.threads} thread(s), verified at "
                     f"{', '.join(map(str, self.verify_threads)) or 'no other count'}")
            sub = SubBudget(self.budget, o.allotted)
            self.prober.site, self.prober.budget = o.index, sub
            o.search = self.search_fn(self.prober, o.start, self.config, sub, threads=self.threads,
                                      verify_threads=self.verify_threads)
            o.spent += sub.spent()
            self._settle(o)

    def decision_floor(self, o: SiteOutcome) -> float | None:
        """What the smallest complete decision of site `o` costs here (budget.decision_cost), None before any
        batch was measured."""
        first = min(len(initial_candidates(o.start, self.config)), self.config.max_batch)
        counts = 1 + len(other_thread_counts(self.threads, self.verify_threads))
        return decision_cost(self.budget, first, self.config.probe_rounds, self.config.confirm_rounds, counts)

    def open_sites(self) -> list[tuple[SiteOutcome, float]]:
        """Rolled-back sites whose confirmation CI still straddles the threshold, with its width."""
        out = []
        for o in self.outcomes:
            ev = o.evidence(self.threads)
            if o.dropped_by == "rollback" and o.search is not None and o.search.winner is not None and ev:
                width = open_width(ev.ratio, ev.ci95, self.threshold)
                if width is not None:
                    out.append((o, width))
        return out

    def extension_pass(self) -> None:
        pending = self.open_sites()
        kept = sum(o.kept for o in self.outcomes)
        while pending:
            reserve = joint_reserve(self.budget, self.config.confirm_rounds, kept + len(pending))
            pool = max(0.0, self.budget.remaining() - reserve)
            parts = split_budget([o.weight for o, _ in pending], pool, [w for _, w in pending])
            pick = max(range(len(pending)), key=lambda j: parts[j])
            (o, _), seconds = pending.pop(pick), parts[pick]
            if seconds <= 0:
                break
            rounds = extension_rounds(seconds, self.budget.estimate(1, 0), self.config.confirm_rounds)
            ev = o.evidence(self.threads)
            assert o.search is not None and o.search.winner is not None and ev is not None  # open_sites checks
            progress(f"tune: site {o.key}: its decision is still open ({ev.ratio:.3f} [{ev.ci_low:.3f}, "
                     f"{ev.ci_high:.3f}]); {seconds / 60:.1f} min of leftover budget for {rounds} more rounds")
            saved, self.prober.fixed = self.prober.fixed, dict(o.with_on)  # as when it was confirmed: pooling holds
            sub = SubBudget(self.budget, seconds)
            self.prober.site, self.prober.budget = o.index, sub
            o.extension = seconds
            try:
                o.search = extend_confirmation(self.prober, o.search, self.config, sub, rounds, threads=self.threads,
                                               verify_threads=self.verify_threads)
            finally:
                self.prober.fixed = saved
            o.spent += sub.spent()
            self._settle(o)
            kept = sum(x.kept for x in self.outcomes)

    def joint_pass(self) -> JointOutcome:
        members = []
        for o in self.outcomes:
            ev = o.evidence(self.threads)
            if o.kept and o.search is not None and o.search.winner is not None:
                members.append(Member(o.index, o.key, o.search.winner, ev.ratio if ev else None,
                                      ev.ci95 if ev else None, alone=not o.with_on))
        self.prober.budget = self.budget
        self.joint = verify_jointly(self.prober.race, members, self.budget, threads=self.threads,
                                    rounds=self.config.confirm_rounds, threshold=self.threshold)
        by_index = {o.index: o for o in self.outcomes}
        for m, why in self.joint.dropped:
            o = by_index[m.index]
            o.dropped_by, o.reason = "joint", why
            self.prober.fixed.pop(o.index, None)
            progress(f"tune: site {o.key}: dropped — {why}")
        progress(f"tune: joint verification {self.joint.status}: {self.joint.reason}")
        self.on_change()
        return self.joint

    def _settle(self, o: SiteOutcome) -> None:
        """A searched site's state after its decision; tells the prober and the writer."""
        s = o.search
        assert s is not None
        if s.kept and s.winner is not None:
            o.dropped_by, o.reason = None, s.reason
            self.prober.fixed[o.index] = s.winner  # later sites are tuned with this one at its setting
        elif s.winner is not None:
            o.dropped_by, o.reason = "rollback", s.reason
        elif s.stopped_because == "budget":
            o.dropped_by = "budget"
            floor = self.decision_floor(o)
            cost = "" if floor is None else f"; one decision costs about {floor / 60:.1f} min here (a larger --budget)"
            o.reason = (f"the budget ran out before its first probe: the {o.allotted / 60:.1f} min left for it "
                        f"could not pay one batch{cost}")
        else:
            o.dropped_by, o.reason = "unmeasured", s.reason
        verdict = "kept" if o.kept else "dropped"
        progress(f"tune: site {o.key}: {verdict} — {o.reason}")
        self.on_change()
