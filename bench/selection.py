"""Measured first cuts that decide how two arms are built: the `--param`s of GCC's loop prefetching (a
small grid raced against stock) and amppatch's baked sites (tune's learned.json, else the profiles' sites
with a distance/hint picked by a quick race per kernel). Every decision is cached in the work dir."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amppatch.errors import UsageError
from amppatch.learned import Learned
from amppatch.paths import write_text_atomic
from amppatch.proc import progress
from amppatch.profiledoc import Profile
from bench.builds import Context, build_options_for, locked_build
from bench.configs import WEIGHT_TYPES
from bench.measure import measure_lock, race, read_json

if TYPE_CHECKING:
    from amppatch.patch.manifest import ApplyManifest

SELECTION_ROUNDS = 2  # the grid and the search are a first cut, not a verdict: two mirrored blocks each


def pick_best(candidates: dict[str, dict[str, Any]]) -> tuple[str | None, str]:
    """The candidate with the highest ratio to its baseline among those whose CI lower bound beats the
    others' point estimates is hard to call on few rounds; use the plain rule: highest ratio, and only if
    its CI is not wholly below 1 (a measured loss is never picked). Returns (name or None, why)."""
    usable = {k: v for k, v in candidates.items() if v.get("ratio") is not None}
    if not usable:
        return None, "no candidate was measured"
    best = max(usable, key=lambda k: usable[k]["ratio"])
    ci = usable[best].get("ci95") or [None, None]
    if usable[best]["ratio"] < 1.0 or (ci[1] is not None and ci[1] < 1.0):
        return None, f"no candidate beat the baseline (best {best}: {usable[best]['ratio']:.3f})"
    return best, (f"highest median ratio {usable[best]['ratio']:.3f}"
                  + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else ""))


# ----------------------------------------------------------------------------------------------------------
# gcc -fprefetch-loop-arrays: a small measured grid

# GCC's loop-prefetch knobs (gcc/tree-ssa-loop-prefetch.cc). The grid: defaults, longer latency with more
# prefetch slots, and the same with the instruction-to-prefetch gate lowered — without that, GCC 12 emits no
# prefetch at all in the Q8_0 and F16 dot products (checked with objdump), so the arm would be stock there.
GCC_GRID: tuple[str, ...] = (
    "--param=prefetch-latency=200 --param=simultaneous-prefetches=6",
    "--param=prefetch-latency=800 --param=simultaneous-prefetches=24",
    "--param=prefetch-latency=800 --param=simultaneous-prefetches=24 --param=min-insn-to-prefetch-ratio=1",
)

# The grid is raced on Q8_0 and Q4_0; F16's dot product is refused by GCC's gates exactly like Q8_0's (no
# prefetch without min-insn-to-prefetch-ratio=1), so it takes Q8_0's winner rather than another race.
GCC_GRID_TYPES = ("q8_0", "q4_0")
GCC_GRID_BORROW = {"f16": "q8_0"}


def select_gcc_params(ctx: Context) -> dict[str, Any]:
    """Build stock + every grid point on the native path and race them per weight type at 1 thread; keep
    the grid point with the best median ratio per weight type (cached in the work dir)."""
    opts = ctx.options
    if opts.gcc_params is not None:
        return {"mode": "given", "per_type": {t: opts.gcc_params for t in WEIGHT_TYPES}, "races": {}}
    cache = Path(opts.work) / "gcc-grid.json"
    key = hashlib.sha256(json.dumps([GCC_GRID, str(ctx.stock["native"].dir), opts.tokens]).encode()).hexdigest()[:12]
    cached = read_json(cache)
    if cached and cached.get("key") == key:
        return cached
    progress(f"bench: gcc grid: {len(GCC_GRID)} -fprefetch-loop-arrays variants (native path) ...")
    builds = {p: locked_build(build_options_for(ctx.repo, "native", kernel_cflags=gcc_flags(p),
                                                name=f"bench gcc {p}")) for p in GCC_GRID}
    per_type: dict[str, str] = {}
    races: dict[str, Any] = {}
    for wt in GCC_GRID_TYPES:
        arms = [("stock", ctx.stock["native"].dir, (), ())]
        arms += [(f"g{i}", builds[p].dir, (), ()) for i, p in enumerate(GCC_GRID)]
        report, _ = race(arms, ctx.models[wt], (1,), Path(opts.work) / "reports" / f"gcc-grid-{wt}", opts,
                      gate_model=None, max_time=None, rounds=SELECTION_ROUNDS)
        cands = {GCC_GRID[int(c.arm[1:])]: c.to_json() for c in report.comparisons}
        best, why = pick_best(cands)
        # A flag arm that loses everywhere still has to be raced: keep GCC's defaults then.
        per_type[wt] = best or GCC_GRID[0]
        races[wt] = {"candidates": {p: {"ratio": c["ratio"], "ci95": c["ci95"]} for p, c in cands.items()},
                     "chosen": per_type[wt], "why": why if best else f"{why}; kept GCC's defaults"}
        progress(f"bench: gcc grid {wt}: {per_type[wt]} ({races[wt]['why']})")
    for wt, like in GCC_GRID_BORROW.items():
        per_type[wt] = per_type[like]
        races[wt] = {"chosen": per_type[wt], "why": f"not raced: takes {like}'s winner (same GCC gate, see GCC_GRID)"}
    result = {"mode": "grid", "key": key, "grid": list(GCC_GRID), "per_type": per_type, "races": races,
              "how": f"each grid point raced against stock, native build, 1 thread, {SELECTION_ROUNDS} rounds, "
                     f"tg{opts.tokens}; highest median ratio whose CI is not wholly below 1"}
    write_text_atomic(cache, json.dumps(result, indent=2) + "\n")
    return result


def gcc_flags(params: str) -> str:
    return f"-fprefetch-loop-arrays {params}".strip()


# ----------------------------------------------------------------------------------------------------------
# amppatch arm: learned.json from tune, else the profiles' sites with a quick measured search

# The profiles the sites come from: (weight type, --repack) on the native stock build at 1 thread.
PROFILE_RUNS = (("q8_0", None), ("q4_0", None), ("q4_0", 0), ("f16", None))
# (distance scale, hint) candidates the quick search races per weight type, against the sites switched off.
SEARCH_GRID: tuple[tuple[float, int], ...] = ((1.0, 0), (1.0, 3), (0.25, 0), (0.25, 3))


def profiles(ctx: Context) -> dict[str, Path]:
    from amppatch.profile import ProfileOptions, profile

    out: dict[str, Path] = {}
    for wt, repack in PROFILE_RUNS:
        name = f"{wt}-repack{'0' if repack == 0 else '1'}"
        path = Path(ctx.options.work) / "profiles" / f"1b-{name}.json"
        if not path.is_file():
            progress(f"bench: profiling {name} (native stock, 1 thread) ...")
            with measure_lock(f"profile {name}"):
                profile(ProfileOptions(repo=ctx.repo, model=ctx.models[wt], build=ctx.stock["native"].dir,
                                       threads=1, tokens=32, repack=repack, out=path))
        out[name] = path
    return out


def merged_sites(paths: dict[str, Path]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every profile's sites, one per (function, loop, stream), the hottest profile's numbers winning."""
    sites: dict[tuple[str, str, str], dict[str, Any]] = {}
    machine: dict[str, Any] = {}
    for name, path in paths.items():
        prof = Profile.read(path)
        machine = machine or prof.machine
        for site in prof.sites:
            k = (site.function, str(site.loop), str(site.stream))
            s = {**site.to_json(), "from_profile": name}
            if k not in sites or (s.get("share") or 0) > (sites[k].get("share") or 0):
                sites[k] = s
    return list(sites.values()), machine


