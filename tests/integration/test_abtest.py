"""ab-test end to end on the tiny model: a short real A/A, a settings pair, a broken arm, the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from amppatch.abtest import AbTestOptions, AbTestResult, ArmSpec, parse_arm, run_abtest
from amppatch.build import Build
from amppatch.report import render_all
from amppatch.stats import VERDICTS

pytestmark = pytest.mark.integration


def test_short_aa_run_writes_a_complete_report(native_build: Build, tiny_model_q8_0: Path, tmp_path: Path) -> None:
    options = AbTestOptions(
        arms=(ArmSpec("A", native_build.dir), ArmSpec("B", native_build.dir)),
        model=tiny_model_q8_0,
        tokens=8,
        reps=2,
        rounds=2,
        tests=("tg", "pp"),
        prompt_tokens=32,
        out=tmp_path / "aa",
        n_boot=500,
    )
    result = run_abtest(options)
    assert result.path is not None
    out = result.path
    data = json.loads((out / "report.json").read_text())
    # the file is the typed result's document, and reading it back gives the same document
    assert result.to_json() == data == AbTestResult.from_json(data).to_json()
    assert data["schema_version"] == 1
    assert data["verdict"] in VERDICTS
    low, high = data["ci95"]
    assert low <= data["ratio"] <= high
    assert [a["name"] for a in data["arms"]] == ["A", "B"]
    # 2 rounds × 2 slots per block (ABBA) × 2 repetitions, per arm and setting
    for arm in data["arms"]:
        assert len(arm["samples_ns"]) == 8
        assert arm["median_tok_s"] > 0
        assert set(arm["by_setting"]) == {"tg8-t1", "pp32-t1"}
    assert {(c["arm"], c["setting"]) for c in data["comparisons"]} == {("B", "tg8-t1"), ("B", "pp32-t1")}
    assert len(data["samples"]) == 2 * 2 * 8
    assert {s["round"] for s in data["samples"]} == {0, 1}
    gate = data["correctness"][0]
    assert gate["mode"] == "identical" and gate["passed"] is True
    bw = data["bandwidth"]
    assert 0 < bw["weights_whole"] < os.path.getsize(tiny_model_q8_0)
    assert data["arms"][0]["by_setting"]["tg8-t1"]["bandwidth"]["gb_per_s"] > 0
    assert data["arms"][0]["by_setting"]["pp32-t1"]["bandwidth"] is None
    assert data["environment"]["commits"]["A"] == native_build.manifest["commit"]
    assert "loadavg_start" in data["diagnostics"]
    assert data["options"]["rounds"] == 2
    md = (out / "report.md").read_text()
    assert "## Correctness" in md and "## Noise diagnostics" in md
    assert (out / "report.png").stat().st_size > 5000
    (out / "report.md").unlink()
    assert render_all(out).read_text() == md


def test_per_token_latency_at_depth_counts_the_generation_steps_only(native_build: Build, tiny_model_q8_0: Path,
                                                                     tmp_path: Path) -> None:
    """At depth every llama-bench call fills its context first (batches of many tokens, one call of
    llama_process each); the latency percentiles count only the one-token steps: llama-bench's own
    warmup step of each call, then --tokens per repetition."""
    result = run_abtest(AbTestOptions(
        arms=(ArmSpec("A", native_build.dir), ArmSpec("B", native_build.dir)), model=tiny_model_q8_0, tokens=4,
        depth=256, reps=2, rounds=2, out=tmp_path / "depth", skip_correctness=True, n_boot=300, latency="on",
        llc=False,
    ))
    assert result.path is not None
    data = json.loads((result.path / "report.json").read_text())
    assert data["latency"]["available"], data["latency"]["note"]
    for arm in data["arms"]:
        latency = arm["by_setting"]["tg4-d256-t1"]["latency_ms"]
        # 2 rounds x 2 calls per arm (mirror block A B B A) x (llama-bench's warmup step + 2 reps x 4 tokens)
        assert latency["n_tokens"] == 2 * 2 * (1 + 2 * 4)


def test_settings_arm_gets_the_tolerance_gate_and_a_broken_arm_is_reported(
    native_build: Build, tiny_model_q4_0: Path, tmp_path: Path
) -> None:
    norepack = parse_arm(f"norepack={native_build.dir}::--repack 0")
    out = run_abtest(AbTestOptions(
        arms=(ArmSpec("A", native_build.dir), norepack), model=tiny_model_q4_0, tokens=8, reps=1, rounds=2,
        out=tmp_path / "settings", n_boot=300, latency="off",
    )).path
    assert out is not None
    data = json.loads((out / "report.json").read_text())
    assert data["correctness"][0]["mode"] == "tolerance" and data["correctness"][0]["passed"]
    assert data["arms"][1]["bench_args"] == ["--repack", "0"]
    assert data["arms"][1]["llama_bench"]["repack"] in (False, 0, "0")

    # An arm that cannot run here (a quantized V cache needs flash attention, which it turns off): reported
    # per setting, not a crash of ab-test.
    broken = parse_arm(f"broken={native_build.dir}::-ctv q4_0 -fa 0")
    result = run_abtest(AbTestOptions(
        arms=(ArmSpec("A", native_build.dir), broken), model=tiny_model_q4_0, tokens=8, reps=1, rounds=2,
        out=tmp_path / "broken", skip_correctness=True, n_boot=300, latency="off",
    ))
    assert result.path is not None and result.verdict == "unavailable" and result.failures
    out = result.path
    data = json.loads((out / "report.json").read_text())
    assert data["verdict"] == "unavailable"
    assert data["comparisons"][0]["unavailable"].startswith("broken: cannot run")
    assert data["correctness"][0]["detail"] == "not checked (--skip-correctness)"
    assert "not checked" in (out / "report.md").read_text()


def test_cli_runs_ab_test_and_report(native_build: Build, tiny_model_q8_0: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from amppatch.cli import cmd_abtest, cmd_report

    parser = argparse.ArgumentParser()
    cmd_abtest.add_arguments(parser)
    args = parser.parse_args([
        "--a", str(native_build.dir), "--b", str(native_build.dir / "manifest.json"), "-m", str(tiny_model_q8_0),
        "--tokens", "8", "--reps", "2", "--max-time", "1", "--skip-correctness", "--latency", "off", "--no-roofline",
        "-o", str(tmp_path / "cli"),
    ])
    out = cmd_abtest.run(args)
    assert out == tmp_path / "cli"
    assert "# amppatch ab-test report" in capsys.readouterr().out
    # the stop rule never stops before two rounds (blocks are the bootstrap's unit), then respects the limit
    diagnostics = json.loads((out / "report.json").read_text())["diagnostics"]
    assert diagnostics["rounds"] == 2
    assert diagnostics["stopped_because"].startswith("time limit")
    parser = argparse.ArgumentParser()
    cmd_report.add_arguments(parser)
    assert cmd_report.run(parser.parse_args([str(out)])) == out / "report.md"
    sliced = cmd_report.run(parser.parse_args([str(out), "--slices", "1"]))
    assert json.loads(Path(sliced).read_text())["slices"] == 1


def test_cli_arm_with_rejected_flags_writes_the_report_and_exits_9(
        native_build: Build, tiny_model_q8_0: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from amppatch.cli import main

    out = tmp_path / "rejected"
    code = main(["ab-test", "--a", str(native_build.dir), "--b", f"{native_build.dir}::--no-such-flag 1",
                 "-m", str(tiny_model_q8_0), "--tokens", "8", "--reps", "1", "--rounds", "2",
                 "--skip-correctness", "--latency", "off", "--no-llc", "--no-roofline", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 9, err
    assert "could not measure arm B at tg8-t1" in err
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "unavailable" and report["diagnostics"]["failures"][0]["arm"] == "B"
    # the same -o again is refused: the report is evidence
    assert main(["ab-test", "--a", str(native_build.dir), "--b", str(native_build.dir), "-m",
                 str(tiny_model_q8_0), "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_the_roofline_and_the_huge_pages_are_measured_in_the_same_run_by_default(
        native_build: Build, tiny_model_q8_0: Path, tmp_path: Path) -> None:
    from amppatch.cli import main
    from amppatch.gguf_info import read_gguf

    out = tmp_path / "limit"
    assert main(["ab-test", "--a", str(native_build.dir), "--b", str(native_build.dir), "-m", str(tiny_model_q8_0),
                 "--tokens", "8", "--reps", "1", "--rounds", "2", "--skip-correctness", "--latency", "off",
                 "--no-llc", "-o", str(out)]) == 0
    result = AbTestResult.read(out)
    assert result.options["roofline"] is True
    part = result.roofline
    assert part is not None and part.available, part
    (kernel,) = part.kernels  # the tiny Q8_0 model: one type, one thread count
    widths = {t.shape[0] for t in read_gguf(tiny_model_q8_0).tensors}
    assert kernel.pick.type == "q8_0" and kernel.pick.width in widths and kernel.threads == 1
    assert kernel.result is not None and kernel.result.in_cache_gbps > 0 and kernel.result.buffer_type == "CPU"
    assert kernel.result.build_dir == str(native_build.dir)
    (limit,) = part.settings
    assert limit.setting == "tg8-t1" and limit.in_cache_gbps == pytest.approx(kernel.result.in_cache_gbps, abs=1e-3)
    assert limit.ceilings.page_4k_gbps and limit.stream_gbps
    assert limit.roofline_gbps == min(limit.in_cache_gbps, limit.stream_gbps) and limit.binds in ("kernel", "memory")
    for arm, gbps in limit.arms:
        assert gbps == pytest.approx(result.arm(arm).at("tg8-t1")["bandwidth"]["gb_per_s"], rel=1e-3)  # type: ignore[union-attr]
        assert limit.share(gbps) == pytest.approx(gbps / limit.roofline_gbps, abs=1e-3)
    for arm in result.arms:
        pages = arm.huge_pages
        assert pages is not None and pages.smaps is not None and pages.during == "warmup (tg8, 1 thread)"
        if pages.share is None:  # a tiny model's warmup can end between two reads of its smaps on a busy machine
            assert "mapping was not seen" in pages.note
            continue
        assert 0 <= pages.share <= 1 and pages.smaps.range_bytes > 0.9 * tiny_model_q8_0.stat().st_size
    md = (out / "report.md").read_text()
    assert "## Limit" in md and "| tg8, 1 thread |" in md.split("## Limit")[1]
    assert (out / "roofline.png").stat().st_size > 5000
