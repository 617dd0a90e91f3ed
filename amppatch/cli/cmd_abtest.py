"""`amppatch ab-test`: interleaved A/B of llama.cpp builds with a correctness gate, CIs and a report."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from amppatch.cli import add_flag_argument
from amppatch.errors import UsageError

if TYPE_CHECKING:
    from amppatch.abtest import AbTestOptions

NAME = "ab-test"
HELP = "race builds (or settings) in randomized interleaved blocks; verdict with a 95% CI, report.md/.json/.png"

ARM_SYNTAX = (
    "NAME=BUILD[::LLAMA-BENCH FLAGS][::VAR=VALUE]... — BUILD is a build dir or its manifest.json; "
    "a segment starting with '-' adds llama-bench flags for this arm (e.g. '::--repack 0'), "
    "a VAR=VALUE segment sets an environment variable for this arm"
)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from exc
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--a", metavar="BUILD", help="baseline arm 'A' (BUILD[::FLAGS][::VAR=VALUE])")
    parser.add_argument("--b", metavar="BUILD", help="candidate arm 'B' (same syntax)")
    parser.add_argument("--arm", action="append", default=[], metavar="SPEC", help=f"another arm: {ARM_SYNTAX}")
    parser.add_argument("-m", "--model", type=Path, required=True, help="GGUF model to time")
    parser.add_argument("--threads", type=_int_list, default=(1,), help="thread counts, e.g. 1,2 (default 1)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per repetition (default 64)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for --test pp (default 128)")
    parser.add_argument("--depth", type=int, default=0, help="KV-cache depth before timing (default 0)")
    parser.add_argument("--test", default="tg", help="tg, pp or tg,pp (default tg)")
    parser.add_argument("--reps", type=int, default=3, help="llama-bench repetitions per call (default 3)")
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument("--rounds", type=int, help="number of rounds (default 6)")
    stop.add_argument("--max-time", type=float, metavar="S",
                      help="stop rule: add rounds until every verdict is decisive or S seconds have passed")
    parser.add_argument("--min-rounds", type=int, default=2, metavar="N",
                        help="with --max-time: never stop for time before N rounds (default 2; 5 is the fewest "
                        "after which the stop rule calls a verdict)")
    parser.add_argument("--min-effect", type=float, default=0.05, help="smallest effect that matters (0.05 = 5%%)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the block order and the bootstrap")
    parser.add_argument("--cpu-mask", help="pin every arm with llama-bench -C MASK --cpu-strict 1 (hex)")
    parser.add_argument("-o", "--out", type=Path, help="report directory (default ./abtest-<time>)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite the earlier ab-test result that -o holds (default: refuse)")
    parser.add_argument("--resume", action="store_true",
                        help="go on from the rounds an interrupted ab-test recorded in -o (its rounds.json), "
                        "when the arms, model and settings are the same; else start afresh and say why")
    parser.add_argument("--skip-correctness", action="store_true", help="do not run the correctness gate")
    parser.add_argument("--gate", choices=("auto", "identical", "tolerance"), default="auto",
                        help="gate mode (auto: identical unless the arms run different kernels by design)")
    parser.add_argument("--gate-model", type=Path, help="model for the gate (default: --model)")
    add_flag_argument(parser, "--gate-args", default="", help="extra gate flags for both sides, e.g. '-ub 1'")
    parser.add_argument("--ppl-tolerance", type=float, default=0.01,
                        help="relative perplexity tolerance of the tolerance gate (default 0.01)")
    parser.add_argument("--latency", choices=("auto", "on", "off"), default="auto",
                        help="per-token latency through the tracer's token hooks (default: when available)")
    parser.add_argument("--no-llc", action="store_true", help="skip the perf stat LLC-miss pass")
    parser.add_argument("--no-roofline", action="store_true",
                        help="skip the roofline of the model's weight kernels after the timed rounds (a few "
                        "seconds per weight type and thread count)")
    parser.add_argument("--fail-on-regression", action="store_true",
                        help="exit with an error when any arm is measurably slower than the first")


def _split_flags(text: str, what: str) -> list[str]:
    """Shell words of a flags value; an unbalanced quote is one usage line, not a ValueError traceback."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise UsageError(f"{what} {text!r} is not valid shell words ({exc})",
                         next_step="close the quote, or escape it with a backslash") from None


def _check_arm_flags(spec: str, what: str) -> None:
    """The llama-bench flags segments of an arm split as the arm parser will split them."""
    for seg in spec.split("::")[1:]:
        if seg.strip().startswith("-"):
            _split_flags(seg.strip(), f"{what}: segment")


def options_from_args(args: argparse.Namespace) -> AbTestOptions:
    from amppatch.abtest import AbTestOptions, parse_arm

    for flag, specs in (("--a", [args.a] if args.a else []), ("--b", [args.b] if args.b else []),
                        ("--arm", args.arm)):
        for spec in specs:
            _check_arm_flags(spec, f"{flag} {spec!r}")
    arms = []
    if args.a:
        arms.append(parse_arm(args.a, name="A"))
    if args.b:
        arms.append(parse_arm(args.b, name="B"))
    arms.extend(parse_arm(spec) for spec in args.arm)
    if len(arms) < 2:
        raise UsageError("ab-test needs two arms", next_step="pass --a BUILD --b BUILD (or --arm NAME=BUILD twice)")
    tests = tuple(t.strip() for t in args.test.split(",") if t.strip())
    return AbTestOptions(
        arms=tuple(arms),
        model=args.model,
        threads=tuple(args.threads),
        tokens=args.tokens,
        prompt_tokens=args.prompt_tokens,
        depth=args.depth,
        tests=tests,
        reps=args.reps,
        rounds=args.rounds,
        max_time=args.max_time,
        min_rounds=args.min_rounds,
        min_effect=args.min_effect,
        seed=args.seed,
        cpu_mask=args.cpu_mask,
        out=args.out,
        skip_correctness=args.skip_correctness,
        gate_mode=args.gate,
        gate_model=args.gate_model,
        gate_args=tuple(_split_flags(args.gate_args, "--gate-args")),
        ppl_tolerance=args.ppl_tolerance,
        latency=args.latency,
        llc=not args.no_llc,
        roofline=not args.no_roofline,
        fail_on_regression=args.fail_on_regression,
        resume=args.resume,
    )


def run(args: argparse.Namespace) -> Path:
    from amppatch.abtest import run_abtest
    from amppatch.abtest.checkpoint import CHECKPOINT_FILE
    from amppatch.inputs import check_out_dir
    from amppatch.report import REPORT_JSON, REPORT_MD, require_measured

    if args.resume and args.out is None:
        raise UsageError("--resume needs -o: the directory of the interrupted ab-test",
                         next_step="rerun with -o DIR, DIR holding the interrupted run's rounds.json")
    if args.out is not None:
        # An earlier result is evidence: overwriting it takes --force — except the partial report of the race
        # that --resume goes on with (its checkpoint is still there).
        resuming = args.resume and (Path(args.out) / CHECKPOINT_FILE).exists()
        args.out = check_out_dir(args.out, result_file=REPORT_JSON, force=args.force or resuming,
                                 command="ab-test")
    else:
        check_out_dir(Path.cwd())  # where ./abtest-<time> goes
    result = run_abtest(options_from_args(args))
    assert result.path is not None
    out = result.path
    print((out / REPORT_MD).read_text(encoding="utf-8"), end="")
    require_measured(result, out)  # the report stands; the exit status says an arm is missing
    return out
