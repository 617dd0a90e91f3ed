"""run-state.json records that are not stage records are refused in one line, never an AttributeError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amppatch.errors import UsageError
from amppatch.run import RunState


@pytest.mark.parametrize("stages", [{"fetch": 5}, {"build": [1]}, {"model": {"outputs": "x"}},
                                    {"tune": {"outputs": {"paths": "a"}}}])
def test_a_damaged_stage_record_is_refused(tmp_path: Path, stages: dict) -> None:
    path = tmp_path / "run-state.json"
    path.write_text(json.dumps({"schema_version": 1, "stages": stages}))
    with pytest.raises(UsageError, match="is damaged: its record of stage"):
        RunState(path, {})


def test_a_whole_record_is_read(tmp_path: Path) -> None:
    path = tmp_path / "run-state.json"
    rec = {"status": "done", "key": "k", "outputs": {"paths": [str(path)]}, "finished_utc": "t"}
    path.write_text(json.dumps({"schema_version": 1, "stages": {"fetch": rec}}))
    reused = RunState(path, {}).reusable("fetch", "k")
    assert reused is not None and reused.to_json() == rec


def _realistic_state() -> dict:
    """A run-state.json document built from a recorded run's summary (its stages and options)."""
    run = json.loads((Path(__file__).parents[2] / "docs/runs/2026-11-27-main/run.json").read_text())
    return {"schema_version": 1, "tool_version": "0.0.0-test", "stages": run["stages"], "options": run["options"]}


def test_a_realistic_state_round_trips_to_the_same_bytes(tmp_path: Path) -> None:
    from amppatch.runstate import RunStateDoc

    doc = _realistic_state()
    assert len(doc["stages"]) >= 8
    assert RunStateDoc.from_json(doc).to_json() == doc
    path = tmp_path / "run-state.json"
    text = json.dumps(doc, indent=1, default=str) + "\n"
    path.write_text(text)
    state = RunState(path, doc["options"])
    assert state.stages["tune"].status == "done" and state.stages["fetch"].outputs["paths"]
    state.save()
    assert path.read_text() == text


def test_unknown_keys_and_missing_fields_ride_along(tmp_path: Path) -> None:
    from amppatch.runstate import RunStateDoc

    doc = {"stages": {"fetch": {"key": "k", "extra": [1], "status": "done"}}, "note": "x", "schema_version": 1}
    back = RunStateDoc.from_json(doc).to_json()
    assert back == doc and list(back) == list(doc) and list(back["stages"]["fetch"]) == ["key", "extra", "status"]
    path = tmp_path / "run-state.json"
    path.write_text(json.dumps(doc))
    state = RunState(path, {"shape": "tiny"})
    state.record("build", "b", "done", {"paths": []}, 1.04)
    saved = json.loads(path.read_text())
    assert list(saved) == ["stages", "note", "schema_version", "options"] and saved["options"] == {"shape": "tiny"}
    assert list(saved["stages"]) == ["fetch", "build"] and saved["stages"]["fetch"] == doc["stages"]["fetch"]
    assert list(saved["stages"]["build"]) == ["status", "key", "outputs", "seconds", "finished_utc", "error"]
    assert saved["stages"]["build"]["seconds"] == 1.0


def test_a_new_state_lists_its_keys_in_the_written_order(tmp_path: Path) -> None:
    from amppatch import __version__

    state = RunState(tmp_path / "run-state.json", {"quick": True})
    state.record("fetch", "k", "failed", {}, 0.0, "interrupted")
    saved = json.loads((tmp_path / "run-state.json").read_text())
    assert list(saved) == ["schema_version", "tool_version", "stages", "options"]
    assert saved["tool_version"] == __version__ and saved["stages"]["fetch"]["error"] == "interrupted"
