"""`ApplyManifest`: the typed `<id>.json` that `amppatch apply` writes beside `<id>.patch`, and its one reader.

`apply()` returns it inside `ApplyResult`; tune, `amppatch run` and the bench use its fields instead of
re-reading the file, and a file is read back only through `ApplyManifest.read`/`.from_json` (checked by the
shared checker, `amppatch.inputs.APPLY_MANIFEST`). `to_json()` gives the document with the keys in the order
they were written or read, so `ApplyManifest.from_json(doc).to_json() == doc`; `path` (the file) is not part
of the document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amppatch.errors import UsageError
from amppatch.inputs import APPLY_MANIFEST, check_json, read_json
from amppatch.jsondoc import ordered, rest_of


@dataclass(frozen=True)
class ApplyManifest:
    """An apply manifest as typed fields; `path` is the file it was written to or read from."""

    schema_version: int
    sites: tuple[dict[str, Any], ...]
    files: tuple[dict[str, Any], ...] = ()
    id: str | None = None
    branch: str | None = None
    base_commit: str | None = None
    commit: str | None = None
    repo: str | None = None
    tunable: bool = False
    line_size: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    skipped: tuple[dict[str, Any], ...] = ()
    warnings: tuple[str, ...] = ()
    patch: str | None = None
    builds: dict[str, str] = field(default_factory=dict)
    gate: dict[str, Any] | None = None
    # the levers the patch carries (["hugepages"]); absent in manifests written before levers existed
    levers: tuple[str, ...] = ()
    # the huge-page lever's measured record: thp_enabled, status (verified | small-pages | thp-never |
    # not-measured), share_a, share_b, huge_bytes_b, weight_bytes, note; None without the lever
    hugepages: dict[str, Any] | None = None
    path: Path | None = None
    order: tuple[str, ...] = ()
    rest: dict[str, Any] = field(default_factory=dict)

    _TYPED = ("schema_version", "sites", "files", "id", "branch", "base_commit", "commit", "repo", "tunable",
              "line_size", "options", "skipped", "warnings", "patch", "builds", "gate", "levers", "hugepages")

    @classmethod
    def from_json(cls, doc: Any, path: Path | None = None) -> ApplyManifest:
        """The manifest of a `<id>.json` document, checked as `amppatch.inputs.APPLY_MANIFEST` (a UsageError
        naming the file otherwise)."""
        doc = check_json(doc, Path(path or "manifest.json"), APPLY_MANIFEST)
        levers, hugepages = doc.get("levers") or [], doc.get("hugepages")
        if not isinstance(levers, list) or not all(isinstance(n, str) for n in levers) or not (
                hugepages is None or isinstance(hugepages, dict)):
            raise UsageError(f"{path or 'manifest.json'} is not an apply manifest: `levers` must be a list of "
                             "lever names and `hugepages` an object", next_step=APPLY_MANIFEST.next_step)
        return cls(doc["schema_version"], tuple(doc["sites"]), tuple(doc.get("files") or ()), doc.get("id"),
                   doc.get("branch"), doc.get("base_commit"), doc.get("commit"), doc.get("repo"),
                   doc.get("tunable", False), doc.get("line_size"), dict(doc.get("options") or {}),
                   tuple(doc.get("skipped") or ()), tuple(doc.get("warnings") or ()), doc.get("patch"),
                   dict(doc.get("builds") or {}), doc.get("gate"), tuple(doc.get("levers") or ()),
                   doc.get("hugepages"), None if path is None else Path(path), tuple(doc), rest_of(doc, cls._TYPED))

    @classmethod
    def read(cls, path: Path) -> ApplyManifest:
        path = Path(path).expanduser()
        return cls.from_json(read_json(path, APPLY_MANIFEST), path)

    def to_json(self) -> dict[str, Any]:
        typed = {
            "schema_version": self.schema_version, "sites": list(self.sites), "files": list(self.files),
            "id": self.id, "branch": self.branch, "base_commit": self.base_commit, "commit": self.commit,
            "repo": self.repo, "tunable": self.tunable, "line_size": self.line_size, "options": self.options,
            "skipped": list(self.skipped), "warnings": list(self.warnings), "patch": self.patch,
            "builds": self.builds, "gate": self.gate, "levers": list(self.levers), "hugepages": self.hugepages,
        }
        return ordered(self.order, typed, self.rest)  # keys the document lacked stay absent

    def dumps(self) -> str:
        """The manifest's text, as apply writes it."""
        return json.dumps(self.to_json(), indent=2, default=str) + "\n"

    @property
    def build_a(self) -> str | None:
        return self.builds.get("a")

    @property
    def build_b(self) -> str | None:
        return self.builds.get("b")
