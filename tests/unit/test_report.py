"""report.md / report.json / report.png from a report built out of simulated samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from abtest_fakes import fake_build

from amppatch import abtest, report, stats
from amppatch.abtest import AbTestOptions, AbTestResult, ArmSpec, Sample, Setting, Slot, execute, runner
from amppatch.errors import UsageError

SETTINGS = [Setting("tg", 1, 64), Setting("pp", 1, 128)]


def _samples() -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for slot in abtest.make_schedule(6, [s.id for s in SETTINGS], 2, seed=0):
        arm = "A" if slot.arm == 0 else "B"
        n = 64 if slot.setting.startswith("tg") else 128
        speed = (20.0 if n == 64 else 200.0) * (1.2 if arm == "B" and n == 64 else 1.0)
        for rep in range(3):
            out.append(Sample(slot.round, slot.block, slot.slot, arm, slot.setting, rep,
                              int(n * 1e9 / (speed * rng.lognormal(0, 0.02))), n))
    return out


def make_report(failed_pp: bool = False) -> AbTestResult:
    """A result of simulated samples, read through the checker every report.json passes."""
    return AbTestResult.from_json(_document(failed_pp))


def _document(failed_pp: bool) -> dict[str, Any]:
    samples = _samples()
    failures = {("B", "pp128-t1"): "cannot run prompts on this machine: killed by SIGILL"} if failed_pp else {}
    if failed_pp:
        samples = [s for s in samples if not (s.arm == "B" and s.setting == "pp128-t1")]
    comps = abtest.analyze(samples, ["A", "B"], SETTINGS, failures, min_effect=0.05, seed=0, n_boot=500)
    arms = []
    for name in ("A", "B"):
        by_setting = {}
        for s in SETTINGS:
            mine = [x for x in samples if x.arm == name and x.setting == s.id]
            entry: dict[str, Any] = {"setting": s.id, "failed": failures.get((name, s.id))}
            if mine:
                summ = stats.summarize([x.tok_s for x in mine])
                entry.update(n=summ.n, median_tok_s=summ.median, q1_tok_s=summ.q1, q3_tok_s=summ.q3,
                             iqr_tok_s=summ.iqr, mean_tok_s=summ.mean, cv=summ.cv,
                             samples_ns=[x.ns for x in mine], n_tokens=s.n_tokens,
                             drift={"spearman_rho": float("nan"), "p_value": float("nan"),
                                    "slope_per_round": 0.0, "n_rounds": 6},
                             bandwidth={"gb_per_s": 1.2 * summ.median / 20, "ceiling_gbps": 40.0,
                                        "ceiling_threads": 1, "share_of_ceiling": 0.03 * summ.median / 20}
                             if s.test == "tg" else None)
                if s.test == "tg":
                    entry["latency_ms"] = {"p50": 50.0, "p99": 61.0, "n_tokens": 100}
            by_setting[s.id] = entry
        first = by_setting[SETTINGS[0].id]
        arms.append({"name": name, "build_dir": f"/builds/{name}", "commit": "c0ffee" * 7, "dirty_hash": None,
                     "bench_args": [], "env": {}, "setting": SETTINGS[0].id,
                     "median_tok_s": first["median_tok_s"], "samples_ns": first["samples_ns"],
                     "by_setting": by_setting})
    head = comps[0]
    return {
        "schema_version": 1,
        "tool": {"name": "amppatch", "version": "test", "command": "ab-test"},
        "options": {"model": "/models/m.gguf", "reps": 3, "seed": 0, "min_effect": 0.05},
        "verdict": head["verdict"], "ratio": head["ratio"], "ci95": head["ci95"],
        "headline": {"arm": "B", "baseline": "A", "setting": head["setting"]},
        "settings": [{"id": s.id, "label": s.label, "test": s.test, "threads": s.threads,
                      "n_tokens": s.n_tokens, "depth": s.depth} for s in SETTINGS],
        "arms": arms,
        "comparisons": comps,
        "correctness": [{"arm": "B", "baseline": "A", "mode": "identical", "passed": True,
                         "detail": "identical: 24 greedy tokens equal"}],
        "bandwidth": {"bytes_per_token": 1.2e9, "weights_whole": 1.19e9, "gathered_rows": 4096, "kv": 1e6,
                      "context_len": 32.5, "tied_embeddings": False, "ceiling_note": "machine probe"},
        "latency": {"available": True, "note": "tracer token hooks loaded in every arm"},
        "llc": {"available": False, "note": "unavailable on this machine"},
        "diagnostics": {"loadavg_start": {"1min": 0.5}, "loadavg_end": {"1min": 0.7},
                        "cpufreq": {"governor": "performance", "boost": "not readable"},
                        "busy_processes": [{"pid": 1, "comm": "cc1plus", "cpu_share": 0.4}],
                        "warnings": ["something to know"], "rounds": 6, "stopped_because": "6 rounds done",
                        "failures": [{"arm": a, "setting": s, "reason": r} for (a, s), r in failures.items()]},
        "environment": {"cpu_model": "Test CPU", "cpus": 2, "kernel": "Linux 6", "compilers": ["gcc 12"],
                        "model": {"types": {"Q8_0": 1.1e9}}},
        "samples": [s.__dict__ | {"tok_s": s.tok_s} for s in samples],
    }


def test_write_report_renders_all_three_files(tmp_path: Path) -> None:
    data = make_report()
    report.write_report(tmp_path, data)
    saved = json.loads((tmp_path / "report.json").read_text())
    # names scripts rely on
    assert saved["verdict"] == "faster"
    assert saved["ratio"] == pytest.approx(1.2, rel=0.05)
    low, high = saved["ci95"]
    assert low < saved["ratio"] < high
    assert {"name", "median_tok_s", "samples_ns"} <= set(saved["arms"][0])
    assert {"verdict", "ratio", "ci95", "arm", "setting"} <= set(saved["comparisons"][0])
    # NaN is not JSON: stored as null
    assert saved["arms"][0]["by_setting"]["tg64-t1"]["drift"]["spearman_rho"] is None
    md = (tmp_path / "report.md").read_text()
    assert "**Verdict: B vs A (tg64, 1 thread): FASTER**" in md
    assert "| tg64, 1 thread " in md and "| pp128, 1 thread " in md
    assert "identical: 24 greedy tokens equal" in md
    assert "cc1plus (40% CPU)" in md and "something to know" in md
    assert "50.00/61.00" in md
    # every table line of the results has the same width: readable in a terminal
    results = md.split("## Results")[1].split("\n\n")[1].splitlines()
    assert len(results) == 2 + 4 and len({len(line) for line in results}) == 1
    png = (tmp_path / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_failed_prompt_arm_is_reported_not_fatal(tmp_path: Path) -> None:
    report.write_report(tmp_path, make_report(failed_pp=True))
    md = (tmp_path / "report.md").read_text()
    assert "cannot run prompts on this machine: killed by SIGILL" in md
    saved = report.load_report(tmp_path)
    pp = saved.comparison("B", "pp128-t1")
    assert pp is not None and pp.verdict == "unavailable" and pp.ratio is None
    assert saved.failures == [{"arm": "B", "setting": "pp128-t1",
                               "reason": "cannot run prompts on this machine: killed by SIGILL"}]


def test_render_all_recreates_md_and_png_from_json(tmp_path: Path) -> None:
    report.write_report(tmp_path, make_report())
    first = (tmp_path / "report.md").read_text()
    (tmp_path / "report.md").unlink()
    (tmp_path / "report.png").unlink()
    assert report.render_all(tmp_path / "report.json") == tmp_path / "report.md"
    assert (tmp_path / "report.md").read_text() == first
    assert (tmp_path / "report.png").is_file()


def test_load_report_checks_schema(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        report.load_report(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(UsageError):
        report.load_report(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(UsageError):
        report.load_report(tmp_path)


def test_render_slices(tmp_path: Path) -> None:
    data = make_report().to_json()
    text, results = report.render_slices(data, 3, n_boot=300)
    assert len(results) == 6  # 3 slices × 2 settings
    assert {r["rounds"][0] for r in results} == {0, 2, 4}
    assert "faster" in text and "slice" in text


def test_bandwidth_line_names_the_routed_experts_of_a_moe_model() -> None:
    data = make_report().to_json()
    dense = report.render_markdown(data)
    assert "routed experts" not in dense
    data["bandwidth"].update({"experts_read": 3e8, "experts_total": 1.2e9, "n_expert": 8, "n_expert_used": 2})
    md = report.render_markdown(data)
    assert "300.0 MB of the 2 routed experts of 8 (1200.0 MB of expert tensors)" in md


def test_written_report_reads_back_as_the_same_result(tmp_path: Path) -> None:
    result = make_report()
    report.write_report(tmp_path, result)
    text = (tmp_path / "report.json").read_text()
    back = report.load_report(tmp_path)
    assert back.path == tmp_path and back.dumps() == text
    assert back.to_json() == json.loads(text) == result.to_json()  # NaN was stored as null on both sides
    assert back.verdict == "faster" and back.ci95 is not None and back.ci95[0] < back.ratio < back.ci95[1]
    arm = back.arm("B")
    assert arm is not None and arm.median_tok_s == arm.at("tg64-t1")["median_tok_s"]


def test_committed_reports_round_trip_byte_for_byte() -> None:
    files = sorted(Path(__file__).resolve().parents[2].glob("docs/runs/*/final-report.json"))
    assert files
    for path in files:
        text = path.read_text()
        doc = json.loads(text)
        result = AbTestResult.from_json(doc, path)
        assert result.to_json() == doc and list(result.to_json()) == list(doc)
        assert result.dumps() == text and result.path == path.parent


def test_run_abtest_returns_the_result_it_wrote(tmp_path: Path, small_gguf: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's own output (not a hand-built document) is what the reader reads back."""
    build = fake_build(tmp_path / "build")
    monkeypatch.setattr(runner, "stream_ceiling", lambda: (None, "not measured (test)", None))
    monkeypatch.setattr(execute, "_run_bench", lambda argv, env, timeout, label: {"samples_ns": [10_000_000]})

    def replay(slot: Slot, setting: Setting) -> list[int]:
        return [10_000_000 + 1000 * slot.slot + (0 if slot.arm == 0 else 20_000)] * 2

    result = abtest.run_abtest(AbTestOptions(
        arms=(ArmSpec("A", build), ArmSpec("B", build)), model=small_gguf, rounds=2, reps=2,
        skip_correctness=True, latency="off", llc=False, n_boot=200, out=tmp_path / "out"), replay)
    assert result.path == tmp_path / "out"
    text = (result.path / "report.json").read_text()
    assert result.dumps() == text
    assert report.load_report(result.path) == result
    assert [a.name for a in result.arms] == ["A", "B"] and result.settings[0].id == "tg64-t1"
    comp = result.comparison("B")
    assert comp is not None and comp.baseline == "A" and comp.verdict == result.verdict
    assert (result.path / "report.md").is_file()


