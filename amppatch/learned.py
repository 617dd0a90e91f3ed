"""`Learned`: the typed result of `amppatch tune`, and the one reader and writer of its learned.json.

`tune` returns it (inside `TuneResult`); `apply --learned` and `amppatch run` read a file back only through
`Learned.read`/`Learned.from_json`, which check it with the shared checker (`amppatch.inputs.LEARNED`).
`to_json()` gives the document with the keys in the order they were written or read, so
`Learned.from_json(doc).to_json() == doc`: fields the readers use are typed, the rest rides along unchanged.
Schema 2 (kernel shares, the budget split, the joint verification) and schema 1 are both read; `joint` is
None for a schema-1 file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amppatch.inputs import LEARNED, check_json, read_json
from amppatch.jsondoc import ordered, rest_of


@dataclass(frozen=True)
class Winner:
    """A kept site (`winners[]`): where it is and the distance and hint tune chose."""

    function: str
    distance_bytes: int
    hint: int
    key: str | None = None
    loop: Any = None
    stream: str | None = None
    order: tuple[str, ...] = ()
    rest: dict[str, Any] = field(default_factory=dict)

    _TYPED = ("function", "distance_bytes", "hint", "key", "loop", "stream")

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Winner:
        return cls(doc["function"], doc["distance_bytes"], doc["hint"], doc.get("key"), doc.get("loop"),
                   doc.get("stream"), tuple(doc), rest_of(doc, cls._TYPED))

    def get(self, key: str, default: Any = None) -> Any:
        """Any field of the document (e.g. `ratio`, `ci95`)."""
        return self.to_json().get(key, default)

    def to_json(self) -> dict[str, Any]:
        return ordered(self.order, {"function": self.function, "distance_bytes": self.distance_bytes,
                                    "hint": self.hint, "key": self.key, "loop": self.loop, "stream": self.stream},
                       self.rest)


@dataclass(frozen=True)
class Learned:
    """learned.json (tune's result) as typed fields; `path` is the file."""

    schema_version: int
    winners: tuple[Winner, ...]
    dropped: tuple[dict[str, Any], ...]
    sites: tuple[dict[str, Any], ...]
    probes: tuple[dict[str, Any], ...]
    budget: dict[str, Any]
    options: dict[str, Any]
    base_commit: str | None = None
    joint: dict[str, Any] | None = None  # the kept set raced against every site off (schema 2)
    path: Path | None = None
    order: tuple[str, ...] = ()
    rest: dict[str, Any] = field(default_factory=dict)

    _TYPED = ("schema_version", "winners", "dropped", "sites", "probes", "budget", "options", "base_commit", "joint")

    @classmethod
    def from_json(cls, doc: Any, path: Path | None = None) -> Learned:
        """The result of a learned.json document, checked as `amppatch.inputs.LEARNED` (a UsageError naming
        the file otherwise)."""
        doc = check_json(doc, Path(path or "learned.json"), LEARNED)
        return cls(doc["schema_version"], tuple(Winner.from_json(w) for w in doc["winners"]),
                   tuple(doc.get("dropped") or ()), tuple(doc.get("sites") or ()), tuple(doc.get("probes") or ()),
                   dict(doc.get("budget") or {}), dict(doc.get("options") or {}), doc.get("base_commit"),
                   doc.get("joint"), path, tuple(doc), rest_of(doc, cls._TYPED))

    @classmethod
    def read(cls, path: Path) -> Learned:
        return cls.from_json(read_json(path, LEARNED), Path(path))

    def to_json(self) -> dict[str, Any]:
        typed = {"schema_version": self.schema_version, "winners": [w.to_json() for w in self.winners],
                 "dropped": list(self.dropped), "sites": list(self.sites), "probes": list(self.probes),
                 "budget": self.budget, "options": self.options, "base_commit": self.base_commit,
                 "joint": self.joint}
        return ordered(self.order, typed, self.rest)

    def kernel_rows(self) -> list[dict[str, Any]]:
        """One row per kernel (function), hottest first: its sample share and, per site, the setting kept or
        the reason it was dropped, and its own contribution (its confirming ratio against the site off, with
        the CI). A schema-1 file has no shares; its contribution is the evidence at the tuning count."""
        threads = str(self.rest.get("threads") or self.options.get("threads") or 1)
        rows: dict[str, dict[str, Any]] = {}
        for s in self.sites:
            function = str(s.get("function"))
            row = rows.setdefault(function, {"function": function, "share": s.get("share"), "sites": []})
            own = s.get("contribution") or (s.get("evidence") or {}).get(threads) or {}
            winner = s.get("winner") if s.get("kept") else None
            row["sites"].append({
                "key": s.get("key"), "loop": s.get("loop"), "stream": s.get("stream"), "kept": bool(s.get("kept")),
                "distance_bytes": winner.get("distance_bytes") if winner else None,
                "hint": winner.get("hint") if winner else None, "dropped_by": s.get("dropped_by"),
                "reason": s.get("reason"), "ratio": own.get("ratio"), "ci95": own.get("ci95")})
        return sorted(rows.values(), key=lambda r: -r["share"] if isinstance(r["share"], int | float) else 1.0)

    def dumps(self) -> str:
        """learned.json's text."""
        return json.dumps(self.to_json(), indent=1) + "\n"
