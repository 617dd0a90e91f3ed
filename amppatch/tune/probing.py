"""Probing for `amppatch tune`: each batch of candidates is one interleaved ab-test on the tunable build,
every arm the same binary with the sites' distances and hints set through the environment.

Three kinds of batch: a site's candidates against that site off (the other kept sites at their settings);
an extension of a site's confirmation (phase "extend"), whose blocks are pooled with that confirmation's
(`pooled_comparison`) when every other site was set the same way; and the joint race, the kept set against
every site off."""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amppatch import stats
from amppatch.paths import FileLock
from amppatch.proc import progress
from amppatch.tune.budget import Budget
from amppatch.tune.joint import RaceResult
from amppatch.tune.search import OFF, Candidate, ProbeResult

if TYPE_CHECKING:
    from amppatch.abtest import AbTestResult
    from amppatch.tune import TuneOptions

Env = tuple[tuple[str, str], ...]
N_BOOT = 2000
BATCH_DIR = re.compile(r"\d{3}-(site\d+-[a-z]+|joint)-t\d+")  # a batch's directory under probes/


def pooled_comparison(reports: Sequence[Mapping[str, Any]], base: str, arm: str, setting: str, *,
                      min_effect: float, seed: int) -> stats.Comparison | None:
    """`arm` against `base` at `setting` over the blocks of several ab-test reports (report.json documents) of
    the same two arms: blocks are numbered apart per report, so each stays one paired block."""
    from amppatch.abtest.analysis import compare_arms, samples_from_report

    pooled = []
    offset = 0
    for doc in reports:
        samples = samples_from_report(dict(doc))
        pooled += [replace(s, block=s.block + offset) for s in samples]
        offset += max((s.block for s in samples), default=-1) + 1
    return compare_arms(pooled, base, arm, setting, min_effect=min_effect, seed=seed, n_boot=N_BOOT)