# What the quick search races: (target, weight type, llama-bench flags, substring of the site's function).
SEARCH_TARGETS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("q8_0", "q8_0", (), "vec_dot_q8_0_q8_0"),
    ("q4_0", "q4_0", (), "q4_b32"),  # the CPU_REPACK gemv (default --repack 1)
    ("q4_0-repack0", "q4_0", ("--repack", "0"), "vec_dot_q4_0_q8_0"),
    ("f16", "f16", (), "vec_dot_f16"),
)


def search_target(function: str) -> str | None:
    """Which search target decides a site (None: a minor site, e.g. Q6_K's output layer, kept as profiled)."""
    for target, _, _, needle in SEARCH_TARGETS:
        if needle in function:
            return target
    return None


def write_profile(path: Path, sites: list[dict[str, Any]], machine: dict[str, Any], note: str) -> Path:
    write_text_atomic(path, json.dumps({"schema_version": 1, "machine": machine, "sites": sites,
                                        "notes": [note]}, indent=2) + "\n")
    return path


def _apply(ctx: Context, profile_path: Path, *, tunable: bool) -> tuple[str, ApplyManifest]:
    from amppatch.patch import ApplyOptions, apply

    res = apply(ApplyOptions(repo=ctx.repo, profile=profile_path, tunable=tunable, build=False,
                             compile_db=ctx.stock["native"].dir / "compile_commands.json",
                             out=Path(ctx.options.work) / "patches", gate=False))
    if res.branch is None or res.manifest is None:
        raise UsageError("apply produced no branch", next_step="run amppatch apply --dry-run with these sites")
    return res.branch, res.manifest


