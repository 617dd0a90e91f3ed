"""`amppatch roofline`: a kernel's in-cache vs streaming weight throughput, measured against a build."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from amppatch.errors import UsageError

NAME = "roofline"
HELP = ("kernel roofline: weight GB/s of one n=1 MUL_MAT with cache-resident vs streaming weights, "
        "built against a llama.cpp build; which side binds against the stream-read ceiling")


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _threads(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"thread counts must be integers: {text}") from error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--build", type=Path, required=True, help="a build directory printed by `amppatch build`")
    parser.add_argument("--type", type=_csv, default=["q8_0"], help="ggml weight type(s), comma-separated "
                        "(default q8_0), e.g. q8_0,f16,q4_0")
    parser.add_argument("--width", type=int, default=2048, help="row width of the weight matrix, the model's "
                        "hidden size (default 2048, the 1.1B shape)")
    parser.add_argument("--threads", type=_threads, default=[1], help="thread count(s), comma-separated (default 1)")
    parser.add_argument("--buffer", default="auto", help="where the weights go: auto (as llama.cpp: the first "
                        "extra buffer type that takes them, e.g. CPU_REPACK for q4_0), cpu (plain buffer, the "
                        "vec_dot path), or a buffer type name (default auto)")
    parser.add_argument("--cache-mib", type=float, help="size of the cache-resident matrix (default: half of each "
                        "thread's L2 times threads, at most half the LLC)")
    parser.add_argument("--stream-mib", type=float, help="size of the streaming matrix (default 4x the LLC)")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats per size (default 9)")
    parser.add_argument("--seconds", type=float, default=0.3, help="seconds per measurement (default 0.3)")
    parser.add_argument("--ceiling", type=float, metavar="GBPS", help="stream-read ceiling to compare with "
                        "(default: the machine probe's, per thread count)")
    parser.add_argument("-o", "--output", type=Path, help="result file (default ./roofline-<time>.json)")


def run(args: argparse.Namespace) -> Path:
    from amppatch.inputs import check_out_file
    from amppatch.paths import write_text_atomic
    from amppatch.roofline import (
        RooflineOptions,
        RooflineResult,
        contention_warnings,
        format_table,
        measure_roofline,
        results_to_json,
        validate,
    )

    mib = 1 << 20
    for flag, value in (("--cache-mib", args.cache_mib), ("--stream-mib", args.stream_mib)):
        if value is not None and not 0 < value < float("inf"):  # nan and inf cannot become a byte count
            raise UsageError(f"{flag} must be a positive number of MiB, not {value}")
    plans = [RooflineOptions(build=args.build, type=t, width=args.width, threads=n, buffer=args.buffer,
                             cache_bytes=int(args.cache_mib * mib) if args.cache_mib else None,
                             stream_bytes=int(args.stream_mib * mib) if args.stream_mib else None,
                             repeats=args.repeats, seconds=args.seconds)
             for t in args.type for n in args.threads]
    for plan in plans:
        validate(plan)
    if args.ceiling is not None and not 0 < args.ceiling < float("inf"):  # also refuses nan
        raise UsageError(f"--ceiling must be a positive number of GB/s, not {args.ceiling}")
    # checked before minutes of measuring: a result that cannot be written is known now
    out = check_out_file(args.output or Path(f"roofline-{time.strftime('%Y%m%d-%H%M%S')}.json"),
                         example="roofline.json")
    ceilings: dict[int, float | None] = {n: args.ceiling for n in args.threads}
    if args.ceiling is None:
        from amppatch.machine import probe_machine

        machine = probe_machine()
        ceilings = {n: machine.ceiling_for(n) for n in args.threads}
    results: list[RooflineResult] = []
    for plan in plans:
        results.append(measure_roofline(replace(plan, stream_ceiling_gbps=ceilings[plan.threads])))
    print(format_table(results))
    for line in contention_warnings(results):
        print(f"warning: {line}", file=sys.stderr)
    write_text_atomic(out, json.dumps(results_to_json(results), indent=1) + "\n")
    return out
