"""Exit codes through the real command code with llama-bench (and tune's search) replaced by fakes: Ctrl-C is
130 after the partial result is written, an arm that could not be measured is 9 after the report is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from abtest_fakes import fake_build

from amppatch import abtest
from amppatch.abtest import execute, runner
from amppatch.cli import main
from amppatch.errors import UnmeasuredError


class _FakeBench:
    """Stands in for one llama-bench call: a result record, a rejected flag, or Ctrl-C at a given call."""

    def __init__(self, *, fail_arm: str | None = None, interrupt_at: int | None = None) -> None:
        self.fail_arm, self.interrupt_at, self.calls = fail_arm, interrupt_at, 0

    def __call__(self, argv: list[str], env: dict[str, str], timeout: float, label: str) -> dict[str, Any]:
        self.calls += 1
        if self.interrupt_at is not None and self.calls >= self.interrupt_at:
            raise KeyboardInterrupt
        if label == self.fail_arm:
            raise abtest._BenchFailed("llama-bench exited with status 1: error: invalid parameter --frobnicate")
        n = int(argv[argv.index("-r") + 1])
        return {"samples_ns": [10_000_000 + 1000 * (self.calls % 7)] * n, "n_threads": 1}


@pytest.fixture()
def ab_args(tmp_path: Path, small_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    build = fake_build(tmp_path / "build")
    # nothing here may start a process: no machine probe, no tracer, no perf
    monkeypatch.setattr(runner, "stream_ceiling", lambda: (None, "not measured (test)", None))
    return ["ab-test", "--a", str(build), "--b", str(build), "-m", str(small_gguf), "--rounds", "2",
            "--reps", "1", "--skip-correctness", "--latency", "off", "--no-llc", "--no-roofline",
            "-o", str(tmp_path / "out")]


def test_ab_test_interrupted_writes_the_partial_report_and_exits_130(
        ab_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # 2 warmups, then round 1's four slots (A B B A), then Ctrl-C in round 2
    monkeypatch.setattr(execute, "_run_bench", _FakeBench(interrupt_at=7))
    assert main(ab_args) == 130
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["diagnostics"]["stopped_because"] == "interrupted after 1 rounds"
    assert report["diagnostics"]["rounds"] == 1
    assert "interrupted" in capsys.readouterr().err


def test_ab_test_interrupted_before_any_sample_leaves_no_directory(
        ab_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execute, "_run_bench", _FakeBench(interrupt_at=1))  # during the warmup
    assert main(ab_args) == 130
    assert not (tmp_path / "out").exists()


def test_ab_test_with_an_unmeasured_arm_exits_non_zero_after_the_report(
        ab_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(execute, "_run_bench", _FakeBench(fail_arm="B"))
    assert main(ab_args) == UnmeasuredError.exit_code == 9
    err = capsys.readouterr().err.strip()
    assert "could not measure arm B at tg64-t1" in err and "--frobnicate" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verdict"] == "unavailable"
    assert [f["arm"] for f in report["diagnostics"]["failures"]] == ["B"]


def test_ab_test_with_every_arm_measured_exits_0(ab_args: list[str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(execute, "_run_bench", _FakeBench())
    assert main(ab_args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "out")


def _fake_tree(root: Path) -> Path:
    for rel in ("CMakeLists.txt", "include/llama.h"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    (root / "ggml" / "src" / "ggml-cpu").mkdir(parents=True)
    return root


def test_tune_interrupted_writes_learned_json_and_exits_130(
        tmp_path: Path, small_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from amppatch import tune

    build = fake_build(tmp_path / "tunable")
    manifest = tmp_path / "tunable.json"
    manifest.write_text(json.dumps({
        "schema_version": 1, "tunable": True, "builds": {"a": str(build), "b": str(build)}, "line_size": 64,
        "sites": [{"key": "k:0:x", "function": "k", "loop": 0, "stream": "x", "distance_bytes": 1024, "hint": 3,
                   "env": {"distance": "D", "hint": "H"}}]}))

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tune, "tune_site", interrupted)
    out = tmp_path / "tune-out"
    assert main(["tune", "--repo", str(_fake_tree(tmp_path / "tree")), "--model", str(small_gguf),
                 "--tunable-manifest", str(manifest), "-o", str(out)]) == 130
    learned = json.loads((out / "learned.json").read_text())
    assert learned["budget"]["stopped_because"] == "interrupted"


def test_run_interrupted_records_the_stage_and_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from amppatch import run

    def interrupted(self: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run._Runner, "fetch", interrupted)
    out = tmp_path / "run-out"
    assert main(["run", "-o", str(out)]) == 130
    state = json.loads((out / "run-state.json").read_text())
    assert state["stages"]["fetch"]["status"] == "failed" and state["stages"]["fetch"]["error"] == "interrupted"


def test_apply_interrupted_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from amppatch.cli import cmd_apply

    def interrupted(options: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cmd_apply, "apply", interrupted)
    assert main(["apply", "--repo", str(tmp_path), "--site", "f", "--no-build", "-o", str(tmp_path / "o")]) == 130


def test_run_with_an_unmeasured_final_arm_exits_non_zero(tmp_path: Path) -> None:
    from amppatch.report import require_measured

    report = {"diagnostics": {"failures": [{"arm": "tuned", "setting": "tg64-t2", "reason": "cannot run: x"}]}}
    with pytest.raises(UnmeasuredError, match=r"the final ab-test could not measure arm tuned at tg64-t2: cannot"):
        require_measured(report, tmp_path, "the final ab-test")
    require_measured({"diagnostics": {"failures": []}}, tmp_path)  # all measured: no error


def test_tune_refused_after_creating_its_out_leaves_no_directory(tmp_path: Path, small_gguf: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "plain.json"
    manifest.write_text(json.dumps({"schema_version": 1, "tunable": False, "sites": []}))
    out = tmp_path / "tune-out" / "deeper"
    assert main(["tune", "--repo", str(_fake_tree(tmp_path / "tree")), "--model", str(small_gguf),
                 "--tunable-manifest", str(manifest), "-o", str(out)]) == 2
    assert "is not a tunable apply manifest" in capsys.readouterr().err
    assert not (tmp_path / "tune-out").exists()


def test_apply_failing_to_write_leaves_no_empty_out_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # apply removed its branch and files on a full disk but left the -o directory it had created, empty
    import errno

    from amppatch.cli import cmd_apply
    from amppatch.inputs import write_error

    def disk_full(options: object) -> None:
        raise write_error(tmp_path / "o" / "deeper" / "x.json", OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(cmd_apply, "apply", disk_full)
    out = tmp_path / "o" / "deeper"
    assert main(["apply", "--repo", str(tmp_path), "--site", "f", "--no-build", "-o", str(out)]) == 10
    assert not (tmp_path / "o").exists()


def test_ab_test_measures_the_roofline_by_default_and_ctrl_c_during_it_keeps_the_report(
        ab_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from amppatch.limit import KernelRun

    args = [a for a in ab_args if a != "--no-roofline"]
    monkeypatch.setattr(execute, "_run_bench", _FakeBench())
    asked: list[list[int]] = []

    def measured(setup: runner.Setup) -> KernelRun:
        asked.append([s.threads for s in setup.settings])
        return KernelRun((), (), "", str(setup.arms[0].build.dir), ("no kernel in this test",))

    monkeypatch.setattr(runner, "kernel_roofline", measured)
    assert main(args) == 0 and asked == [[1]]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["options"]["roofline"] is True and report["roofline"]["notes"] == ["no kernel in this test"]

    def interrupted(setup: runner.Setup) -> KernelRun:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "kernel_roofline", interrupted)
    assert main([*args, "--force"]) == 130
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["roofline"]["note"] == "not measured (the run was interrupted)"
    assert report["diagnostics"]["rounds"] == 2  # every round done is in the report
