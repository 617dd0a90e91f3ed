"""amppatch tune: search each prefetch site's distance and hint on the tunable build, roll back the sites
that do not pay, and write learned.json (which `apply --learned` bakes into constants).

The package is split by question: ``search`` (pure: candidates, grid, `tune_site`, `Budget`), ``probing``
(`_Prober`, which runs each batch as a mini ab-test) and this module, the stage: options, `tune()` and the
learned.json document. The stage stays in the package's own namespace because `tune()` looks `tune_site`
up here, where the tests replace it. The search itself is described in amppatch/tune/search.py.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amppatch import __version__
from amppatch.errors import AmppatchError, UsageError
from amppatch.inputs import check_gguf, creating_dir
from amppatch.learned import Learned
from amppatch.paths import options_json, write_text_atomic
from amppatch.proc import progress
from amppatch.profiledoc import Profile
from amppatch.tune.plot import render_landscape
from amppatch.tune.probing import _Prober
from amppatch.tune.search import (
    DEFAULT_GRID_MAX,
    DEFAULT_GRID_MIN,
    OFF,
    PRIMARY_HINTS,
    RULE,
    SECONDARY_HINTS,
    Budget,
    Candidate,
    ProbeFn,
    ProbeResult,
    SearchConfig,
    SiteSearch,
    _SubBudget,
    best_result,
    expansion_candidates,
    initial_candidates,
    keep_decision,
    latest_by_candidate,
    loses,
    nearest_grid_index,
    power_grid,
    promising,
    refinement_candidates,
    round_to_line,
    tune_site,
)

if TYPE_CHECKING:
    from amppatch.build import Build, BuildOptions
    from amppatch.patch.manifest import ApplyManifest

__all__ = [
    "DEFAULT_GRID_MAX", "DEFAULT_GRID_MIN", "OFF", "PRIMARY_HINTS", "RULE", "SCHEMA_VERSION", "SECONDARY_HINTS",
    "Budget", "Candidate", "ProbeFn", "ProbeResult", "SearchConfig", "SiteSearch", "TuneOptions", "TuneResult",
    "best_result", "expansion_candidates", "initial_candidates", "keep_decision", "latest_by_candidate", "loses",
    "nearest_grid_index", "power_grid", "promising", "refinement_candidates", "resolve_options",
    "round_to_line", "search_config", "tune", "tune_site",
]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TuneOptions:
    repo: Path
    model: Path
    profile: Path | None = None
    sites: tuple[str, ...] = ()
    tunable_manifest: Path | None = None  # an `apply --tunable` manifest with builds (skips the apply step)
    threads: int = 1
    verify_threads: tuple[int, ...] | None = None  # None: the CPU count (if it differs from `threads`)
    budget_minutes: float = 20.0
    out: Path | None = None
    build_options: BuildOptions | None = None  # the baseline's options (both arms)
    like: Path | None = None
    bench_args: tuple[str, ...] | None = None  # llama-bench flags for every arm; None: the profile's (--repack)
    grid_min: int = DEFAULT_GRID_MIN
    grid_max: int = DEFAULT_GRID_MAX
    hints: tuple[int, ...] = PRIMARY_HINTS
    refine_levels: int = 3
    max_batch: int = 4
    probe_tokens: int = 32
    probe_reps: int = 2
    probe_rounds: int = 4
    confirm_rounds: int = 8
    probe_seconds: float = 240.0  # cap per batch: rounds are cut to fit once a batch's cost is known
    min_gain: float = 0.0
    loss_tolerance: float = 0.01
    min_effect: float = 0.05
    lock: Path | None = None
    gate: bool = True
    gate_model: Path | None = None
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return options_json(self)


def resolve_options(options: TuneOptions) -> TuneOptions:
    """Check and complete the options in one place."""
    from amppatch.workspace import check_llama_tree

    sources = sum(x is not None and x != () for x in (options.profile, options.sites or None,
                                                       options.tunable_manifest))
    if sources != 1:
        raise UsageError("tune needs exactly one of --profile, --site or --tunable-manifest",
                         next_step="e.g. --profile profile.json (from `amppatch profile`)")
    model = Path(options.model).expanduser().resolve()
    check_gguf(model)  # before the tunable build: a cut file fails here in milliseconds
    if options.gate_model is not None:
        check_gguf(options.gate_model, what="gate model")
    if options.threads < 1:
        raise UsageError("--threads must be at least 1", next_step="e.g. --threads 1")
    if options.budget_minutes <= 0:
        raise UsageError("--budget must be positive minutes", next_step="e.g. --budget 20")
    verify = options.verify_threads
    if verify is None:
        ncpu = os.cpu_count() or 1
        verify = (ncpu,) if ncpu != options.threads else ()
    verify = tuple(t for t in dict.fromkeys(verify) if t != options.threads)
    if any(t < 1 for t in verify):
        raise UsageError("--verify-threads must list positive thread counts", next_step="e.g. --verify-threads 2")
    bad_hints = [h for h in options.hints if h not in (0, 1, 2, 3)]
    if bad_hints or not options.hints:
        raise UsageError(f"hints must be 0-3, got {options.hints}", next_step="e.g. --hints 3,0")
    power_grid(options.grid_min, options.grid_max)
    for label, value, low in (("--probe-rounds", options.probe_rounds, 2), ("--confirm-rounds",
                              options.confirm_rounds, 2), ("--probe-tokens", options.probe_tokens, 1),
                              ("--probe-reps", options.probe_reps, 1), ("--max-batch", options.max_batch, 1)):
        if value < low:
            raise UsageError(f"{label} must be at least {low}", next_step=f"e.g. {label} {max(low, 4)}")
    bench_args = options.bench_args
    profile = Path(options.profile).expanduser().resolve() if options.profile else None
    if bench_args is None:
        bench_args = ()
        if profile is not None:
            prof_opts = Profile.read(profile).options
            # Tune what the profile measured: the same weight routing (--repack) decides which kernel runs.
            if prof_opts.get("repack") is not None:
                bench_args = ("--repack", str(prof_opts["repack"]))
    out = Path(options.out or Path.cwd() / "amppatch-tune").expanduser().resolve()
    lock = options.lock
    if lock is None and os.environ.get("AMPPATCH_MEASURE_LOCK"):
        lock = Path(os.environ["AMPPATCH_MEASURE_LOCK"])
    return replace(options, repo=check_llama_tree(options.repo), model=model, profile=profile,
                   tunable_manifest=Path(options.tunable_manifest).expanduser().resolve()
                   if options.tunable_manifest else None,
                   verify_threads=verify, bench_args=tuple(bench_args), out=out, lock=lock)


def search_config(options: TuneOptions, line_size: int) -> SearchConfig:
    return SearchConfig(grid=power_grid(options.grid_min, options.grid_max), line_size=line_size,
                        hints=tuple(options.hints), refine_levels=options.refine_levels,
                        max_batch=options.max_batch, probe_rounds=options.probe_rounds,
                        confirm_rounds=options.confirm_rounds, min_gain=options.min_gain,
                        loss_tolerance=options.loss_tolerance)


def _tunable_variant(options: TuneOptions) -> ApplyManifest:
    """The `apply --tunable` manifest (built and gated), from the given one or a fresh apply."""
    from amppatch.patch.manifest import ApplyManifest

    if options.tunable_manifest is not None:
        manifest = ApplyManifest.read(options.tunable_manifest)
    else:
        from amppatch.patch import ApplyOptions, apply

        progress("tune: building the tunable variant (apply --tunable) ...")
        assert options.out is not None, "resolve_options sets out"
        result = apply(ApplyOptions(repo=options.repo, sites=options.sites, profile=options.profile, tunable=True,
                                    build_options=options.build_options, like=options.like,
                                    out=options.out / "tunable", gate=options.gate, gate_model=options.gate_model))
        if result.manifest is None:
            raise AmppatchError("apply --tunable produced no manifest (nothing to patch)",
                                next_step="check the sites with `amppatch apply --dry-run`")
        manifest = result.manifest
    if not manifest.tunable:
        raise UsageError(f"{manifest.path} is not a tunable apply manifest",
                         next_step="run `amppatch apply --tunable` (or let tune do it with --profile)")
    if not manifest.build_b:
        raise UsageError(f"{manifest.path} has no builds (apply ran with --no-build)",
                         next_step="rerun apply --tunable without --no-build")
    return manifest


@dataclass
class TuneResult:
    path: Path
    learned: Learned


def _code_path(build_manifest: dict[str, Any]) -> dict[str, Any]:
    keys = ("key", "compiler", "compiler_version", "cflags", "kernel_cflags", "cmake_options", "pgo",
            "isa_features", "commit")
    return {k: build_manifest.get(k) for k in keys if k in build_manifest}


def tune(options: TuneOptions) -> TuneResult:
    """Run the whole tune stage and write learned.json (its path is returned). Ctrl-C writes learned.json
    with what was reached, then re-raises KeyboardInterrupt."""
    options = resolve_options(options)
    assert options.out is not None
    with creating_dir(options.out):  # a tune that fails before its first result leaves no empty directory
        return _tune(options)


@dataclass
class _Learned:
    """learned.json as the search fills it, rewritten after every site so an interrupted or failed tune
    keeps what it reached."""

    path: Path
    options: TuneOptions
    manifest: ApplyManifest
    build: Build
    config: SearchConfig
    budget: Budget
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    sites: list[dict[str, Any]] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)

    def write(self, stopped: str) -> Learned:
        from amppatch.machine import cpu_model

        options, manifest, config, budget = self.options, self.manifest, self.config, self.budget
        winners = [r["winner"] | {k: r[k] for k in ("key", "function", "loop", "stream", "file")}
                   for r in self.sites if r["kept"]]
        data = {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "amppatch", "version": __version__, "command": "tune"},
            "created_utc": self.started,
            "options": options.to_json(),
            "rule": RULE,
            "search": {"grid": list(config.grid), "line_size": config.line_size, "hints": list(config.hints),
                       "secondary_hints": list(config.secondary_hints), "refine_levels": config.refine_levels},
            "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count()},
            "code_path": _code_path(self.build.manifest),
            "repo": str(options.repo),
            "base_commit": manifest.base_commit,
            "tunable": {"manifest": str(manifest.path), "branch": manifest.branch,
                        "commit": manifest.commit, "build": str(self.build.dir),
                        "stock_build": manifest.build_a},
            "model": str(options.model),
            "threads": options.threads,
            "verify_threads": list(options.verify_threads or ()),
            "budget": {"minutes": options.budget_minutes, "spent_minutes": round(budget.spent() / 60, 2),
                       "lock_wait_minutes": round(budget.excluded / 60, 2),
                       "exhausted": budget.remaining() <= 0 or any(r["phases_skipped"] for r in self.sites),
                       "stopped_because": stopped},
            "sites": self.sites,
            "probes": self.probes,
            "winners": winners,
            "dropped": [{k: r[k] for k in ("key", "function", "loop", "stream")} | {"reason": r["reason"],
                        "best": r["best"]} for r in self.sites if not r["kept"]],
        }
        text = json.dumps(data, indent=1, default=str) + "\n"
        write_text_atomic(self.path, text)
        return Learned.from_json(json.loads(text), self.path)  # the document as written (paths as text)


def _site_record(site: dict[str, Any], start: Candidate, search: SiteSearch, threads: int,
                 probes: list[int]) -> dict[str, Any]:
    """learned.json's entry for one searched site (`probes`: indices into its probe list)."""
    best = best_result(search.results, threads)
    record = {
        "key": site["key"], "function": site["function"], "loop": site["loop"], "stream": site["stream"],
        "file": site.get("file"), "env": site.get("env"), "start": {"distance_bytes": start.distance,
                                                                    "hint": start.hint},
        "kept": search.kept, "reason": search.reason, "confirmed": search.confirmed,
        "stopped_because": search.stopped_because, "phases_skipped": search.phases_skipped,
        "best": best.to_json() | {"samples_ns": None, "off_samples_ns": None} if best else None,
        "evidence": {str(t): r.to_json() | {"samples_ns": None, "off_samples_ns": None}
                     for t, r in search.by_threads.items()},
        "probes": probes,
        "winner": None,
    }
    if search.winner is not None and search.kept:
        ev = search.by_threads.get(threads)
        record["winner"] = {"distance_bytes": search.winner.distance, "hint": search.winner.hint,
                            "ratio": ev.ratio if ev else None,
                            "ci95": list(ev.ci95) if ev and ev.ci95 else None,
                            "ratio_by_threads": {str(t): r.ratio for t, r in search.by_threads.items()}}
    return record


