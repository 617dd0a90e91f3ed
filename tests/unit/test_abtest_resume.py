"""ab-test's round checkpoint: an interrupted race goes on where it stopped and ends with exactly the samples
of an uninterrupted one; a checkpoint of another race is never mixed in."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from gguf_files import write_small_gguf

from amppatch import abtest
from amppatch.abtest import AbTestOptions, ArmSpec, Sample, Setting, runner
from amppatch.abtest import checkpoint as ckpt
from amppatch.abtest import execute as execute_mod
from amppatch.abtest.schedule import Slot
from amppatch.errors import UsageError

SPEED = {0: 1.0, 1: 0.9}  # stock, then an arm 10 % faster (shorter samples)


def _build(tmp_path: Path) -> Path:
    build = tmp_path / "build"
    (build / "bin").mkdir(parents=True, exist_ok=True)
    (build / "bin" / "llama-bench").write_text("")
    (build / "manifest.json").write_text(json.dumps({"schema_version": 1, "source_dir": str(build), "key": "k1"}))
    return build


def _options(tmp_path: Path, out: str, **kw: object) -> AbTestOptions:
    build = _build(tmp_path)
    model = tmp_path / "m.gguf"
    if not model.exists():
        write_small_gguf(model, heads=4)
    base = AbTestOptions(arms=(ArmSpec("stock", build), ArmSpec("prefetch", build)), model=model, threads=(1, 2),
                         tokens=16, rounds=4, reps=2, latency="off", llc=False, n_boot=200, out=tmp_path / out)
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No machine probe, no llama-bench warmup; the gate only counts its calls."""
    gates: list[str] = []
    monkeypatch.setattr(runner, "stream_ceiling", lambda: (None, "not measured (test)", None))
    monkeypatch.setattr(execute_mod, "_run_bench", lambda argv, env, timeout, label: {"samples_ns": [10_000_000]})

    def gate(arms: list, options: AbTestOptions) -> list[dict]:
        gates.append(str(options.out))
        return [{"arm": "prefetch", "baseline": "stock", "check": "identical", "status": "passed",
                 "detail": "test gate", "commands": []}]

    monkeypatch.setattr(runner, "_gate_pairs", gate)
    return gates


