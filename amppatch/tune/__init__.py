"""amppatch tune: search each prefetch site's distance and hint on the tunable build, roll back the sites
that do not pay, verify the kept ones together, and write learned.json (which `apply --learned` bakes into
constants).

The package is split by question: ``search`` (pure: candidates, grid, `tune_site`), ``budget`` (pure: the
time budget and its split by kernel share), ``shares`` (a site's kernel share from the profile), ``joint``
(pure: the joint verification and its drop loop), ``passes`` (threshold, search, extension and joint passes
over the sites), ``probing`` (`_Prober`, which runs each batch as a mini ab-test), ``document`` (learned.json)
and this module, the stage: options and `tune()`. The stage stays in the package's own namespace because
`tune()` looks `tune_site` up here, where the tests replace it. The search itself is described in
amppatch/tune/search.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amppatch.errors import AmppatchError, UsageError
from amppatch.inputs import check_gguf, creating_dir
from amppatch.learned import Learned
from amppatch.paths import options_json
from amppatch.proc import progress
from amppatch.profiledoc import Profile
from amppatch.tune.budget import Budget, SubBudget, site_weights, split_budget
from amppatch.tune.document import SCHEMA_VERSION, LearnedWriter
from amppatch.tune.joint import JointOutcome, Member, RaceResult, verify_jointly
from amppatch.tune.passes import SiteOutcome, SitePasses
from amppatch.tune.plot import render_landscape
from amppatch.tune.probing import _Prober
from amppatch.tune.search import (
    DEFAULT_GRID_MAX,
    DEFAULT_GRID_MIN,
    OFF,
    PRIMARY_HINTS,
    RULE,
    SECONDARY_HINTS,
    Candidate,
    ProbeFn,
    ProbeResult,
    SearchConfig,
    SiteSearch,
    best_result,
    expansion_candidates,
    extend_confirmation,
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
from amppatch.tune.shares import DEFAULT_MIN_SHARE, kernel_share

if TYPE_CHECKING:
    from amppatch.build import BuildOptions
    from amppatch.patch.manifest import ApplyManifest

__all__ = [
    "DEFAULT_GRID_MAX", "DEFAULT_GRID_MIN", "DEFAULT_MIN_SHARE", "OFF", "PRIMARY_HINTS", "RULE", "SCHEMA_VERSION",
    "SECONDARY_HINTS", "Budget", "Candidate", "JointOutcome", "Member", "ProbeFn", "ProbeResult", "RaceResult",
    "SearchConfig", "SiteOutcome", "SitePasses", "SiteSearch", "SubBudget", "TuneOptions", "TuneResult",
    "best_result", "expansion_candidates", "extend_confirmation", "initial_candidates", "keep_decision",
    "latest_by_candidate", "loses", "nearest_grid_index", "power_grid", "promising", "refinement_candidates",
    "resolve_options", "round_to_line", "search_config", "site_weights", "split_budget", "tune", "tune_site",
    "verify_jointly",
]


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
    min_share: float = DEFAULT_MIN_SHARE  # sites of kernels with a smaller sample share are not tuned
    lock: Path | None = None
    gate: bool = True
    gate_model: Path | None = None
    seed: int = 0
    # replay the probe batches recorded in `out`/probes (an interrupted tune's) instead of measuring them again
    resume: bool = False

    def to_json(self) -> dict[str, Any]:
        return options_json(self)


def resolve_options(options: TuneOptions) -> TuneOptions:
    """Check and complete the options in one place."""
    from amppatch.workspace import check_llama_tree

    if options.sites and options.tunable_manifest is not None:
        raise UsageError("--site and --tunable-manifest both name the sites to tune; pass one",
                         next_step="drop --site (the manifest's sites are tuned) or --tunable-manifest")
    if not options.sites and options.tunable_manifest is None and options.profile is None:
        raise UsageError("tune needs --profile, --site or --tunable-manifest",
                         next_step="e.g. --profile profile.json (from `amppatch profile`)")
    if not 0 <= options.min_share < 1 or not math.isfinite(options.min_share):
        raise UsageError(f"--min-share must be a fraction in [0, 1), not {options.min_share}",
                         next_step=f"e.g. --min-share {DEFAULT_MIN_SHARE} (0 tunes every site)")
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
        # --site names the sites itself; a profile beside it only gives the kernel shares
        profile = None if options.sites else options.profile
        result = apply(ApplyOptions(repo=options.repo, sites=options.sites, profile=profile, tunable=True,
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


def tune(options: TuneOptions) -> TuneResult:
    """Run the whole tune stage and write learned.json (its path is returned). Ctrl-C writes learned.json
    with what was reached, then re-raises KeyboardInterrupt."""
    options = resolve_options(options)
    assert options.out is not None
    with creating_dir(options.out):  # a tune that fails before its first result leaves no empty directory
        return _tune(options)



def site_outcomes(sites: list[dict[str, Any]], profile: Profile | None) -> tuple[list[SiteOutcome], str]:
    """Each manifest site with its kernel's share (from the profile; unknown without one) and its weight in
    the budget split, and how the split is made ("kernel share" or "equal")."""
    hot = list(profile.hot_functions) if profile else []
    prof_sites = [s.to_json() for s in profile.sites] if profile else []
    shares = [kernel_share(s, hot, prof_sites) if profile else None for s in sites]
    weights = site_weights(shares, [str(s.get("function")) for s in sites])
    split = "kernel share" if any(x is not None for x in shares) else "equal"
    return [SiteOutcome(i, s, share, w, Candidate(int(s["distance_bytes"]), int(s["hint"])))
            for i, (s, share, w) in enumerate(zip(sites, shares, weights, strict=True))], split


def _tune(options: TuneOptions) -> TuneResult:
    from amppatch.build import load_build
    from amppatch.patch import cache_line_size

    assert options.out is not None
    manifest = _tunable_variant(options)
    budget = Budget(options.budget_minutes * 60.0)  # the search's time; building the variant is not part of it
    assert manifest.build_b is not None, "_tunable_variant checks it"
    tunable_build = load_build(Path(manifest.build_b))
    config = search_config(options, int(manifest.line_size or cache_line_size()))
    sites = list(manifest.sites)
    outcomes, split = site_outcomes(sites, Profile.read(options.profile) if options.profile else None)
    prober = _Prober(options, tunable_build.dir, sites, budget)
    writer = LearnedWriter(options.out / "learned.json", options, manifest, tunable_build, config, budget, outcomes,
                           split)

    def save() -> None:  # after every decision, so an interrupted or failed tune keeps what it reached
        writer.joint = passes.joint
        writer.write("running")

    # tune_site is looked up here, in the package namespace, where tests replace it
    passes = SitePasses(outcomes, prober, config, budget, threads=options.threads,
                        verify_threads=options.verify_threads or (), min_share=options.min_share, search=tune_site,
                        on_change=save)
    stopped = "done"
    interrupted = False
    try:
        writer.joint = passes.run()
    except KeyboardInterrupt:
        stopped, interrupted = "interrupted", True
        progress("tune: interrupted; writing what was reached")
    if any(o.search and o.search.phases_skipped for o in outcomes):
        stopped = "budget spent" if stopped == "done" else stopped
    if not interrupted:  # an interrupted tune keeps them: its rerun replays them
        stale = prober.remove_unreached()
        if stale:
            progress(f"tune: removed {len(stale)} probe batch(es) of an earlier sitting this search did not reach")
    result = writer.write(stopped)
    data = result.to_json()
    plot = render_landscape(data, options.out / "tune.png")
    if plot is not None:
        progress(f"tune: landscape per site in {plot}")
    kept = [w["key"] + f" d={w['distance_bytes']} h={w['hint']}" for w in data["winners"]]
    progress(f"tune: {len(kept)} of {len(sites)} site(s) kept ({'; '.join(kept) or 'none'}); "
             f"{data['budget']['spent_minutes']:.1f} of {options.budget_minutes:g} min used ({stopped})")
    if interrupted:
        progress(f"tune: partial result in {writer.path}")
        raise KeyboardInterrupt  # the exit status says tune did not finish (130); learned.json is kept
    if data["winners"]:
        progress(f"next: amppatch apply --repo {options.repo} --learned {writer.path}")
    return TuneResult(writer.path, result)
