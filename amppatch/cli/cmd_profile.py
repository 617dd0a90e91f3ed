"""`amppatch profile`: find the hot kernels and derive prefetch distances and hints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from amppatch.profile import BACKENDS, ProfileOptions, profile

NAME = "profile"
HELP = "run a workload under the tracer; hot kernels, per-token latency, sites with distance and hint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, help="llama.cpp tree (builds it if --build is not given; maps loops)")
    parser.add_argument("--model", "-m", type=Path, help="GGUF model for the default llama-bench workload")
    parser.add_argument("--build", type=Path, help="an amppatch build dir (or its manifest.json)")
    parser.add_argument("--threads", "-t", type=int, default=1, help="llama-bench threads (default 1)")
    parser.add_argument("--tokens", "-n", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--repack", type=int, choices=(0, 1), help="llama-bench --repack 0|1")
    parser.add_argument("--hz", type=int, default=1000,
                        help="samples per second of thread CPU time (default 1000; the kernel tick may cap it)")
    parser.add_argument("--backend", choices=BACKENDS, default="sampler",
                        help="sampler (default, no counters needed), perf (hardware counters), "
                        "cachegrind (simulated cache misses; small workloads only)")
    parser.add_argument("--no-roofline", action="store_true",
                        help="skip the roofline of the model's weight kernels after the workload (a few seconds "
                        "per weight type)")
    parser.add_argument("-o", "--out", type=Path,
                        help="profile.json path (default ./profile.json; overhead.json with --calibrate)")
    parser.add_argument("--calibrate", action="store_true",
                        help="measure the tracer's own cost (ns per sample × delivered rate, ns per hooked call) "
                        "instead of profiling; with --from-profile, also per token of that workload")
    parser.add_argument("--from-profile", type=Path, help="with --calibrate: a profile.json whose calls per "
                        "token and token time the overhead is computed for")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after --: a command to profile instead of llama-bench")


def _calibrate(args: argparse.Namespace) -> Path:
    import json

    from amppatch.inputs import PROFILE, check_out_file, read_json
    from amppatch.paths import write_text_atomic
    from amppatch.tracer.overhead import measure_overhead

    out = check_out_file(args.out or Path("overhead.json"), example="overhead.json")
    if args.from_profile is not None:  # read before the minute of measuring, not after
        read_json(args.from_profile, PROFILE, require=("trace", "tokens.p50_ms"))
    result = measure_overhead(hz=args.hz, profile_json=args.from_profile, workdir=out.parent / (out.stem + ".calib"))
    write_text_atomic(out, json.dumps(result, indent=2))
    s = result["sampling"]
    print(f"sampling: {s['ns_per_sample']:.0f} ns per sample × {s['delivered_hz']:.0f} samples/s of CPU time = "
          f"{100 * s['overhead_fraction_of_cpu']:.3f}% of CPU", file=sys.stderr)
    print("hooks (ns per call): " + ", ".join(f"{k} {v:.0f}" for k, v in result["hooks"]["ns_per_call"].items()),
          file=sys.stderr)
    if "workload" in result:
        w = result["workload"]
        print(f"per token: hooks {w['hook_ns_per_token']:.0f} ns of {w['token_p50_ns'] / 1e6:.2f} ms; "
              f"total tracer overhead {100 * w['total_overhead_fraction']:.3f}%", file=sys.stderr)
    return out


def run(args: argparse.Namespace) -> Path:
    if args.calibrate:
        return _calibrate(args)
    from amppatch.inputs import check_out_file

    args.out = check_out_file(args.out or Path("profile.json"), example="profile.json")
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    options = ProfileOptions(
        repo=args.repo, model=args.model, build=args.build, threads=args.threads, tokens=args.tokens,
        repack=args.repack, hz=args.hz, backend=args.backend, out=args.out, command=tuple(command),
        roofline=not args.no_roofline,
    )
    result = profile(options)
    print(result.summary, file=sys.stderr)
    return result.path
