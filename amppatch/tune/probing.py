"""Probing for `amppatch tune`: each batch of candidates is one interleaved ab-test on the tunable build,
every arm the same binary with the sites' distances and hints set through the environment."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amppatch.paths import FileLock
from amppatch.proc import progress
from amppatch.tune.search import OFF, Budget, Candidate, ProbeResult

if TYPE_CHECKING:
    from amppatch.tune import TuneOptions


class _Prober:
    """Runs probe batches as ab-tests on the tunable build and remembers every one."""

    def __init__(self, options: TuneOptions, build_dir: Path, sites: list[dict[str, Any]], budget: Budget) -> None:
        self.options = options
        self.build_dir = build_dir
        self.sites = sites
        self.budget = budget
        self.fixed: dict[int, Candidate] = {}  # site index -> setting used while tuning later sites
        self.site = 0
        self.count = 0
        assert options.out is not None, "resolve_options sets out"
        self.probe_dir = options.out / "probes"

    def env_for(self, candidate: Candidate) -> tuple[tuple[str, str], ...]:
        env = []
        for i, s in enumerate(self.sites):
            c = candidate if i == self.site else self.fixed.get(i, Candidate(s["distance_bytes"], OFF))
            env += [(s["env"]["distance"], str(c.distance)), (s["env"]["hint"], str(c.hint))]
        return tuple(env)

    def rounds_for(self, n: int, rounds: int) -> int:
        est = self.budget.estimate(n, 1)
        if est is None:
            return rounds
        per_round = est / 2  # estimate(n, 1) covers warmup + one round
        fit = int((self.options.probe_seconds - per_round) // per_round)
        return max(2, min(rounds, fit))

    def __call__(self, candidates: list[Candidate], threads: int, rounds: int, phase: str) -> list[ProbeResult]:
        from amppatch.abtest import AbTestOptions, ArmSpec, run_abtest

        o = self.options
        rounds = self.rounds_for(len(candidates), rounds)
        self.count += 1
        key = self.sites[self.site]["key"]
        names = ", ".join(c.name for c in candidates)
        progress(f"tune: probe {self.count} [{key}] {phase} at {threads} thread(s), {rounds} rounds: off vs "
                 f"{names} (budget {self.budget.spent() / 60:.1f}/{self.budget.seconds / 60:.0f} min)")
        bench_args = o.bench_args or ()  # resolve_options has settled None to the profile's flags
        arms = [ArmSpec("off", self.build_dir, bench_args, self.env_for(Candidate(0, OFF)))]
        arms += [ArmSpec(c.name, self.build_dir, bench_args, self.env_for(c)) for c in candidates]
        out = self.probe_dir / f"{self.count:03d}-site{self.site}-{phase}-t{threads}"
        ab = AbTestOptions(arms=tuple(arms), model=o.model, threads=(threads,), tokens=o.probe_tokens,
                           reps=o.probe_reps, rounds=rounds, min_effect=o.min_effect, seed=o.seed + self.count,
                           out=out, skip_correctness=True, latency="off", llc=False, n_boot=2000)
        if o.lock is not None:
            waited = time.monotonic()
            with FileLock(o.lock):
                self.budget.exclude(time.monotonic() - waited)
                report = run_abtest(ab)
        else:
            report = run_abtest(ab)
        off = report.arm("off")
        results = []
        for c in candidates:
            comp = report.comparison(c.name)
            arm = report.arm(c.name)
            extra = {"rounds": rounds, "report": str(report.path),
                     "median_tok_s": arm.median_tok_s if arm else None,
                     "off_median_tok_s": off.median_tok_s if off else None,
                     "samples_ns": list(arm.samples_ns) if arm else [],
                     "off_samples_ns": list(off.samples_ns) if off else [], "n_tokens": o.probe_tokens,
                     "n_blocks": comp.n_blocks if comp else None,
                     "warnings": [w for w in report.warnings
                                  if w.startswith((c.name, "the machine", "other processes", "the hypervisor"))]}
            if comp is None or comp.ratio is None or comp.ci95 is None:
                results.append(ProbeResult(c, threads, phase, None, None, "unavailable", extra=extra))
                continue
            ci = (float(comp.ci95[0]), float(comp.ci95[1]))
            results.append(ProbeResult(c, threads, phase, float(comp.ratio), ci, comp.verdict, extra=extra))
            progress(f"tune:   {c.name}: {comp.ratio:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] {comp.verdict} "
                     f"({extra['median_tok_s'] or 0:.2f} vs {extra['off_median_tok_s'] or 0:.2f} tok/s)")
        return results

