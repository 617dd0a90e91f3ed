"""`RunStateDoc`: the typed run-state.json of `amppatch run`, one `StageRecord` per stage.

`amppatch run` reads the file only through `RunStateDoc.read`/`RunStateDoc.from_json`, which check it with the
shared checker (`amppatch.inputs.RUN_STATE`) and refuse a stage record that is not one. `to_json()` gives the
document with the keys in the order they were written or read, so `RunStateDoc.from_json(doc).to_json() == doc`
and a state saved again is the same bytes; `path` is the file, not part of the document.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amppatch import __version__
from amppatch.errors import UsageError
from amppatch.inputs import RUN_STATE, check_json, read_json
from amppatch.jsondoc import ordered, rest_of

SCHEMA_VERSION = 1
# The stages of `amppatch run`, in order; a stage's key covers the records of every stage before it.
STAGES = ("fetch", "build", "model", "profile", "apply", "tune", "bake", "final", "report")


def outputs_exist(outputs: Mapping[str, Any]) -> bool:
    """Every path an output names (keys listed under `paths`) still exists."""
    return all(Path(p).exists() for p in outputs.get("paths", []))


@dataclass(frozen=True)
class StageRecord:
    """One stage's record (`stages.NAME`): status, key, outputs, seconds, when it finished, its error."""

    status: str | None = None
    key: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    finished_utc: str | None = None
    error: str | None = None
    order: tuple[str, ...] = ()
    rest: dict[str, Any] = field(default_factory=dict)

    _TYPED = ("status", "key", "outputs", "seconds", "finished_utc", "error")

    @classmethod
    def from_json(cls, doc: Any, path: Path, name: str) -> StageRecord:
        """The record of stage `name` in the file `path`; a UsageError naming both if it is not a record."""
        if not isinstance(doc, dict) or not isinstance(doc.get("outputs", {}), dict) \
                or not isinstance(doc.get("outputs", {}).get("paths", []), list):
            raise UsageError(f"{path} is damaged: its record of stage {name!r} is not a stage record",
                             next_step=RUN_STATE.next_step)
        return cls(doc.get("status"), doc.get("key"), doc.get("outputs", {}), doc.get("seconds"),
                   doc.get("finished_utc"), doc.get("error"), tuple(doc), rest_of(doc, cls._TYPED))

    def to_json(self) -> dict[str, Any]:
        return ordered(self.order, {"status": self.status, "key": self.key, "outputs": self.outputs,
                                    "seconds": self.seconds, "finished_utc": self.finished_utc,
                                    "error": self.error}, self.rest)


@dataclass
class RunStateDoc:
    """run-state.json as typed fields; `stages` keeps the stages in the order they were recorded."""

    schema_version: int = SCHEMA_VERSION
    tool_version: str | None = __version__
    stages: dict[str, StageRecord] = field(default_factory=dict)
    options: dict[str, Any] | None = None
    path: Path | None = None
    order: tuple[str, ...] = ("schema_version", "tool_version", "stages", "options")
    rest: dict[str, Any] = field(default_factory=dict)

    _TYPED = ("schema_version", "tool_version", "stages", "options")

    @classmethod
    def from_json(cls, doc: Any, path: Path | None = None) -> RunStateDoc:
        """The state of a run-state.json document, checked as `amppatch.inputs.RUN_STATE` (a UsageError
        naming the file otherwise)."""
        where = Path(path or "run-state.json")
        doc = check_json(doc, where, RUN_STATE)
        stages = {name: StageRecord.from_json(rec, where, name) for name, rec in doc["stages"].items()}
        return cls(doc["schema_version"], doc.get("tool_version"), stages, doc.get("options"), path, tuple(doc),
                   rest_of(doc, cls._TYPED))

    @classmethod
    def read(cls, path: Path) -> RunStateDoc:
        return cls.from_json(read_json(path, RUN_STATE), Path(path))

    def set_options(self, options: dict[str, Any]) -> None:
        """This run's options replace the recorded ones (in their place, or last if there were none)."""
        self.options = options
        if "options" not in self.order:
            self.order = (*self.order, "options")

    def to_json(self) -> dict[str, Any]:
        typed = {"schema_version": self.schema_version, "tool_version": self.tool_version,
                 "stages": {name: rec.to_json() for name, rec in self.stages.items()}, "options": self.options}
        return ordered(self.order, typed, self.rest)

    def dumps(self) -> str:
        """run-state.json's text."""
        return json.dumps(self.to_json(), indent=1, default=str) + "\n"
