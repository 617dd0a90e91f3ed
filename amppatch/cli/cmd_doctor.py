"""`amppatch doctor`: what this machine can do."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from amppatch.doctor import diagnose, report_dict
from amppatch.paths import cache_root, write_text_atomic

NAME = "doctor"
HELP = ("preflight: compilers, build tools, ISA features that really execute, counters, huge pages "
        "(THP modes, file-backed THP, MADV_COLLAPSE, hugetlb pool), disk")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", type=Path, help="where to write doctor.json (default: cache dir)")


def run(args: argparse.Namespace) -> Path:
    from amppatch.inputs import check_out_file

    if args.output is not None:
        args.output = check_out_file(args.output, example="doctor.json")
    report = diagnose()
    width = max(len(c.name) for c in report.checks)
    for check in report.checks:
        mark = "ok " if check.ok else ("ERR" if check.required else "-- ")
        print(f"[{mark}] {check.name:<{width}}  {check.detail}")
    for key, value in report.facts.items():
        print(f"      {key:<{width}}  {value}")
    print("ready: amppatch can build and measure here" if report.ready else
          "not ready: install what is marked ERR")
    out = args.output or cache_root() / "doctor.json"
    write_text_atomic(out, json.dumps(report_dict(report), indent=2) + "\n")
    return out
