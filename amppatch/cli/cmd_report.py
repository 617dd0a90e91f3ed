"""`amppatch report DIR`: re-render an ab-test's report.md and report.png from its report.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from amppatch.errors import UsageError

NAME = "report"
HELP = "re-render report.md/report.png of an ab-test directory from report.json (optionally judge slices)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="an ab-test report directory (or its report.json)")
    parser.add_argument("--slices", type=int, metavar="K",
                        help="also judge K disjoint consecutive slices of the rounds on their own "
                        "(A/A false-positive check); writes slices.json")


def run(args: argparse.Namespace) -> Path:
    from amppatch.paths import write_text_atomic
    from amppatch.report import load_report, render_all, render_slices

    if args.slices is not None and args.slices < 1:  # before seconds of rendering, not after
        raise UsageError("--slices must be at least 1", next_step="e.g. --slices 10")
    md = render_all(args.dir)
    if args.slices is None:
        return md
    text, results = render_slices(load_report(md.parent).to_json(), args.slices)
    print(text, end="")
    out = md.parent / "slices.json"
    write_text_atomic(out, json.dumps({"schema_version": 1, "slices": args.slices, "comparisons": results},
                                      indent=1) + "\n")
    return out