def _with_limit(measured: bool = True) -> dict[str, Any]:
    """The simulated report with a roofline part (measured, or not) and each arm's huge-page share."""
    from amppatch.hugepages import HugeShare
    from amppatch.jsondoc import jsonable
    from amppatch.limit import KernelPick, KernelRun, MeasuredKernel, ModelRoofline, SettingRates
    from amppatch.roofline import Rate, RooflineResult
    from amppatch.weightpages import WeightPages

    doc = _document(False)
    result = RooflineResult("q8_0", 2048, 1, "CPU", "vec_dot (ggml_vec_dot_<type>_*)",
                            Rate(1 << 20, 100, (29.0, 30.0, 31.0), (1.0, 1.0, 1.0)),
                            Rate(600 << 20, 6000, (4.0, 4.1, 4.2), (1.0, 1.0, 1.0)), 14.2, "/builds/A", "k")
    rows = ({"threads": 1, "thp": 0, "gbps": 14.2}, {"threads": 1, "thp": 1, "gbps": 12.8})
    run = KernelRun((MeasuredKernel(KernelPick("q8_0", 2048, 10**9, 1.0, 0.8), 1, result),), rows, "madvise",
                    "/builds/A")
    arms = tuple((a["name"], a["by_setting"]["tg64-t1"]["bandwidth"]["gb_per_s"]) for a in doc["arms"])
    part = run.assemble([SettingRates("tg64-t1", "tg64, 1 thread", 1, arms)]) if measured else \
        ModelRoofline.unavailable("not measured (--no-roofline)")
    doc["roofline"] = part.to_json()
    for arm, huge in zip(doc["arms"], (0, 900 << 20), strict=True):
        arm["huge_pages"] = WeightPages.watched(HugeShare(1000 << 20, 1000 << 20, huge, 0, 1, True), 1 << 30,
                                                "warmup (tg64, 1 thread)").to_json()
    return jsonable(doc)  # NaN drifts as null, as in every written report


