"""ab-test's false-call rate (and power), measured by replaying recorded real runs.

    python -m bench.false_calls                    # the table of docs/RESULTS.md ("ab-test: false-call rate")
    python -m bench.false_calls --runs 400         # quicker, coarser
    python -m bench.false_calls extract REPORT_DIR... --condition interfered   # add recordings

The recordings are tests/data/abtest-recordings.json (per-slot samples only); `extract` appends the
settings of ab-test report directories (or report.json files) to it, and the committed tune results'
single-candidate probes with `--from-learned`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from amppatch import calibrate, stats
from amppatch.abtest.result import AbTestResult
from amppatch.learned import Learned

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "abtest-recordings.json"

# The settings of the table: ab-test's defaults, more and fewer rounds, the stop rule short and long, a
# smaller min-effect. Each is replayed under both decision rules (stats.INTERVALS).
PROCEDURES = (
    calibrate.Procedure("defaults (--rounds 6)"),
    calibrate.Procedure("--rounds 12", rounds=12),
    calibrate.Procedure("--max-time 120", rounds=None, max_time=120.0),
    calibrate.Procedure("--max-time 600", rounds=None, max_time=600.0),
    calibrate.Procedure("--min-effect 0.02", min_effect=0.02),
)
POWER_PROCEDURES = (PROCEDURES[0], PROCEDURES[3])
POWER_EFFECTS = (1.05, 1.08, 1.19)


def load(path: Path = DATA) -> list[calibrate.Recording]:
    return calibrate.recordings_from_json(json.loads(path.read_text()))


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name  # no machine-local absolute paths in the committed data


def extract(args: argparse.Namespace) -> int:
    data: dict[str, Any] = (json.loads(DATA.read_text()) if DATA.exists()
                            else {"schema_version": calibrate.DATA_SCHEMA_VERSION, "recordings": []})
    have = {r["id"] for r in data["recordings"]}
    new: list[calibrate.Recording] = []
    for item in args.reports:
        path = Path(item)
        result = AbTestResult.read(path)
        report = result.to_json()
        builds = {a["build"] + "|" + " ".join(a["bench_args"]) + "|" + json.dumps(a["env"], sort_keys=True)
                  for a in result.options["arms"]}
        kind = "aa" if len(builds) == 1 else "ab"
        label = args.label or _rel(path if path.is_dir() else path.parent)
        for setting in result.settings:
            rid = f"{label} {setting.id}"
            if rid in have:
                continue
            diag = result.diagnostics
            usage = diag.get("cpu_usage") or {}
            note = (f"{report['environment']['model']['path'].rsplit('/', 1)[-1]}; "
                    f"load {diag.get('loadavg_start', {}).get('1min')}, others' CPU share {usage.get('others')}")
            new.append(calibrate.recording_from_report(report, setting.id, id=rid, condition=args.condition,
                                                       kind=kind, note=note))
    for learned_path in args.from_learned:
        learned = Learned.read(Path(learned_path))
        seed = int(learned.options.get("seed", 0))
        reports: dict[str, list[dict[str, Any]]] = {}
        for p in learned.probes:
            reports.setdefault(p["report"], []).append(p)
        for report_dir, probes in reports.items():
            if len(probes) != 1 or not probes[0].get("samples_ns"):
                continue  # several candidates share "off": not a two-arm schedule
            p = probes[0]
            rid = f"{_rel(Path(learned_path))} {report_dir.rsplit('/', 1)[-1]}"
            if rid in have:
                continue
            busy = any(w.startswith(("the machine was busy", "other processes")) for w in p.get("warnings", []))
            n_calls = int(p["rounds"]) * 4 + 2  # timed slots + one warmup per arm
            ns = (sum(p["samples_ns"]) + sum(p["off_samples_ns"])) / 1e9
            overhead = max(float(p["batch_seconds"]) - ns * (1 + 1 / (2 * int(p["rounds"]))), 0.0) / n_calls
            new.append(calibrate.recording_from_probe(p, seed, id=rid, condition="interfered" if busy else "quiet",
                                                      slot_overhead_s=overhead, setup_s=0.0))
    data["recordings"].extend(r.to_json() for r in new)
    DATA.parent.mkdir(parents=True, exist_ok=True)
    # One recording per line: small diffs when recordings are added.
    lines = ",\n".join("    " + json.dumps(r, separators=(",", ":")) for r in data["recordings"])
    DATA.write_text(f'{{"schema_version": {data["schema_version"]}, "recordings": [\n{lines}\n]}}\n')
    for r in new:
        print(f"added {r.id} ({r.condition}, {r.kind}, {len(r.rounds)} rounds)", file=sys.stderr)
    print(DATA)
    return 0


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def table(args: argparse.Namespace) -> int:
    recs = load()
    groups = {c: [r for r in recs if r.condition == c] for c in calibrate.CONDITIONS}
    started = time.monotonic()
    print(f"recordings: {', '.join(f'{c} {len(g)}' for c, g in groups.items())}; {args.runs} simulated A/A "
          f"runs per row, seed {args.seed}\n")
    print("| setting | data | rule | false faster | false slower | false calls (95 % upper bound) | equivalent | "
          "inconclusive | mean rounds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for proc in PROCEDURES if args.only in (None, "calls") else ():
        for cond, recs_c in groups.items():
            for rule in stats.INTERVALS:
                rate, rounds = _cell(recs_c, replace(proc, interval=rule), args.runs, args.seed, 1.0)
                print(f"| {proc.label} | {cond} | {rule} | {_pct(rate.share('faster'))} | "
                      f"{_pct(rate.share('slower'))} | {_pct(rate.share(*calibrate.FALSE_CALLS))} "
                      f"({_pct(rate.upper95(*calibrate.FALSE_CALLS))}) | {_pct(rate.share('equivalent'))} | "
                      f"{_pct(rate.share('inconclusive'))} | {rounds:.1f} |", flush=True)
    n_power = max(args.runs // 10, 50)
    print(f"\nPower: the second arm's speed multiplied by a known ratio; share of {n_power} runs per cell that "
          "say `faster`\n")
    print("| setting | data | rule | " + " | ".join(f"{e:.2f}×" for e in POWER_EFFECTS) + " |")
    print("|---|---|---|" + "---|" * len(POWER_EFFECTS))
    for proc in POWER_PROCEDURES if args.only in (None, "power") else ():
        for cond, recs_c in groups.items():
            for rule in stats.INTERVALS:
                cells = [_cell(recs_c, replace(proc, interval=rule), n_power, args.seed + 7, e)[0].share("faster")
                         for e in POWER_EFFECTS]
                print(f"| {proc.label} | {cond} | {rule} | " + " | ".join(_pct(c) for c in cells) + " |", flush=True)
    print(f"\n({time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0


def _cell(recs: list[calibrate.Recording], proc: calibrate.Procedure, n: int, seed: int,
          effect: float) -> tuple[calibrate.Rate, float]:
    counts: dict[str, int] = {}
    total_rounds = 0
    for i in range(n):
        out = calibrate.simulate_run(recs[i % len(recs)], proc, seed * 1_000_003 + i, effect=effect)
        counts[out.verdict] = counts.get(out.verdict, 0) + 1
        total_rounds += out.rounds
    return calibrate.Rate(n, counts), total_rounds / n


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "extract":
        p = argparse.ArgumentParser(prog="python -m bench.false_calls extract")
        p.add_argument("reports", nargs="*", help="ab-test report directories or report.json files")
        p.add_argument("--condition", choices=calibrate.CONDITIONS, default="quiet")
        p.add_argument("--label", help="id prefix (default: the report directory)")
        p.add_argument("--from-learned", nargs="*", default=[], help="tune learned.json files")
        return extract(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(prog="python -m bench.false_calls")
    p.add_argument("--runs", type=int, default=1000, help="simulated A/A runs per table row (default 1000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", choices=("calls", "power"), help="only the false-call table or only the power table")
    return table(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
