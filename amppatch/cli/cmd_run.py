"""`amppatch run`: fetch → build → model → profile → apply → tune → bake → final race → report (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path

from amppatch.cli.cmd_build import add_build_arguments, build_options_from_args
from amppatch.cli.cmd_tune import parse_int_list
from amppatch.model import SHAPES
from amppatch.run import RunOptions
from amppatch.run import run as run_pipeline
from amppatch.tune.shares import DEFAULT_MIN_SHARE

NAME = "run"
HELP = ("the whole job: fetch, build, model (synthetic or --model), profile, apply, tune (budgeted), bake the levers "
        "(prefetch, huge pages, both), race them against stock, report what ships; rerun with the same -o to resume")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, help="your llama.cpp tree (default: the pinned one, fetched)")
    parser.add_argument("-o", "--out", type=Path, metavar="DIR",
                        help="run directory with run-state.json and every stage's output (default ./amppatch-run); "
                             "rerun with the same DIR to resume")
    parser.add_argument("--model", type=Path, metavar="PATH",
                        help="your GGUF model instead of a synthetic one (excludes --shape and --type)")
    parser.add_argument("--shape", help=f"synthetic model shape, as `model synth`: {', '.join(SHAPES)} (default 1b)")
    parser.add_argument("--type", help="weight type, a llama-quantize preset as `model synth` takes it, e.g. q8_0, "
                                        "q4_0, Q4_K_M, f16 (default q8_0)")
    parser.add_argument("--threads", metavar="LIST",
                        help="thread counts, the first is tuned, the others verified (default 1,<CPU count>)")
    parser.add_argument("--budget", type=float, default=20.0, metavar="MINUTES", help="tune budget (default 20)")
    parser.add_argument("--min-share", type=float, default=DEFAULT_MIN_SHARE, metavar="FRACTION",
                        help="tune no site whose kernel has a smaller share of the profile's samples "
                             f"(default {DEFAULT_MIN_SHARE})")
    parser.add_argument("--final-minutes", type=float, default=10.0,
                        help="time limit of the final ab-test (default 10; it stops earlier when decisive)")
    parser.add_argument("--profile-tokens", type=int, default=32, help="tokens the profile generates (default 32)")
    parser.add_argument("--long-depth", type=int, metavar="N",
                        help="final race: tg at this context depth at the first thread count (default 1024, "
                             "--quick 128; 0 leaves it out)")
    parser.add_argument("--prompt-tokens", type=int, metavar="N",
                        help="final race: prompt processing of N tokens at the first thread count (default 256, "
                             "--quick 64; 0 leaves it out)")
    parser.add_argument("--repack", type=int, choices=(0, 1),
                        help="llama-bench --repack for profile, tune and final ab-test (default: llama-bench's)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny model, 1 thread, 1-minute tune, 3-round final race")
    parser.add_argument("--lock", type=Path, metavar="FILE",
                        help="hold this flock file while timing (default $AMPPATCH_MEASURE_LOCK)")
    parser.add_argument("--seed", type=int, default=0, help="model and schedule seed (default 0)")
    add_build_arguments(parser)


def run(args: argparse.Namespace) -> Path:
    from amppatch.errors import UsageError
    from amppatch.inputs import check_out_dir, check_out_file

    if args.model is not None and (args.shape is not None or args.type is not None):
        raise UsageError("--model runs your model: it excludes --shape and --type (which pick a synthetic one)",
                         next_step="drop --shape/--type, or drop --model to run the synthetic default")

    # Resuming into an earlier run's directory is what -o is for; only an unusable path is refused.
    args.out = check_out_dir(args.out or Path.cwd() / "amppatch-run")
    if args.lock is not None:  # else a lock under /proc or on a directory fails at the first timed probe
        args.lock = check_out_file(args.lock, flag="--lock", example="measure.lock")
    build_options = None
    if args.cflags or args.kernel_cflags or args.define or args.pgo or args.allow_faulting_isa or args.amx_batch1:
        # repo is filled in by the fetch stage; a placeholder keeps BuildOptions' type
        build_options = build_options_from_args(argparse.Namespace(**{**vars(args), "repo": args.repo or Path(".")}))
    return run_pipeline(RunOptions(
        repo=args.repo,
        out=args.out,
        shape=args.shape or "1b",
        type=args.type or "q8_0",
        model=args.model,
        threads=parse_int_list(args.threads, "--threads") if args.threads else None,
        budget_minutes=args.budget,
        final_minutes=args.final_minutes,
        profile_tokens=args.profile_tokens,
        long_depth=args.long_depth,
        prompt_tokens=args.prompt_tokens,
        repack=args.repack,
        build_options=build_options,
        quick=args.quick,
        lock=args.lock,
        seed=args.seed,
        min_share=args.min_share,
    ))
