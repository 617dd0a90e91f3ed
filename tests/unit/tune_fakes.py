"""Fakes for tune's passes: a clock and a machine of several sites whose speed-ups are functions (no
subprocess), shared by test_tune_budget.py and test_tune_document.py."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from amppatch.tune import Budget, Candidate, ProbeResult, RaceResult, SiteOutcome


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeSites:
    """Several sites on one machine: `speedup[i](candidate)` is site i's ratio against it switched off, with a
    CI of ± `noise` (± `extend_noise` for a pooled extension); `joint(settings)` is (ratio, half width) of a
    set against every site off. Each llama-bench call costs `run_seconds` of fake time."""

    def __init__(self, speedup: Mapping[int, Callable[[Candidate], float]], clock: FakeClock, *,
                 noise: float = 0.02, extend_noise: float | None = None, run_seconds: float = 1.0,
                 joint: Callable[[Mapping[int, Candidate]], tuple[float, float]] | None = None) -> None:
        self.speedup, self.clock, self.noise, self.run_seconds = speedup, clock, noise, run_seconds
        self.extend_noise = noise if extend_noise is None else extend_noise
        self.joint = joint or (lambda settings: (1.05, 0.02))
        self.site = 0
        self.fixed: dict[int, Candidate] = {}
        self.budget = Budget(0.0, clock)
        self.calls: list[tuple[int, str, int, dict[int, Candidate]]] = []
        self.races: list[dict[int, Candidate]] = []

    def __call__(self, candidates: list[Candidate], threads: int, rounds: int, phase: str) -> list[ProbeResult]:
        self.calls.append((self.site, phase, rounds, dict(self.fixed)))
        self.clock.now += self.run_seconds * (len(candidates) + 1) * (rounds + 1)
        half = self.extend_noise if phase == "extend" else self.noise
        return [ProbeResult(c, threads, phase, r, (r - half, r + half), "x")
                for c in candidates for r in [self.speedup[self.site](c)]]

    def race(self, settings: Mapping[int, Candidate], threads: int, rounds: int) -> RaceResult:
        self.races.append(dict(settings))
        self.clock.now += self.run_seconds * 2 * (rounds + 1)
        ratio, half = self.joint(settings)
        return RaceResult(ratio, (ratio - half, ratio + half), "x", rounds)

    def phases(self, site: int) -> list[str]:
        return [p for s, p, _, _ in self.calls if s == site]


BEST = Candidate(4096, 3)


def helps(ratio: float) -> Callable[[Candidate], float]:
    """A site whose best setting (BEST) gains `ratio`; every other setting a third of that."""
    return lambda c: ratio if c == BEST else 1.0 + (ratio - 1.0) / 3


def outcome(i: int, function: str, share: float | None, weight: float | None = None) -> SiteOutcome:
    site = {"key": f"{function}#0 x", "function": function, "loop": 0, "stream": "x", "distance_bytes": 2048,
            "hint": 3}
    return SiteOutcome(i, site, share, share if weight is None else weight, Candidate(2048, 3))
