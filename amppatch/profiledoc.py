"""`Profile`: the typed profile.json of `amppatch profile`, and the one reader of the file.

`profile()` returns it (inside `ProfileResult`); apply's `sites_from_profile`, `amppatch run` and the bench use
its typed sites (`ProfileSite`) instead of a dict, and a file is read back only through
`Profile.read`/`Profile.from_json`, checked with the shared checker (`amppatch.inputs.PROFILE`). `to_json()`
gives the document with the keys in the order they were written or read, so `Profile.from_json(doc).to_json()
== doc`: fields the readers use are typed, the rest rides along unchanged. It lives outside the `profile`
package so readers need not import the profiler (numpy) to read a file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amppatch.inputs import PROFILE, check_json, read_json
from amppatch.jsondoc import ordered, rest_of
from amppatch.limit import ModelRoofline
from amppatch.weightpages import WeightPages


@dataclass(frozen=True)
class ProfileSite:
    """A derived prefetch site (`sites[]`): where it is, the distance and hint derived, and their inputs."""

    function: str
    loop: Any = None
    stream: str | None = None
    distance_bytes: int | None = None
    hint: int | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = ()
    rest: dict[str, Any] = field(default_factory=dict)

    _TYPED = ("function", "loop", "stream", "distance_bytes", "hint", "inputs")

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ProfileSite:
        return cls(doc["function"], doc.get("loop"), doc.get("stream"), doc.get("distance_bytes"), doc.get("hint"),
                   dict(doc.get("inputs") or {}), tuple(doc), rest_of(doc, cls._TYPED))

    def has(self, key: str) -> bool:
        """Whether the document gave `key` (a value built without one has every typed key)."""
        return key in self.order if self.order else key in self._TYPED or key in self.rest

    def get(self, key: str, default: Any = None) -> Any:
        """Any field of the document (e.g. `share`, `file`, `loop_line`)."""
        return self.to_json().get(key, default)

    @property
    def share(self) -> float | None:
        return self.rest.get("share")

    def to_json(self) -> dict[str, Any]:
        return ordered(self.order, {"function": self.function, "loop": self.loop, "stream": self.stream,
                                    "distance_bytes": self.distance_bytes, "hint": self.hint,
                                    "inputs": self.inputs}, self.rest)


@dataclass(frozen=True)
class Profile:
    """profile.json as typed fields; `path` is the file (not part of the document)."""

    schema_version: int
    sites: tuple[ProfileSite, ...]
    options: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    hot_functions: tuple[dict[str, Any], ...] = ()
    notes: tuple[str, ...] = ()
    path: Path | None = None
    order: tuple[str, ...] = ()
    rest: dict[str, Any] = field(default_factory=dict)

    _TYPED = ("schema_version", "sites", "options", "machine", "hot_functions", "notes")

    @classmethod
    def from_json(cls, doc: Any, path: Path | None = None) -> Profile:
        """The profile of a profile.json document, checked as `amppatch.inputs.PROFILE` (a UsageError naming
        the file otherwise)."""
        doc = check_json(doc, Path(path or "profile.json"), PROFILE)
        return cls(doc["schema_version"], tuple(ProfileSite.from_json(s) for s in doc["sites"]),
                   dict(doc.get("options") or {}), dict(doc.get("machine") or {}),
                   tuple(doc.get("hot_functions") or ()), tuple(doc.get("notes") or ()),
                   None if path is None else Path(path), tuple(doc), rest_of(doc, cls._TYPED))

    @classmethod
    def read(cls, path: Path) -> Profile:
        path = Path(path).expanduser()
        return cls.from_json(read_json(path, PROFILE), path)

    def get(self, key: str, default: Any = None) -> Any:
        """Any top-level section of the document (e.g. `tokens`, `visibility`, `perf`)."""
        return self.to_json().get(key, default)

    def to_json(self) -> dict[str, Any]:
        typed = {"schema_version": self.schema_version, "sites": [s.to_json() for s in self.sites],
                 "options": self.options, "machine": self.machine, "hot_functions": list(self.hot_functions),
                 "notes": list(self.notes)}
        return ordered(self.order, typed, self.rest)  # keys the document lacked stay absent

    def dumps(self) -> str:
        """profile.json's text, as `amppatch profile` writes it (no final newline)."""
        return json.dumps(self.to_json(), indent=2, default=str)

    @property
    def cpu_model(self) -> str | None:
        return self.machine.get("cpu_model")

    @property
    def roofline(self) -> ModelRoofline | None:
        """The roofline of the model's weight kernels (None: a profile written before it was measured)."""
        doc = self.rest.get("roofline")
        return ModelRoofline.from_json(doc) if isinstance(doc, dict) else None

    @property
    def huge_pages(self) -> WeightPages | None:
        """How much of the model file sat on huge pages in the profiled run (None: no model, or an older file)."""
        doc = self.rest.get("huge_pages")
        return WeightPages.from_json(doc) if isinstance(doc, dict) else None