def _tune(options: TuneOptions) -> TuneResult:
    from amppatch.build import load_build
    from amppatch.patch import cache_line_size

    assert options.out is not None
    manifest = _tunable_variant(options)
    budget = Budget(options.budget_minutes * 60.0)  # the search's time; building the variant is not part of it
    assert manifest.build_b is not None, "_tunable_variant checks it"
    tunable_build = load_build(Path(manifest.build_b))
    line_size = int(manifest.line_size or cache_line_size())
    config = search_config(options, line_size)
    sites = list(manifest.sites)
    prober = _Prober(options, tunable_build.dir, sites, budget)
    learned = _Learned(options.out / "learned.json", options, manifest, tunable_build, config, budget)

    stopped = "done"
    interrupted = False
    try:
        for i, site in enumerate(sites):
            prober.site = i
            left = len(sites) - i
            share = budget.remaining() / left
            site_budget = _SubBudget(budget, share)
            start = Candidate(int(site["distance_bytes"]), int(site["hint"]))
            progress(f"tune: site {i + 1}/{len(sites)} {site['key']}: start {start.name}, "
                     f"{share / 60:.1f} min of budget, tuned at {options.threads} thread(s), verified at "
                     f"{', '.join(map(str, options.verify_threads or ())) or 'no other count'}")
            probes_before = len(learned.probes)
            prober.budget = site_budget
            search = tune_site(prober, start, config, site_budget, threads=options.threads,
                               verify_threads=options.verify_threads or ())
            for r in search.results:
                learned.probes.append({"site": site["key"], **r.to_json()})
            record = _site_record(site, start, search, options.threads,
                                  list(range(probes_before, len(learned.probes))))
            if record["winner"] is not None and search.winner is not None:
                prober.fixed[i] = search.winner  # later sites are tuned with this one at its winner
            learned.sites.append(record)
            verdict = "kept" if search.kept else "dropped"
            progress(f"tune: site {site['key']}: {verdict} — {search.reason}")
            learned.write("running")
    except KeyboardInterrupt:
        stopped = "interrupted"
        interrupted = True
        progress("tune: interrupted; writing what was reached")
    if any(r["phases_skipped"] for r in learned.sites):
        stopped = "budget spent" if stopped == "done" else stopped
    result = learned.write(stopped)
    data = result.to_json()
    plot = render_landscape(data, options.out / "tune.png")
    if plot is not None:
        progress(f"tune: landscape per site in {plot}")
    kept = [w["key"] + f" d={w['distance_bytes']} h={w['hint']}" for w in data["winners"]]
    progress(f"tune: {len(kept)} of {len(sites)} site(s) kept ({'; '.join(kept) or 'none'}); "
             f"{data['budget']['spent_minutes']:.1f} of {options.budget_minutes:g} min used ({stopped})")
    if interrupted:
        progress(f"tune: partial result in {learned.path}")
        raise KeyboardInterrupt  # the exit status says tune did not finish (130); learned.json is kept
    if data["winners"]:
        progress(f"next: amppatch apply --repo {options.repo} --learned {learned.path}")
    return TuneResult(learned.path, result)