class Replay:
    """Measures a slot by its arm's speed; optionally interrupted when it reaches round `stop_at`."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.slots: list[Slot] = []

    def __call__(self, slot: Slot, setting: Setting) -> list[int]:
        if self.stop_at is not None and slot.round == self.stop_at:
            raise KeyboardInterrupt
        self.slots.append(slot)
        return [int(10_000_000 * SPEED[slot.arm]) + 1000 * slot.slot + 7 * slot.block] * 2


def test_an_interrupted_race_resumes_to_the_samples_of_an_uninterrupted_one(tmp_path: Path,
                                                                             offline: list[str]) -> None:
    whole = abtest.run_abtest(_options(tmp_path, "whole"), Replay())

    with pytest.raises(KeyboardInterrupt):
        abtest.run_abtest(_options(tmp_path, "cut"), Replay(stop_at=2))
    saved = json.loads((tmp_path / "cut" / ckpt.CHECKPOINT_FILE).read_text())
    assert saved["schema_version"] == 1 and saved["rounds"] == 2
    assert saved["correctness"][0]["status"] == "passed"

    second = Replay()
    resumed = abtest.run_abtest(_options(tmp_path, "cut", resume=True), second)
    assert {s.round for s in second.slots} == {2, 3}  # only the rounds still missing were played
    assert [str(o) for o in offline] == [str(tmp_path / "whole"), str(tmp_path / "cut")]  # no second gate
    assert resumed.samples == whole.samples  # same schedule, same samples, same order
    assert resumed.to_json()["diagnostics"]["resumed_rounds"] == 2
    assert [c.ci95 for c in resumed.comparisons] == [c.ci95 for c in whole.comparisons]
    assert "4 rounds (4 rounds done; the first 2 from an earlier sitting)" in \
        (tmp_path / "cut" / "report.md").read_text()
    assert json.loads((tmp_path / "cut" / ckpt.CHECKPOINT_FILE).read_text())["rounds"] == 4


def test_a_finished_race_goes_on_only_when_given_more(tmp_path: Path, offline: list[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    warmups: list[str] = []
    real_warmup = runner.warmup

    def counted(arms: list, options: AbTestOptions, *rest: object) -> None:
        warmups.append(str(options.out))
        real_warmup(arms, options, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "warmup", counted)
    first = abtest.run_abtest(_options(tmp_path, "done"), Replay())
    same = Replay()
    again = abtest.run_abtest(_options(tmp_path, "done", resume=True), same)
    assert same.slots == [] and again.to_json()["diagnostics"]["stopped_because"] == "4 rounds done"
    assert len(warmups) == 1  # nothing to time, so nothing to warm up: the arms' warmup records are replayed
    assert [a.to_json()["huge_pages"] for a in again.arms] == [a.to_json()["huge_pages"] for a in first.arms]
    assert again.to_json()["diagnostics"]["resumed_seconds"] > 0
    more = Replay()
    longer = abtest.run_abtest(_options(tmp_path, "done", resume=True, rounds=6), more)
    assert {s.round for s in more.slots} == {4, 5} and longer.to_json()["diagnostics"]["rounds"] == 6
    assert len(warmups) == 2  # rounds to time: warmed up in this sitting
    whole = abtest.run_abtest(_options(tmp_path, "whole", rounds=6), Replay())
    assert longer.samples == whole.samples


def test_the_time_limit_waits_for_min_rounds(tmp_path: Path) -> None:
    comps = [{"ratio": 1.5, "ci95": [0.9, 2.5], "verdict": "inconclusive"}]
    kw: dict = {"all_failed": False, "rounds": None, "max_time": 600.0, "elapsed": 700.0, "round_seconds": 300.0}
    assert abtest.stop_rule(2, comps, **kw) is not None  # the default: two rounds, then time
    assert abtest.stop_rule(2, comps, **kw, min_rounds=5) is None
    assert abtest.stop_rule(5, comps, **kw, min_rounds=5) is not None
    with pytest.raises(UsageError, match="--min-rounds must be at least 2"):
        abtest.validate(_options(tmp_path, "o", min_rounds=1))


def test_a_race_that_will_outlast_its_time_limit_says_so_once(tmp_path: Path, offline: list[str],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    kw: dict = {"max_time": 2400.0, "min_rounds": 5}
    note = runner.overrun_note(1, elapsed=3670.0, round_seconds=3600.0, **kw)
    assert note is not None and "~60 min here" in note and "5 rounds" in note and "~301 min" in note
    assert "40 min limit" in note
    assert runner.overrun_note(1, elapsed=60.0, round_seconds=60.0, **kw) is None  # five rounds fit
    assert runner.overrun_note(5, elapsed=9e4, round_seconds=3600.0, **kw) is None  # the limit stops it now
    assert runner.overrun_note(1, elapsed=9e4, round_seconds=3600.0, max_time=None, min_rounds=5) is None

    replay = Replay()
    abtest.run_abtest(_options(tmp_path, "slow", rounds=None, max_time=1e-6, min_rounds=5), replay)
    assert {s.round for s in replay.slots} == {0, 1, 2, 3, 4}
    assert capsys.readouterr().err.count("the race goes on") == 1


def test_a_checkpoint_of_another_race_is_not_used(tmp_path: Path, offline: list[str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(KeyboardInterrupt):
        abtest.run_abtest(_options(tmp_path, "cut"), Replay(stop_at=1))
    fresh = Replay()
    abtest.run_abtest(_options(tmp_path, "cut", resume=True, reps=3), fresh)
    assert {s.round for s in fresh.slots} == {0, 1, 2, 3}
    assert "belongs to another race (it differs in reps): starting the race from round 1" in capsys.readouterr().err
    assert len(offline) == 2  # the fresh race is gated again


def test_without_resume_the_checkpoint_is_written_but_not_read(tmp_path: Path, offline: list[str]) -> None:
    with pytest.raises(KeyboardInterrupt):
        abtest.run_abtest(_options(tmp_path, "cut"), Replay(stop_at=1))
    again = Replay()
    abtest.run_abtest(_options(tmp_path, "cut"), again)
    assert {s.round for s in again.slots} == {0, 1, 2, 3}


def test_load_says_why_a_checkpoint_is_not_used(tmp_path: Path) -> None:
    fp = {"arms": [], "model": {"size": 1}, "settings": ["tg16-t1"], "reps": 3, "seed": 0}
    assert ckpt.load(tmp_path, fp) == (None, f"no rounds.json in {tmp_path}: starting the race from round 1")
    (tmp_path / ckpt.CHECKPOINT_FILE).write_text("{not json")
    checkpoint, why = ckpt.load(tmp_path, fp)
    assert checkpoint is None and "is unreadable" in why
    sample = Sample(0, 0, 1, "prefetch", "tg16-t1", 0, 9_000_000, 16)
    record = ckpt.Checkpoint(fp, 1, 12.5, (sample,), {("prefetch", "pp64-t1"): "cannot run"},
                             ({"status": "passed"},), {("stock", "tg16-t1"): [1.0, 2.0]})
    assert ckpt.Checkpoint.from_json(json.loads(json.dumps(record.to_json()))) == record
    ckpt.save(tmp_path, record)
    assert ckpt.load(tmp_path, fp) == (record, f"resuming after 1 round(s) recorded in {tmp_path / 'rounds.json'}")
    _, why = ckpt.load(tmp_path, {**fp, "seed": 1, "reps": 2})
    assert "differs in reps, seed" in why


def test_resume_needs_the_directory_and_may_replace_its_partial_report(tmp_path: Path, small_gguf: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from amppatch.cli import main

    argv = ["ab-test", "--a", str(tmp_path / "none"), "--b", str(tmp_path / "none"), "-m", str(small_gguf)]
    assert main([*argv, "--resume"]) == 2
    assert "--resume needs -o" in capsys.readouterr().err
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    assert main([*argv, "-o", str(out), "--resume"]) == 2  # a finished race: nothing to resume
    assert "already holds a result" in capsys.readouterr().err
    (out / ckpt.CHECKPOINT_FILE).write_text("{}")  # the partial report of an interrupted race
    assert main([*argv, "-o", str(out), "--resume"]) == 2
    assert "not a finished amppatch build" in capsys.readouterr().err  # past the -o check, stopped at the arms
