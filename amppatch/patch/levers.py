"""Levers: whole-program edits that `apply` commits beside (or instead of) prefetch sites — today the huge-page
lever (`amppatch.pages`). What the request id, the commit message and the export check need to know about a
lever lives here, pure: its name, its marker, its templates' digest, the commit message's line for it, the
manifest's file entry for it, and the check that an exported patch carries exactly the lever lines its manifest
claims. (The edit itself is made by the lever's own module; `pages.hugepages_lever` returns a `LeverEdit`.)"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from amppatch.patch.render import FileChange
from amppatch.source.loops import MARKER_WORD

if TYPE_CHECKING:
    from amppatch.patch.gitrepo import PatchFile

HUGEPAGES = "hugepages"
LEVERS = (HUGEPAGES,)
# what the commit message says each lever does (one line each, after the sites)
_DOES = {HUGEPAGES: "the mmapped weights on file-backed transparent huge pages (AMPPATCH_HUGEPAGES=0 or THP "
                    "'never': the stock mapping)"}
MESSAGE_PREFIX = "Lever: "
_LEVER_LINE = re.compile(rf"{re.escape(MARKER_WORD)} ({'|'.join(map(re.escape, LEVERS))})\b(?![-_])")


def lever_marker(name: str) -> str:
    """The text that tags the lever's inserted lines (and makes a second apply a no-op)."""
    return f"{MARKER_WORD} {name}"


def lever_of(line: str) -> str | None:
    """The lever whose marker `line` carries, or None (a prefetch line or stock code)."""
    m = _LEVER_LINE.search(line)
    return m.group(1) if m else None


def lever_templates_digest(names: Sequence[str]) -> str:
    """Hash of the templates of the levers `names` (`<name>_*.j2`): the code a lever adds changes with them."""
    root = resources.files("amppatch") / "templates"
    h = hashlib.sha256()
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".j2") and any(entry.name.startswith(f"{n}_") for n in sorted(names)):
            h.update(entry.name.encode() + b"\0" + entry.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def is_lever_template(name: str) -> bool:
    return any(name.startswith(f"{lever}_") for lever in LEVERS)


def added_digest(added: Mapping[int, str]) -> str:
    """sha256 of the added lines of one file, in line order (what the manifest pins a lever's code with)."""
    text = "\n".join(added[n] for n in sorted(added))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class LeverEdit:
    """One lever's edit of the tree: its file change and what its rendering depends on (`where`: file, line,
    the call's arguments), which the request id covers so a changed analysis never reuses an old branch."""

    name: str
    change: FileChange
    where: dict[str, Any]

    def message_line(self) -> str:
        at = f"{self.where.get('file', self.change.relpath)}:{self.where.get('line', '?')}"
        return f"{MESSAGE_PREFIX}{self.name} ({at}): {_DOES.get(self.name, self.name)}"

    def added(self) -> dict[int, str]:
        lines = self.change.after.decode(errors="replace").splitlines()
        return {n: lines[n - 1] for n in self.change.inserted_lines}

    def file_entry(self) -> dict[str, Any]:
        """The manifest's `files` entry of the lever's file."""
        return {"path": self.change.relpath, "inserted_lines": self.change.inserted_lines, "lever": self.name,
                "added_sha256": added_digest(self.added())}


def check_levers(message: list[str], files: Mapping[str, PatchFile], manifest: dict) -> list[str]:
    """What the patch and the manifest disagree on about levers (pure; empty = consistent): the manifest's
    `levers`, the commit message's `Lever:` lines, each lever's file entry, its marker lines in the patch and
    the digest of every line the patch adds to that file. A lever line the manifest does not list is refused."""
    problems: list[str] = []
    listed = list(manifest.get("levers") or [])
    unknown = [n for n in listed if n not in LEVERS]
    if unknown:
        problems.append(f"the manifest lists unknown lever(s) {unknown} (known: {list(LEVERS)})")
    said = sorted(line[len(MESSAGE_PREFIX):].split(" ", 1)[0] for line in message if line.startswith(MESSAGE_PREFIX))
    if said != sorted(listed):
        problems.append(f"the commit message names lever(s) {said}, the manifest {sorted(listed)}")
    marked: dict[str, set[str]] = {}
    for path, pf in files.items():
        for line in pf.added.values():
            name = lever_of(line)
            if name is not None:
                marked.setdefault(name, set()).add(path)
    for name in sorted(set(marked) - set(listed)):
        problems.append(f"the patch adds lines of lever {name} in {sorted(marked[name])}, the manifest lists no "
                        "such lever")
    entries = [f for f in manifest.get("files", []) if f.get("lever")]
    for entry in entries:
        if entry.get("lever") not in listed:
            problems.append(f"the manifest's file {entry.get('path')} belongs to lever {entry.get('lever')}, "
                            "which its `levers` does not list")
    for name in listed:
        mine = [f for f in entries if f.get("lever") == name]
        if len(mine) != 1:
            problems.append(f"the manifest gives lever {name} {len(mine)} file(s), not one")
            continue
        path = str(mine[0].get("path"))
        if not any(line.startswith(f"{MESSAGE_PREFIX}{name} ({path}:") for line in message):
            problems.append(f"the commit message does not place lever {name} in {path}")
        patched = files.get(path)
        if patched is None:
            continue  # the file list's own check names it
        if marked.get(name) != {path}:
            problems.append(f"lever {name}: the patch's marker lines are in {sorted(marked.get(name, ()))}, the "
                            f"manifest says {path}")
            continue
        if added_digest(patched.added) != mine[0].get("added_sha256"):
            problems.append(f"lever {name}: the lines the patch adds to {path} are not the ones the manifest "
                            "pins (added_sha256 differs)")
    return problems
