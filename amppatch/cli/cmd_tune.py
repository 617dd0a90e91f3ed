"""`amppatch tune`: search each site's prefetch distance and hint on the tunable build, roll back losers."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from amppatch.cli import add_flag_argument
from amppatch.cli.cmd_build import add_build_arguments, build_options_from_args, load_like
from amppatch.errors import UsageError
from amppatch.tune import DEFAULT_GRID_MAX, DEFAULT_GRID_MIN, DEFAULT_MIN_SHARE, TuneOptions, tune

NAME = "tune"
HELP = ("search prefetch distance and hint per site (interleaved mini A/Bs against 'off' on the tunable build), "
        "drop sites that do not help, write learned.json for `apply --learned`")


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise UsageError(f"{what} {text!r} is not a comma-separated list of integers",
                         next_step=f"e.g. {what} 1,2") from exc
    if not values:
        raise UsageError(f"{what} is empty", next_step=f"e.g. {what} 1,2")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, required=True, help="llama.cpp source tree (a clean git repository)")
    parser.add_argument("--model", "-m", type=Path, required=True, help="GGUF model to time (e.g. the 1.1B one)")
    sites = parser.add_argument_group("sites (--site or --tunable-manifest, else the profile's)")
    sites.add_argument("--profile", type=Path,
                       help="profile.json from `amppatch profile`: its sites and start values, and the kernel "
                            "shares that split the budget (with --site or --tunable-manifest: the shares only)")
    sites.add_argument("--site", action="append", default=[], metavar="SPEC",
                       help="FUNCTION[:LOOP[:STREAM]] as for apply, repeatable (manual start: apply's defaults)")
    sites.add_argument("--tunable-manifest", type=Path, metavar="JSON",
                       help="reuse the manifest of an earlier `apply --tunable` (with builds) instead of applying")
    parser.add_argument("--threads", "-t", type=int, default=1, help="thread count the search runs at (default 1)")
    parser.add_argument("--verify-threads", metavar="LIST",
                        help="other thread counts the winner is verified at (default: the CPU count)")
    parser.add_argument("--budget", type=float, default=20.0, metavar="MINUTES",
                        help="working time for the search (default 20; lock waits do not count)")
    parser.add_argument("--min-share", type=float, default=DEFAULT_MIN_SHARE, metavar="FRACTION",
                        help="tune no site whose kernel has a smaller share of the profile's samples (default "
                             f"{DEFAULT_MIN_SHARE}; only with --profile, which knows the shares; 0 tunes every site)")
    parser.add_argument("-o", "--out", type=Path, metavar="DIR",
                        help="output dir: learned.json, probes/, tunable/ (default ./amppatch-tune)")
    parser.add_argument("--like", type=Path, metavar="BUILD",
                        help="build the tunable variant with the options of this existing build")
    add_flag_argument(parser, "--bench-arg", action="append", metavar="ARG",
                      help="llama-bench flag for every probe, repeatable (default: the profile's --repack)")
    search = parser.add_argument_group("search")
    search.add_argument("--grid-min", type=int, default=DEFAULT_GRID_MIN, metavar="BYTES",
                        help=f"smallest power-of-two distance of the coarse grid (default {DEFAULT_GRID_MIN})")
    search.add_argument("--grid-max", type=int, default=DEFAULT_GRID_MAX, metavar="BYTES",
                        help=f"largest power-of-two distance of the coarse grid (default {DEFAULT_GRID_MAX})")
    search.add_argument("--hints", default="3,0", metavar="LIST",
                        help="locality hints of the coarse search (default 3,0; 1 and 2 follow when promising)")
    search.add_argument("--refine-levels", type=int, default=3, help="bisection steps on the line grid (default 3)")
    search.add_argument("--max-batch", type=int, default=4, help="candidates per interleaved probe (default 4)")
    search.add_argument("--probe-tokens", type=int, default=32, help="tokens per llama-bench repetition (32)")
    search.add_argument("--probe-reps", type=int, default=2, help="llama-bench repetitions per call (2)")
    search.add_argument("--probe-rounds", type=int, default=4, help="interleaved rounds per search probe (4)")
    search.add_argument("--confirm-rounds", type=int, default=8,
                        help="rounds of the winner's confirmation and verification probes (8)")
    search.add_argument("--probe-seconds", type=float, default=240.0,
                        help="time cap per probe: rounds are cut to fit (default 240)")
    search.add_argument("--min-gain", type=float, default=0.0,
                        help="keep a site only if its CI lower bound exceeds 1 + this (default 0)")
    search.add_argument("--loss-tolerance", type=float, default=0.01,
                        help="a setting loses at a thread count below 1 - this ratio (default 0.01)")
    parser.add_argument("--lock", type=Path, metavar="FILE",
                        help="hold this flock file while timing each probe (default $AMPPATCH_MEASURE_LOCK)")
    parser.add_argument("--no-gate", action="store_true", help="skip apply's correctness gate of the tunable build")
    parser.add_argument("--gate-model", type=Path, metavar="GGUF", help="model for apply's gate")
    parser.add_argument("--seed", type=int, default=0, help="schedule seed (default 0)")
    parser.add_argument("--resume", action="store_true",
                        help="replay the probe batches an interrupted tune in the same -o measured (their time "
                             "counts against --budget) and measure from the first one not recorded")
    add_build_arguments(parser)


def check_numbers(args: argparse.Namespace) -> None:
    """The search numbers tune's own checks let through (nan compares false with everything), refused before
    the tunable build and the output directory exist."""
    for flag, value in (("--budget", args.budget), ("--probe-seconds", args.probe_seconds)):
        if not 0 < value < math.inf:
            raise UsageError(f"{flag} must be a positive number, not {value}", next_step=f"e.g. {flag} 20")
    if args.refine_levels < 0:
        raise UsageError(f"--refine-levels must be 0 or more, not {args.refine_levels}",
                         next_step="e.g. --refine-levels 3")
    if not 0 <= args.min_gain < math.inf:
        raise UsageError(f"--min-gain must be 0 or a positive fraction, not {args.min_gain}",
                         next_step="e.g. --min-gain 0.02 (keep a site only when its CI clears 1.02)")
    if not 0 <= args.loss_tolerance < 1:
        raise UsageError(f"--loss-tolerance must be a fraction in [0, 1), not {args.loss_tolerance}",
                         next_step="e.g. --loss-tolerance 0.01")
    if not 0 <= args.min_share < 1:
        raise UsageError(f"--min-share must be a fraction in [0, 1), not {args.min_share}",
                         next_step=f"e.g. --min-share {DEFAULT_MIN_SHARE} (0 tunes every site)")


def run(args: argparse.Namespace) -> Path:
    from amppatch.build import with_options
    from amppatch.inputs import check_out_dir, check_out_file

    check_numbers(args)
    args.out = check_out_dir(args.out or Path.cwd() / "amppatch-tune")
    if args.lock is not None:  # else a lock under /proc or on a directory fails at the first timed probe
        args.lock = check_out_file(args.lock, flag="--lock", example="measure.lock")

    if args.like is not None and (args.cflags or args.kernel_cflags or args.define or args.pgo or args.amx_batch1):
        raise UsageError("--like copies an existing build's options; it cannot be combined with build flags",
                         next_step="drop --like or the --cflags/--define/--pgo options")
    build_options = (with_options(load_like(args.like), repo=args.repo) if args.like is not None
                     else build_options_from_args(args))
    options = TuneOptions(
        repo=args.repo,
        model=args.model,
        profile=args.profile,
        sites=tuple(args.site),
        tunable_manifest=args.tunable_manifest,
        threads=args.threads,
        verify_threads=parse_int_list(args.verify_threads, "--verify-threads") if args.verify_threads else None,
        budget_minutes=args.budget,
        out=args.out,
        build_options=build_options,
        like=load_like(args.like).dir if args.like is not None else None,
        bench_args=tuple(args.bench_arg) if args.bench_arg else None,
        grid_min=args.grid_min,
        grid_max=args.grid_max,
        hints=parse_int_list(args.hints, "--hints"),
        refine_levels=args.refine_levels,
        max_batch=args.max_batch,
        probe_tokens=args.probe_tokens,
        probe_reps=args.probe_reps,
        probe_rounds=args.probe_rounds,
        confirm_rounds=args.confirm_rounds,
        probe_seconds=args.probe_seconds,
        min_gain=args.min_gain,
        loss_tolerance=args.loss_tolerance,
        min_share=args.min_share,
        lock=args.lock,
        gate=not args.no_gate,
        gate_model=args.gate_model,
        seed=args.seed,
        resume=args.resume,
    )
    return tune(options).path