def learned_amx_types(paths: Sequence[Path]) -> set[str]:
    """The weight types whose AMX-buffer kernel (ggml-cpu/amx/) a learned.json keeps a tuned site in."""
    from amppatch.gate_sites import model_type_for

    types: set[str] = set()
    for path in paths:
        for site in Learned.read(Path(path)).sites:
            if site.get("kept") and "/amx/" in str(site.get("file") or ""):
                types.add(model_type_for(str(site.get("function") or "")) or "?")
    return types


def amppatch_branch(ctx: Context) -> tuple[str, str, dict[str, Any]]:
    """(branch, label, evidence) of the baked amppatch arm."""
    opts = ctx.options
    if opts.learned:
        from amppatch.patch import ApplyOptions, apply

        # A learned.json naming an AMX-buffer kernel needs the amx build's compile commands (only it compiles
        # amx/mmq.cpp; for the other files it adds the AMX flags, which no vec_dot/repack #if tests). Chosen by
        # what the files name, not by --only, so one set of learned files always bakes one branch.
        stock = ctx.stock["native"]
        if learned_amx_types(opts.learned):
            if "amx" not in ctx.stock:
                with contextlib.suppress(UsageError):  # a CPU without VNNI: apply then reports the AMX sites dead
                    ctx.stock["amx"] = locked_build(build_options_for(ctx.repo, "amx", name="bench amx stock"))
            stock = ctx.stock.get("amx", stock)
        res = apply(ApplyOptions(repo=ctx.repo, learned=opts.learned, build=False,
                                 compile_db=stock.dir / "compile_commands.json",
                                 out=Path(opts.work) / "patches", gate=False))
        if res.branch is None:
            raise UsageError("apply --learned produced no branch", next_step="check learned.json")
        names = ", ".join(f"{p.parent.name}/{p.name}" for p in opts.learned)
        return res.branch, f"amppatch tuned (tune's {names})", {"learned": [str(p) for p in opts.learned]}
    sites, machine = merged_sites(profiles(ctx))
    if not opts.search:
        path = write_profile(Path(opts.work) / "sites-profile.json", sites, machine, "profiles' own values")
        branch, _ = _apply(ctx, path, tunable=False)
        return branch, "amppatch (profile distances, no search)", {"sites": sites}
    chosen = quick_search(ctx, sites, machine)
    baked = []
    for s in sites:
        target = search_target(s["function"])
        pick = chosen["per_type"].get(target) if target else None
        if target is not None and pick is None:
            continue  # rolled back: no candidate beat the site switched off
        scale, hint = pick if pick else (1.0, s["hint"])
        baked.append({**s, "distance_bytes": _round_line(s["distance_bytes"] * scale), "hint": hint})
    if not baked:
        raise UsageError("the quick search rolled back every site", next_step="run amppatch tune")
    path = write_profile(Path(opts.work) / "baked-profile.json", baked, machine, "quick-search winners")
    branch = _reuse_branch(ctx, path) or _remember_branch(ctx, path, _apply(ctx, path, tunable=False)[0])
    return branch, "amppatch (profile sites + quick search)", {"search": chosen, "baked_sites": baked}


def _git_commit(repo: Path, ref: str) -> str | None:
    from amppatch.proc import run

    done = run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], check=False)
    return done.stdout.strip() or None if done.returncode == 0 else None


