"""tune's probe batches resume: a rerun of an interrupted tune replays every batch it had measured from that
batch's checkpoint (no llama-bench call, the same CI), charges the time it took then to the budget, measures
afresh a batch that asks something else, and a finished tune removes the batches it did not reach."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from abtest_fakes import fake_build

from amppatch.abtest import execute, runner
from amppatch.tune import Budget, Candidate, TuneOptions
from amppatch.tune.probing import _Prober

SITE = {"key": "ggml_vec_dot_q8_0_q8_0#0 x[ib]", "function": "ggml_vec_dot_q8_0_q8_0", "distance_bytes": 2048,
        "hint": 3, "env": {"distance": "AMPPATCH_D0", "hint": "AMPPATCH_H0"}}


class FakeBench:
    """llama-bench by its environment: the site on (any hint but -1) is 10 % faster; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, argv: list[str], env: dict[str, str], timeout: float, label: str) -> dict[str, Any]:
        self.calls += 1
        reps = int(argv[argv.index("-r") + 1])
        base = 10_000_000 if env.get("AMPPATCH_H0") == "-1" else 9_000_000
        return {"samples_ns": [base + 1000 * ((self.calls * 7 + i) % 5) for i in range(reps)]}


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> FakeBench:
    fake = FakeBench()
    monkeypatch.setattr(execute, "_run_bench", fake)
    monkeypatch.setattr(runner, "stream_ceiling", lambda: (None, "not measured (test)", None))
    return fake


class StillClock:
    """A budget clock that does not move by itself: only what the budget is charged counts as spent."""

    def __call__(self) -> float:
        return 100.0


def _prober(tmp_path: Path, small_gguf: Path, *, resume: bool = True) -> _Prober:
    options = TuneOptions(repo=tmp_path, model=small_gguf, out=tmp_path / "tune", probe_tokens=8, probe_reps=2,
                          bench_args=(), resume=resume)
    build = tmp_path / "build"
    if not build.exists():
        fake_build(build)
    return _Prober(options, build, [SITE], Budget(600.0, clock=StillClock()))


def test_a_rerun_replays_the_batches_already_measured_and_charges_their_time(
        tmp_path: Path, small_gguf: Path, bench: FakeBench) -> None:
    batch = [Candidate(2048, 3), Candidate(4096, 0)]
    first = _prober(tmp_path, small_gguf)
    measured = first(batch, 1, 3, "coarse")
    assert bench.calls > 0 and first.budget.spent() == 0.0  # a live batch spends on the clock, which stood still

    bench.calls = 0
    rerun = _prober(tmp_path, small_gguf)
    replayed = rerun(batch, 1, 3, "coarse")
    assert bench.calls == 0  # no llama-bench call: every round came from the batch's rounds.json
    assert [(r.candidate, r.ratio, r.ci95, r.verdict) for r in replayed] == \
        [(r.candidate, r.ratio, r.ci95, r.verdict) for r in measured]
    assert replayed[0].ratio is not None and replayed[0].ratio > 1.05
    report = Path(replayed[0].extra["report"], "report.json").read_text()
    assert '"resumed_rounds": 3' in report
    assert rerun.budget.spent() > 0.0  # the earlier sitting's time, charged as if spent now
    assert rerun.budget.spent() == pytest.approx(float(json.loads(report)["diagnostics"]["resumed_seconds"]))
    assert rerun.budget.lock_waited == 0.0  # a replay is no wait for the lock (learned.json reports this)


def test_without_resume_a_rerun_measures_again(tmp_path: Path, small_gguf: Path, bench: FakeBench) -> None:
    _prober(tmp_path, small_gguf)([Candidate(2048, 3)], 1, 3, "coarse")
    bench.calls = 0
    again = _prober(tmp_path, small_gguf, resume=False)
    again([Candidate(2048, 3)], 1, 3, "coarse")
    assert bench.calls > 0 and again.budget.spent() == 0.0


def test_a_batch_that_asks_something_else_is_measured_afresh(tmp_path: Path, small_gguf: Path,
                                                              bench: FakeBench) -> None:
    _prober(tmp_path, small_gguf)([Candidate(2048, 3)], 1, 3, "coarse")
    bench.calls = 0
    other = _prober(tmp_path, small_gguf)
    result = other([Candidate(8192, 0)], 1, 3, "coarse")  # same directory, other arms: not the same batch
    assert bench.calls > 0 and result[0].candidate == Candidate(8192, 0)
    assert other.budget.spent() == 0.0


def test_a_finished_search_removes_the_batches_it_did_not_reach(tmp_path: Path, small_gguf: Path,
                                                                 bench: FakeBench) -> None:
    longer = _prober(tmp_path, small_gguf)
    longer([Candidate(2048, 3)], 1, 2, "coarse")
    longer([Candidate(2048, 3)], 1, 2, "confirm")
    shorter = _prober(tmp_path, small_gguf)
    shorter([Candidate(2048, 3)], 1, 2, "coarse")
    (shorter.probe_dir / "notes").mkdir()  # not a batch's directory: never removed
    stale = shorter.remove_unreached()
    assert [d.name for d in stale] == ["002-site0-confirm-t1"]
    assert sorted(d.name for d in shorter.probe_dir.iterdir()) == ["001-site0-coarse-t1", "notes"]
    assert shorter.remove_unreached() == []
