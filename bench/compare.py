"""bench: amppatch side by side with what a performance engineer would try instead.

    python -m bench.compare [--only q8_0:native:1,...] [--quick] [--budget 80] [--learned learned.json]
    python bench/compare.py ...        (the same; run from the repository root)

One interleaved ab-test run per (weight type, code path) on the 1.1B synthetic model, both thread counts as
settings of that run, every arm raced against `stock` of the same code path:

* configurations: weight type q8_0 / q4_0 / f16 × code path × 1 and 2 threads; code paths are `native`
  (the default GGML_NATIVE=ON build), `noamx` (GGML_NATIVE=OFF with explicit AVX2/AVX512-F/VNNI/BF16/VBMI,
  F16C, FMA, BMI2 and AMX off: what a Zen 4 gets) and `noamx-repack0` (the same build with `--repack 0`,
  Q4_0 only) and `amx` (native + ``--amx-batch1``: the AMX buffer's batch-1 kernels, what an AMX CPU
  generates tokens with). Ids are ``TYPE:PATH:THREADS``, e.g. ``q8_0:noamx:1``.
* arms: `stock`; `gcc-prefetch` (stock + ``-fprefetch-loop-arrays`` with the `--param`s that won a small
  measured grid, see `select_gcc_params`); `pgo`; `hugepages` (glibc's malloc THP tunable with non-mmap
  loading, where THP is not `never`); `pages` (stock + amppatch's file-backed huge-page lever, mmap as
  usual, where THP is not `never`; its share of the model on huge pages is measured after the run);
  `amppatch` (baked prefetches, from tune's learned.json when given, else from the profiles' sites with a
  distance/hint picked by a quick measured search — the label says which); `amppatch-pgo`;
  `amppatch-hugepages` (the amppatch build with the hugepages arm's runtime); `amppatch-pages` (the amppatch
  branch + the lever).
* roofline: per configuration the kernel's in-cache rate (`amppatch roofline` on the path's stock build),
  measured once and cached; every row's GB/s as % of the lower of that and its pages' stream ceiling, and
  which side binds; bench/roofline.png draws them.

Budget: the timed runs share `--budget` minutes; each run gets ab-test's `max_time` stop rule with a share of
what is left (weighted by its expected cost), so runs that turn decisive early leave their time to later,
noisier ones. Every timing run and every uncached build holds an exclusive flock on
/tmp/amppatch-measure.lock (other measurements may share the same cores). Results: `bench/results.json` (rows with
`config`, `arm`, `median_tok_s`, `ratio`, `ci95`, `ceiling_pct`, ...; `--only` replaces just its rows) and
the section "bench: side by side" of docs/RESULTS.md (regenerated between markers). Progress on stderr; the
last stdout line is the results.json path.

The code: bench/configs.py (configurations and runs), bench/arms.py (the arm registry), bench/options.py,
bench/measure.py (lock, machine, one race), bench/builds.py and bench/prepare.py (builds per arm),
bench/selection.py (GCC's grid, amppatch's sites), bench/levers.py (the huge-page lever's branches and
shares), bench/roofline.py (the rooflines), bench/runs.py (the budgeted runs), bench/rows.py, bench/render.py
and bench/plot.py (results rows, the RESULTS.md table, roofline.png, --render-only). This module is the
command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python bench/compare.py`: import the repository's amppatch and bench
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amppatch.cli import FlagParser, add_flag_argument
from amppatch.errors import AmppatchError

# Every name the bench had when it was one module stays reachable as `compare.NAME` (tests, scripts).
from bench.arms import (
    AMPPATCH_ARMS,
    ARM_REGISTRY,
    ARMS,
    HUGEPAGE_ARMS,
    NO_AMX_TUNE,
    PAGE_LEVER_ARMS,
    ArmDef,
    arm_def,
    arms_for,
    hugepages_arm,
    pages_arm,
)
from bench.builds import NOAMX_DEFINES, Context, arm_build, arm_build_of, build_options_for, is_cached, locked_build
from bench.configs import (
    CODE_PATHS,
    MODEL_SHAPE,
    THREADS,
    WEIGHT_TYPES,
    CodePath,
    Config,
    RunGroup,
    all_configs,
    group_runs,
    parse_only,
    priority,
    quick_configs,
)
from bench.levers import lever_branch, measure_page_shares
from bench.measure import MEASURE_LOCK, has_amx, hugepages_status, measure_lock, race, thp_mode, thp_status
from bench.options import DEFAULT_RESULTS, DEFAULT_RESULTS_MD, REPO_ROOT, BenchOptions, resolve_options
from bench.plot import render_roofline_plot, roofline_bars
from bench.prepare import PREPARATIONS, Plan, prepare
from bench.render import (
    BEGIN_MARK,
    END_MARK,
    PLOT_NAME,
    SECTION_TITLE,
    render_markdown,
    render_only,
    update_results_md,
    write_results,
)
from bench.roofline import ROW_WIDTH, add_roofline, measure_rooflines, roofline_options
from bench.rows import (
    add_page_ceiling,
    add_page_shares,
    amppatch_vs_best_other,
    huge_page_ceiling,
    machine_ceilings,
    merge_rows,
    missing_rows,
    rows_from_report,
    small_page_ceiling,
)
from bench.runs import SCHEMA_VERSION, page_shares, run_bench, run_weights, time_share
from bench.selection import (
    GCC_GRID,
    GCC_GRID_BORROW,
    GCC_GRID_TYPES,
    PROFILE_RUNS,
    SEARCH_GRID,
    SEARCH_TARGETS,
    SELECTION_ROUNDS,
    amppatch_branch,
    gcc_flags,
    learned_amx_types,
    merged_sites,
    pick_best,
    profiles,
    quick_search,
    search_target,
    select_gcc_params,
    write_profile,
)

__all__ = [
    "AMPPATCH_ARMS", "ARMS", "ARM_REGISTRY", "BEGIN_MARK", "CODE_PATHS", "DEFAULT_RESULTS", "DEFAULT_RESULTS_MD",
    "END_MARK", "GCC_GRID", "GCC_GRID_BORROW", "GCC_GRID_TYPES", "HUGEPAGE_ARMS", "MEASURE_LOCK", "MODEL_SHAPE",
    "NOAMX_DEFINES", "NO_AMX_TUNE", "PAGE_LEVER_ARMS", "PLOT_NAME", "PREPARATIONS", "PROFILE_RUNS", "REPO_ROOT",
    "ROW_WIDTH", "SCHEMA_VERSION", "SEARCH_GRID", "SEARCH_TARGETS", "SECTION_TITLE", "SELECTION_ROUNDS", "THREADS",
    "WEIGHT_TYPES", "ArmDef", "BenchOptions", "CodePath", "Config", "Context", "Plan", "RunGroup",
    "add_page_ceiling", "add_page_shares", "add_roofline", "all_configs", "amppatch_branch",
    "amppatch_vs_best_other", "arm_build", "arm_build_of", "arm_def", "arms_for", "build_options_for",
    "gcc_flags", "group_runs", "has_amx", "huge_page_ceiling", "hugepages_arm", "hugepages_status", "is_cached",
    "learned_amx_types", "lever_branch", "locked_build", "machine_ceilings", "main", "measure_lock",
    "measure_page_shares", "measure_rooflines", "merge_rows", "merged_sites", "missing_rows", "page_shares",
    "pages_arm", "parse_args", "parse_only", "pick_best", "prepare", "priority", "profiles", "quick_configs",
    "quick_search", "race", "render_markdown", "render_only", "render_roofline_plot", "resolve_options",
    "roofline_bars", "roofline_options", "rows_from_report", "run_bench", "run_weights", "search_target",
    "select_gcc_params", "small_page_ceiling", "thp_mode", "thp_status", "time_share", "update_results_md",
    "write_profile", "write_results",
]


def parse_args(argv: Sequence[str]) -> BenchOptions:
    p = FlagParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, help="llama.cpp git tree (default: the pinned tree, fetched)")
    p.add_argument("--only", action="append", default=[],
                   help="configurations TYPE:PATH:THREADS (globs allowed, comma-separated; repeatable)")
    p.add_argument("--quick", action="store_true", help="one configuration per code path, 2 rounds (smoke test)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"arms to race (stock always); default {','.join(ARMS)}")
    p.add_argument("--budget", type=float, default=80.0,
                   help="minutes the timed runs (gates included) may take in all (default 80)")
    p.add_argument("--tokens", type=int, default=32, help="generated tokens per llama-bench repetition")
    p.add_argument("--reps", type=int, default=2, help="llama-bench repetitions per interleaved slot")
    p.add_argument("--rounds", type=int, help="fixed rounds per run instead of the budgeted stop rule")
    p.add_argument("--min-effect", type=float, default=0.03, help="effect size that matters (default 0.03)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learned", type=Path, action="append", default=[],
                   help="tune's learned.json for the amppatch arm (apply --learned); repeatable: one per kernel")
    add_flag_argument(p, "--gcc-params", help="skip the gcc grid and use these --params for -fprefetch-loop-arrays")
    p.add_argument("--no-search", action="store_true",
                   help="without --learned: bake the profiles' distances as they are (no quick search)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results.json to write/merge")
    p.add_argument("--results-md", type=Path, default=DEFAULT_RESULTS_MD,
                   help="Markdown file whose 'bench: side by side' section is regenerated")
    p.add_argument("--no-results-md", action="store_true", help="do not touch any Markdown file")
    p.add_argument("--work", type=Path, help="work dir for profiles, decisions, reports (default: cache/bench)")
    p.add_argument("--render-only", action="store_true",
                   help="only regenerate the Markdown section from --results (after a change to the table); "
                        "times nothing (the machine probe runs once if this CPU has none cached)")
    a = p.parse_args(list(argv))
    return BenchOptions(
        repo=a.repo, only=tuple(x for s in a.only for x in s.split(",") if x.strip()), quick=a.quick,
        arms=tuple(x.strip() for x in a.arms.split(",") if x.strip()), budget_minutes=a.budget,
        tokens=a.tokens, reps=a.reps, rounds=a.rounds, min_effect=a.min_effect, seed=a.seed,
        learned=tuple(a.learned), gcc_params=a.gcc_params, search=not a.no_search, results=a.results,
        results_md=None if a.no_results_md else a.results_md, work=a.work, render_only=a.render_only,
        command="python -m bench.compare " + " ".join(argv),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        options = parse_args(args)
        print(render_only(options) if options.render_only else run_bench(options))
    except AmppatchError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.next_step:
            print(f"next: {exc.next_step}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