def _reuse_branch(ctx: Context, baked: Path) -> str | None:
    """The branch an earlier bench baked from the same sites, if it still exists unchanged: re-applying
    would give a new commit (and new builds) whenever apply's templates digest changes, although the
    patched tree is the same; the bench's arms must stay the builds it measured before."""
    memo = read_json(Path(ctx.options.work) / "baked-branch.json") or {}
    digest = hashlib.sha256(baked.read_bytes()).hexdigest()
    if memo.get("profile_sha256") != digest or not memo.get("branch"):
        return None
    if _git_commit(ctx.repo, memo["branch"]) != memo.get("commit"):
        return None
    progress(f"bench: reusing {memo['branch']} (baked from the same sites before)")
    return str(memo["branch"])


def _remember_branch(ctx: Context, baked: Path, branch: str) -> str:
    memo = {"profile_sha256": hashlib.sha256(baked.read_bytes()).hexdigest(), "branch": branch,
            "commit": _git_commit(ctx.repo, branch)}
    write_text_atomic(Path(ctx.options.work) / "baked-branch.json", json.dumps(memo, indent=2) + "\n")
    return branch


def _round_line(nbytes: float) -> int:
    return max(128, round(nbytes / 64.0) * 64)


def quick_search(ctx: Context, sites: list[dict[str, Any]], machine: dict[str, Any]) -> dict[str, Any]:
    """Race SEARCH_GRID (distance scale × hint, set per site through the tunable build's environment)
    against the sites switched off, per weight type at 1 thread on the native path (cached)."""
    opts = ctx.options
    cache = Path(opts.work) / "quick-search.json"
    key = hashlib.sha256(json.dumps([sites, SEARCH_GRID, opts.tokens], sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    cached = read_json(cache)
    if cached and cached.get("key") == key:
        return {**cached, "per_type": {k: tuple(v) if v else None for k, v in cached["per_type"].items()}}
    path = write_profile(Path(opts.work) / "sites-profile.json", sites, machine, "merged profile sites")
    branch, manifest = _apply(ctx, path, tunable=True)
    tunable = locked_build(build_options_for(ctx.repo, "native", ref=branch, name="bench amppatch tunable"))
    env_sites = list(manifest.sites)
    per_type: dict[str, tuple[float, int] | None] = {}
    races: dict[str, Any] = {}
    for target, wt, bench_args, _ in SEARCH_TARGETS:
        mine = [s for s in env_sites if search_target(s["function"]) == target]
        if not mine:
            per_type[target] = None
            continue
        arms = [("off", tunable.dir, bench_args, (("AMPPATCH_PREFETCH", "0"),))]
        for i, (scale, hint) in enumerate(SEARCH_GRID):
            env = []
            for s in mine:
                env.append((s["env"]["distance"], str(_round_line(s["distance_bytes"] * scale))))
                env.append((s["env"]["hint"], str(hint)))
            arms.append((f"c{i}", tunable.dir, bench_args, tuple(env)))
        report, _ = race(arms, ctx.models[wt], (1,), Path(opts.work) / "reports" / f"search-{target}", opts,
                      gate_model=None, max_time=None, rounds=SELECTION_ROUNDS)
        cands = {str(SEARCH_GRID[int(c.arm[1:])]): c.to_json() for c in report.comparisons}
        best, why = pick_best(cands)
        per_type[target] = SEARCH_GRID[[str(g) for g in SEARCH_GRID].index(best)] if best else None
        races[target] = {"candidates": {k: {"ratio": c["ratio"], "ci95": c["ci95"]} for k, c in cands.items()},
                         "chosen": per_type[target], "why": why, "sites": [s["key"] for s in mine]}
        progress(f"bench: quick search {target}: {per_type[target]} ({why})")
    result = {"key": key, "tunable_branch": branch, "grid": [list(g) for g in SEARCH_GRID],
              "per_type": {k: list(v) if v else None for k, v in per_type.items()}, "races": races,
              "how": f"tunable build, native, 1 thread, {SELECTION_ROUNDS} interleaved rounds per kernel against "
                     "its sites off; (scale of the profile's distance, hint) with the highest median ratio whose CI is "
                     "not wholly below 1, else that kernel's sites are rolled back"}
    write_text_atomic(cache, json.dumps(result, indent=2) + "\n")
    return {**result, "per_type": per_type}