class _Prober:
    """Runs probe batches as ab-tests on the tunable build and remembers every one."""

    def __init__(self, options: TuneOptions, build_dir: Path, sites: list[dict[str, Any]], budget: Budget) -> None:
        self.options = options
        self.build_dir = build_dir
        self.sites = sites
        self.budget = budget
        self.fixed: dict[int, Candidate] = {}  # site index -> setting used while tuning the others
        self.site = 0
        self.count = 0
        # confirmations by (site, candidate, threads, environment of both arms): what an extension pools with
        self.confirmations: dict[tuple[int, Candidate, int, Env, Env], list[AbTestResult]] = {}
        assert options.out is not None, "resolve_options sets out"
        self.probe_dir = options.out / "probes"
        self.batch_dirs: list[Path] = []  # every batch's ab-test directory, in order

    def env(self, settings: Mapping[int, Candidate]) -> Env:
        """Every site's variables: its setting in `settings`, else off."""
        env: list[tuple[str, str]] = []
        for i, s in enumerate(self.sites):
            c = settings.get(i, Candidate(int(s["distance_bytes"]), OFF))
            env += [(s["env"]["distance"], str(c.distance)), (s["env"]["hint"], str(c.hint))]
        return tuple(env)

    def env_for(self, candidate: Candidate) -> Env:
        """The current site at `candidate`, the fixed sites at their settings, the rest off."""
        return self.env({**{i: c for i, c in self.fixed.items() if i != self.site}, self.site: candidate})

    def with_on(self) -> list[str]:
        """The other sites switched on (at their settings) while the current one is probed."""
        return [self.sites[i]["key"] for i in sorted(self.fixed) if i != self.site]

    def rounds_for(self, n: int, rounds: int) -> int:
        est = self.budget.estimate(n, 1)
        if est is None:
            return rounds
        per_round = est / 2  # estimate(n, 1) covers warmup + one round
        fit = int((self.options.probe_seconds - per_round) // per_round)
        return max(2, min(rounds, fit))

    def _race(self, arms: list[tuple[str, Env]], threads: int, rounds: int, tag: str) -> AbTestResult:
        """One interleaved ab-test of the tunable build under the arms' environments (the first is the base)."""
        from amppatch.abtest import AbTestOptions, ArmSpec, run_abtest

        o = self.options
        bench_args = o.bench_args or ()  # resolve_options has settled None to the profile's flags
        specs = tuple(ArmSpec(name, self.build_dir, bench_args, env) for name, env in arms)
        # Every batch keeps its checkpoint. Resumed, a rerun of an interrupted tune asks for the same batches in
        # the same order (the search is deterministic given their results), so each batch already measured is
        # replayed from its rounds.json, and the first one that differs is measured afresh.
        out = self.probe_dir / f"{self.count:03d}-{tag}-t{threads}"
        self.batch_dirs.append(out)
        ab = AbTestOptions(arms=specs, model=o.model, threads=(threads,), tokens=o.probe_tokens,
                           reps=o.probe_reps, rounds=rounds, min_effect=o.min_effect, seed=o.seed + self.count,
                           out=out, skip_correctness=True, latency="off", llc=False, n_boot=N_BOOT,
                           resume=o.resume)
        clock = self.budget.clock
        start = clock()
        if o.lock is None:
            report = run_abtest(ab)
        else:
            with FileLock(o.lock):
                self.budget.wait_for_lock(clock() - start)
                report = run_abtest(ab)
        earlier = float(report.diagnostics.get("resumed_seconds") or 0.0)
        if earlier > 0:
            # the batch costs what it cost when measured: a whole replay's own seconds (reading the checkpoint,
            # the statistics) are not spent on measuring, and counting them would let the resumed search's
            # estimates drift from the uninterrupted one's
            if report.diagnostics.get("resumed_rounds") == report.diagnostics.get("rounds"):
                self.budget.exclude(clock() - start)
            self.budget.charge(earlier)
            progress(f"tune:   {report.diagnostics.get('resumed_rounds')} round(s) replayed from {report.path}, "
                     f"{earlier / 60:.1f} min of an earlier sitting counted against the budget")
        return report

    def remove_unreached(self) -> list[Path]:
        """Remove the batch directories under probes/ that this search did not ask for (an earlier sitting's
        longer or diverging search), so probes/ holds what learned.json lists; returns them. Only directories
        named and filled like a batch's go: anything else a user keeps there stays."""
        if not self.probe_dir.is_dir():
            return []
        used = set(self.batch_dirs)
        stale = sorted(d for d in self.probe_dir.iterdir()
                       if d.is_dir() and d not in used and BATCH_DIR.fullmatch(d.name)
                       and any((d / name).exists() for name in ("rounds.json", "report.json")))
        for d in stale:
            shutil.rmtree(d)
        return stale

    def __call__(self, candidates: list[Candidate], threads: int, rounds: int, phase: str) -> list[ProbeResult]:
        o = self.options
        rounds = self.rounds_for(len(candidates), rounds)
        self.count += 1
        key = self.sites[self.site]["key"]
        names = ", ".join(c.name for c in candidates)
        progress(f"tune: probe {self.count} [{key}] {phase} at {threads} thread(s), {rounds} rounds: off vs "
                 f"{names} (budget {self.budget.spent() / 60:.1f}/{self.budget.seconds / 60:.1f} min)")
        off_env = self.env_for(Candidate(0, OFF))
        arms = [("off", off_env)] + [(c.name, self.env_for(c)) for c in candidates]
        report = self._race(arms, threads, rounds, f"site{self.site}-{phase}")
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
                     "n_blocks": comp.n_blocks if comp else None, "with_on": self.with_on(),
                     "warnings": [w for w in report.warnings
                                  if w.startswith((c.name, "the machine", "other processes", "the hypervisor"))]}
            ratio, ci, verdict = ((comp.ratio, comp.ci95, comp.verdict) if comp is not None
                                  else (None, None, "unavailable"))
            if phase in ("confirm", "extend") and comp is not None:
                ident = (self.site, c, threads, off_env, self.env_for(c))
                earlier = self.confirmations.setdefault(ident, [])
                if phase == "extend" and earlier:
                    setting = comp.setting
                    pooled = pooled_comparison([r.to_json() for r in [*earlier, report]], "off", c.name, setting,
                                               min_effect=o.min_effect, seed=o.seed + self.count)
                    if pooled is not None:
                        ratio, ci, verdict = pooled.ratio, (pooled.ci_low, pooled.ci_high), pooled.verdict
                        extra |= {"pooled_reports": [str(r.path) for r in earlier], "n_blocks": pooled.n_blocks,
                                  "batch_ratio": comp.ratio, "batch_ci95": list(comp.ci95) if comp.ci95 else None}
                earlier.append(report)
            if ratio is None or ci is None:
                results.append(ProbeResult(c, threads, phase, None, None, "unavailable", extra=extra))
                continue
            ci = (float(ci[0]), float(ci[1]))
            results.append(ProbeResult(c, threads, phase, float(ratio), ci, verdict, extra=extra))
            progress(f"tune:   {c.name}: {ratio:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] {verdict} "
                     f"({extra['median_tok_s'] or 0:.2f} vs {extra['off_median_tok_s'] or 0:.2f} tok/s)"
                     + (f", pooled over {extra['n_blocks']} blocks" if "pooled_reports" in extra else ""))
        return results

    def race(self, settings: Mapping[int, Candidate], threads: int, rounds: int) -> RaceResult:
        """The joint race: the sites in `settings` at their settings against every site off."""
        rounds = self.rounds_for(1, rounds)
        self.count += 1
        keys = ", ".join(self.sites[i]["key"] for i in sorted(settings))
        progress(f"tune: joint race {self.count} at {threads} thread(s), {rounds} rounds: all off vs {keys}")
        report = self._race([("off", self.env({})), ("joint", self.env(settings))], threads, rounds, "joint")
        comp = report.comparison("joint")
        arm, off = report.arm("joint"), report.arm("off")
        extra = {"report": str(report.path), "median_tok_s": arm.median_tok_s if arm else None,
                 "off_median_tok_s": off.median_tok_s if off else None,
                 "n_blocks": comp.n_blocks if comp else None}
        if comp is None or comp.ratio is None or comp.ci95 is None:
            return RaceResult(None, None, "unavailable", rounds, extra=extra)
        ci = (float(comp.ci95[0]), float(comp.ci95[1]))
        progress(f"tune:   joint: {comp.ratio:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] {comp.verdict}")
        return RaceResult(float(comp.ratio), ci, comp.verdict, rounds, extra=extra)