def test_limit_section_table_pages_and_roofline_png(tmp_path: Path) -> None:
    from amppatch.run_report import limit_lines

    doc = _with_limit()
    result = AbTestResult.from_json(doc)
    assert result.roofline is not None and result.roofline.settings[0].binds == "memory"
    assert result.to_json() == doc and list(result.to_json()) == list(doc)
    report.write_report(tmp_path, result)
    back = report.load_report(tmp_path)
    assert back == AbTestResult.from_json(doc, tmp_path) and back.roofline == result.roofline
    arm_b = back.arm("B")
    assert arm_b is not None and arm_b.huge_pages is not None and arm_b.huge_pages.share == pytest.approx(0.9)
    md = (tmp_path / "report.md").read_text()
    limit = md.split("## Limit")[1].split("## Correctness")[0]
    gbps = {a: d["by_setting"]["tg64-t1"]["bandwidth"]["gb_per_s"] for a, d in ((x["name"], x) for x in doc["arms"])}
    assert (f"| tg64, 1 thread | 30.00 | 14.20 | 12.80 | 14.20 | memory | {gbps['A']:.2f} ({gbps['A'] / 14.2:.0%}) "
            f"| {gbps['B']:.2f} ({gbps['B'] / 14.2:.0%}) |") in limit
    assert "- q8_0 at width 2048 (100% of the weight bytes per token" in limit and "Plot: roofline.png." in limit
    assert "- A: 0% of the 1.05 GB mapping" in limit and "- B: 90% of the 1.05 GB mapping" in limit
    assert (tmp_path / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = limit_lines(str(tmp_path))
    assert lines[:3] == ["", "## Limit", ""]
    assert lines[3].startswith("- tg64, 1 thread: roofline 14.20 GB/s (memory binds: in cache 30.00")
    assert lines[4].startswith("- weights of A: 0% of the 1.05 GB mapping") and len(lines) == 6
    assert limit_lines(None) == []
    from amppatch.run import RunOptions
    from amppatch.run_report import render_summary

    summary = render_summary(RunOptions(threads=(1,)), {"final": {"report": str(tmp_path), "comparisons": []}}, {})
    assert "\n".join(lines) in summary and summary.index("## Limit") < summary.index("## Stages")


def test_limit_section_of_a_run_without_the_roofline(tmp_path: Path) -> None:
    report.write_report(tmp_path, AbTestResult.from_json(_with_limit(measured=False)))
    limit = (tmp_path / "report.md").read_text().split("## Limit")[1].split("## Correctness")[0]
    assert "Roofline: not measured (--no-roofline)." in limit and "- B: 90% of" in limit
    assert not (tmp_path / "roofline.png").exists()


def test_older_reports_have_no_roofline_and_keep_their_keys(tmp_path: Path) -> None:
    from amppatch.run_report import limit_lines

    old = make_report()
    assert old.roofline is None and "roofline" not in old.to_json()
    assert all(a.huge_pages is None for a in old.arms)
    report.write_report(tmp_path, old)
    assert "## Limit" not in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "roofline.png").exists()
    assert limit_lines(str(tmp_path)) == ["", "## Limit", "", "- roofline: not in the final report"]
    odd = {**old.to_json(), "roofline": None}  # not a record: rides along as read
    assert AbTestResult.from_json(odd).to_json() == odd and AbTestResult.from_json(odd).roofline is None
    with pytest.raises(UsageError, match="schema_version"):
        AbTestResult.from_json({**_document(False), "roofline": {"schema_version": 9}})
