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
    assert RunState(path, {}).reusable("fetch", "k") == rec
