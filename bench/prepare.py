"""Preparing the arms' builds: the stock build of every code-path family and the models first, then one
step per arm (or pair of arms that share a build input) from the PREPARATIONS table.

A step that fails records why its arm is unavailable and the bench goes on without it; only the stock
builds are essential (every arm is raced against stock of its path)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from amppatch.errors import AmppatchError, UsageError
from amppatch.proc import progress
from bench.arms import AMPPATCH_ARMS, ARM_REGISTRY, ARMS, NO_AMX_TUNE
from bench.builds import Context, build_options_for, locked_build
from bench.configs import MODEL_SHAPE, WEIGHT_TYPES
from bench.levers import lever_branch
from bench.measure import THP_ENABLED, hugepages_status, thp_mode, thp_status
from bench.options import BenchOptions
from bench.selection import amppatch_branch, gcc_flags, learned_amx_types, select_gcc_params


@dataclass(frozen=True)
class Plan:
    """What every preparation step needs besides the Context."""

    repo: Path
    families: set[str]  # code-path families whose stock build exists
    arms: set[str]  # the arms asked for
    pgo_models: tuple[Path, ...]  # PGO's training models
    thp_enabled: Path = THP_ENABLED  # the kernel's THP mode file (the huge-page arms need a mode other than never)


@contextlib.contextmanager
def _attempt(ctx: Context, arm: str) -> Iterator[None]:
    """Run a step; its failure makes `arm` unavailable (with the tool's last output lines) instead of
    ending the bench."""
    try:
        yield
    except AmppatchError as exc:
        tail = (getattr(exc, "output_tail", None) or "").strip().splitlines()[-3:]
        ctx.unavailable[arm] = exc.message + (f" ({' | '.join(tail)})" if tail else "")
        progress(f"bench: arm {arm} unavailable: {ctx.unavailable[arm]}")


def _hugepages(ctx: Context, plan: Plan) -> None:
    """The stock builds as they are: the arm only changes the runtime, where THP and glibc allow it."""
    reason = hugepages_status(plan.thp_enabled)
    if reason:
        ctx.unavailable["hugepages"] = reason
        return
    ctx.labels["hugepages"] = ARM_REGISTRY["hugepages"].label + f" (THP mode {thp_mode()})"
    for fam in plan.families:
        ctx.builds[(fam, "hugepages")] = ctx.stock[fam]


def _pgo(ctx: Context, plan: Plan) -> None:
    with _attempt(ctx, "pgo"):
        for fam in sorted(plan.families):
            ctx.builds[(fam, "pgo")] = locked_build(build_options_for(plan.repo, fam, pgo_models=plan.pgo_models,
                                                                      name=f"bench {fam} pgo"))
        ctx.labels["pgo"] = ("stock + GCC PGO (-fprofile-use, partial training) trained by llama-bench tg32 on "
                             + ", ".join(m.name for m in plan.pgo_models))


def _gcc_prefetch(ctx: Context, plan: Plan) -> None:
    """One build per family and chosen --params set; each weight type runs its own grid winner."""
    with _attempt(ctx, "gcc-prefetch"):
        grid = select_gcc_params(ctx)
        ctx.evidence["gcc"] = grid
        chosen = sorted(set(grid["per_type"].values()))
        for fam in sorted(plan.families):
            for params in chosen:
                ctx.builds[(fam, f"gcc-prefetch|{params}")] = locked_build(build_options_for(
                    plan.repo, fam, kernel_cflags=gcc_flags(params), name=f"bench {fam} gcc {params}"))
        ctx.type_variants["gcc-prefetch"] = grid["per_type"]
        ctx.labels["gcc-prefetch"] = ("stock + -fprefetch-loop-arrays (ggml-cpu only) with the grid winner per "
                                      "weight type: " + "; ".join(f"{t}: {p}" for t, p in grid["per_type"].items()))


def _amppatch(ctx: Context, plan: Plan) -> None:
    """One baked branch for both amppatch builds (plain and PGO); a failure of either drops both."""
    if all((fam, "amppatch") in ctx.family_unavailable for fam in plan.families):
        return  # no family may run amppatch's arms (the amx path without a tuned AMX kernel)
    with _attempt(ctx, "amppatch"):
        branch, label, evidence = amppatch_branch(ctx)
        ctx.evidence["amppatch"] = {"branch": branch, **evidence}
        for fam in sorted(plan.families):
            if (fam, "amppatch") in ctx.family_unavailable:
                continue
            if "amppatch" in plan.arms:
                ctx.builds[(fam, "amppatch")] = locked_build(build_options_for(
                    plan.repo, fam, ref=branch, name=f"bench {fam} amppatch"))
            if "amppatch-pgo" in plan.arms:
                ctx.builds[(fam, "amppatch-pgo")] = locked_build(build_options_for(
                    plan.repo, fam, ref=branch, pgo_models=plan.pgo_models, name=f"bench {fam} amppatch pgo"))
        ctx.labels["amppatch"] = f"{label}, branch {branch}"
        if "amppatch-pgo" in plan.arms:
            ctx.labels["amppatch-pgo"] = f"{label} + PGO as in `pgo`"
        if "amppatch-hugepages" in plan.arms:
            ctx.labels["amppatch-hugepages"] = ("the `amppatch` build with the `hugepages` arm's runtime "
                                                "(-lm none, glibc.malloc.hugetlb=1)")
    if "amppatch" in ctx.unavailable:
        ctx.unavailable["amppatch-pgo"] = ctx.unavailable["amppatch"]


def _amppatch_hugepages(ctx: Context, plan: Plan) -> None:
    """No build of its own: the amppatch arm's, so it needs that arm and the hugepages arm's runtime."""
    why = hugepages_status(plan.thp_enabled) or ctx.unavailable.get("amppatch") or (
        None if "amppatch" in plan.arms else "needs the amppatch arm's build (add amppatch to --arms)")
    if why:
        ctx.unavailable["amppatch-hugepages"] = why
        return
    for fam in sorted(plan.families):
        if (fam, "amppatch") in ctx.builds:
            ctx.builds[(fam, "amppatch-hugepages")] = ctx.builds[(fam, "amppatch")]


def _pages(ctx: Context, plan: Plan) -> None:
    """The huge-page lever on stock's commit (`pages`) and on the amppatch arm's branch (`amppatch-pages`),
    each built like its base; both need transparent huge pages (where THP is `never` the lever maps like
    stock, so the arm would be stock under another name)."""
    wanted = [a for a in ("pages", "amppatch-pages") if a in plan.arms]
    reason = thp_status(plan.thp_enabled)
    if reason:
        ctx.unavailable.update(dict.fromkeys(wanted, reason))
        return
    if "pages" in wanted:
        with _attempt(ctx, "pages"):
            branch = lever_branch(plan.repo)
            for fam in sorted(plan.families):
                ctx.builds[(fam, "pages")] = locked_build(build_options_for(plan.repo, fam, ref=branch,
                                                                            name=f"bench {fam} pages"))
            ctx.labels["pages"] = ARM_REGISTRY["pages"].label + f", branch {branch} (THP mode {thp_mode()})"
    if "amppatch-pages" not in wanted:
        return
    base = (ctx.evidence.get("amppatch") or {}).get("branch")
    if base is None:
        ctx.unavailable["amppatch-pages"] = ctx.unavailable.get("amppatch") or "the amppatch arm's branch was not made"
        return
    with _attempt(ctx, "amppatch-pages"):
        branch = lever_branch(plan.repo, base)
        for fam in sorted(plan.families):
            if (fam, "amppatch-pages") in ctx.family_unavailable:
                continue
            ctx.builds[(fam, "amppatch-pages")] = locked_build(build_options_for(
                plan.repo, fam, ref=branch, name=f"bench {fam} amppatch pages"))
        ctx.labels["amppatch-pages"] = (f"the `amppatch` arm's branch + the huge-page lever, branch {branch} "
                                        f"(THP mode {thp_mode()})")


@dataclass(frozen=True)
class Preparation:
    """A step that builds some arms: it runs when any of `arms`, or of the arms that build on its output
    (`feeds`), is asked for."""

    arms: tuple[str, ...]
    step: Callable[[Context, Plan], None]
    feeds: tuple[str, ...] = ()


# In this order: a later step may reuse an earlier one's builds (amppatch-hugepages runs amppatch's build,
# amppatch-pages builds on its branch), and the order is the order of the results' labels and unavailable arms.
PREPARATIONS: tuple[Preparation, ...] = (
    Preparation(("hugepages",), _hugepages),
    Preparation(("pgo",), _pgo),
    Preparation(("gcc-prefetch",), _gcc_prefetch),
    Preparation(("amppatch", "amppatch-pgo"), _amppatch, feeds=("amppatch-pages",)),
    Preparation(("amppatch-hugepages",), _amppatch_hugepages),
    Preparation(("pages", "amppatch-pages"), _pages),
)


def _stock_builds(ctx: Context, families: set[str]) -> set[str]:
    """Every family's stock build; returns the families that have one (amx is refused by a CPU that cannot
    execute its kernels)."""
    progress("bench: stock builds ...")
    ctx.stock["native"] = locked_build(build_options_for(ctx.repo, "native", name="bench native stock"))
    if "noamx" in families:
        ctx.stock["noamx"] = locked_build(build_options_for(ctx.repo, "noamx", name="bench noamx stock"))
    if "amx" in families:
        try:  # refused on a CPU that cannot execute the kernels (no AVX512-VNNI): the path's rows say why
            ctx.stock["amx"] = locked_build(build_options_for(ctx.repo, "amx", name="bench amx stock"))
        except UsageError as exc:  # a compile failure is not a property of the CPU: it propagates
            progress(f"bench: code path amx unavailable: {exc.message}")
            families = families - {"amx"}
            for arm in ARMS:
                ctx.family_unavailable[("amx", arm)] = f"code path amx: {exc.message}"
    return families


def prepare(options: BenchOptions, families: set[str]) -> Context:
    from amppatch.model import SynthOptions, synth_model
    from amppatch.workspace import FetchOptions, check_llama_tree, fetch_llama

    repo = check_llama_tree(options.repo) if options.repo else fetch_llama(FetchOptions())
    ctx = Context(options, repo)
    families = _stock_builds(ctx, families)
    for wt in WEIGHT_TYPES:
        ctx.models[wt] = synth_model(SynthOptions(shape=MODEL_SHAPE, type=wt, build=ctx.stock["native"]))
        ctx.gate_models[wt] = synth_model(SynthOptions(shape="tiny", type=wt, build=ctx.stock["native"]))
    for fam in families:
        ctx.builds[(fam, "stock")] = ctx.stock[fam]
    ctx.labels["stock"] = "the build as is"
    ctx.amx_types = learned_amx_types(options.learned)
    if "amx" in families and not ctx.amx_types:
        # The quick search profiles and races the native build, where the AMX buffer's kernels never run; an
        # amppatch arm without them would time the stock AMX kernels under amppatch's name.
        for arm in AMPPATCH_ARMS:
            ctx.family_unavailable[("amx", arm)] = NO_AMX_TUNE
    # PGO trains on the workload it is judged on: one run per 1.1B model, so each type's kernel sees its real
    # trip counts (the tiny model's 8-block dot products were the first suspect for PGO's Q8_0 slowdown; the
    # 1.1B training did not remove it, see RESULTS).
    plan = Plan(repo, families, set(options.arms), tuple(ctx.models[wt] for wt in WEIGHT_TYPES))
    for prep in PREPARATIONS:
        if plan.arms.intersection(prep.arms + prep.feeds):
            prep.step(ctx, plan)
    return ctx
