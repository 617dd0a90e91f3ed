"""The huge-page lever: a source patch that puts llama.cpp's mmapped weights on file-backed transparent huge
pages, and the check of how many weight bytes really sit on huge pages once a model is loaded.

Plan → render → apply in reverse byte order → re-parse, like the prefetch sites: tree-sitter finds the
statement `addr = mmap(NULL, <size>, PROT_READ, <flags>, <fd>, 0)` of llama.cpp's POSIX `llama_mmap::impl`
and the start of that struct; two Jinja templates render the helpers (file scope, before the struct) and a
guarded branch in front of the statement, so the original call stays as the `else` and non-Linux builds
compile exactly the stock code. A second apply changes nothing (the marker is found)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from amppatch.errors import AmppatchError, UsageError
from amppatch.patch import Edit, FileChange, _environment, _new_marked_lines, splice
from amppatch.source.parse import error_nodes, parse_bytes, walk

LEVER = "hugepages"
MARKER = "amppatch: hugepages"
_CANDIDATES = ("src/llama-mmap.cpp", "llama-mmap.cpp", "src/llama.cpp", "llama.cpp")


@dataclass(frozen=True)
class MmapSite:
    """Where the weights are mapped: the statement, its arguments, and the struct the helpers go before."""

    relpath: str
    statement_start: int  # byte offset of the line that holds `addr = mmap(...)`
    indent: str
    size: str
    flags: str
    fd: str
    helpers_at: int  # byte offset of the line that opens `struct llama_mmap::impl`


def _line_start(source: bytes, offset: int) -> int:
    return source.rfind(b"\n", 0, offset) + 1


def find_mmap_site(repo: Path) -> MmapSite:
    """The weight mapping of this llama.cpp tree, or a UsageError naming what was looked for."""
    for rel in _CANDIDATES:
        path = repo / rel
        if not path.is_file():
            continue
        source = path.read_bytes()
        if b"llama_mmap" not in source:
            continue
        parsed = parse_bytes(source, "cpp", path)
        calls = []
        helpers_at = None
        for node in walk(parsed.root):
            if node.type == "struct_specifier" and helpers_at is None:
                name = node.child_by_field_name("name")
                if name is not None and parsed.text(name) == "llama_mmap::impl":
                    helpers_at = _line_start(source, node.start_byte)
            if node.type != "expression_statement" or not node.named_children:
                continue
            expr = node.named_children[0]
            if expr.type != "assignment_expression":
                continue
            left, right = expr.child_by_field_name("left"), expr.child_by_field_name("right")
            if left is None or right is None or right.type != "call_expression":
                continue
            fn = right.child_by_field_name("function")
            args = right.child_by_field_name("arguments")
            if fn is None or args is None or parsed.text(fn) != "mmap" or parsed.text(left) != "addr":
                continue
            values = [parsed.text(a) for a in args.named_children]
            if len(values) == 6 and values[2] == "PROT_READ":
                calls.append((node, values))
        if helpers_at is None or not calls:
            continue
        if len(calls) > 1:
            raise UsageError(f"{rel} maps the weights in {len(calls)} places; the huge-page lever patches one",
                             next_step="patch this tree's mapping by hand, or use the pinned llama.cpp")
        node, values = calls[0]
        start = _line_start(source, node.start_byte)
        indent = source[start : node.start_byte].decode()
        return MmapSite(rel, start, indent if not indent.strip() else "        ", values[1], values[3], values[4],
                        helpers_at)
    raise UsageError("this llama.cpp tree has no `addr = mmap(..., PROT_READ, flags, fd, 0)` in llama_mmap::impl "
                     f"(looked in {', '.join(_CANDIDATES)})",
                     next_step="the huge-page lever needs llama.cpp's POSIX weight mapping; run without it")


def render_hugepages(site: MmapSite) -> tuple[str, str]:
    """The helpers (file scope) and the guarded branch in front of the mmap statement."""
    env = _environment()
    helpers = env.get_template("hugepages_helpers.cpp.j2").render(marker=MARKER)
    branch = env.get_template("hugepages_map.cpp.j2").render(marker=MARKER, indent=site.indent, size=site.size,
                                                             flags=site.flags, fd=site.fd)
    return helpers.rstrip("\n") + "\n\n", branch.rstrip("\n") + "\n"


def hugepages_change(repo: Path) -> FileChange | None:
    """The lever's edit of the tree, or None when the tree already carries it."""
    site = find_mmap_site(repo)
    source = (repo / site.relpath).read_bytes()
    if MARKER.encode() in source:
        return None
    helpers, branch = render_hugepages(site)
    after = splice(source, [Edit(site.helpers_at, helpers), Edit(site.statement_start, branch)])
    before_errors = len(error_nodes(parse_bytes(source, "cpp").root))
    after_errors = len(error_nodes(parse_bytes(after, "cpp").root))
    if after_errors > before_errors:
        raise AmppatchError(f"the edited {site.relpath} parses with {after_errors - before_errors} new ERROR "
                            "node(s); nothing was written",
                            next_step="report this tree's llama_mmap layout; run without the huge-page lever")
    return FileChange(site.relpath, source, after, _new_marked_lines(source, after))


# ----------------------------------------------------------------------------------------------------------
# Verification: how much of the weights really sits on huge pages


@dataclass(frozen=True)
class HugePageShare:
    """Huge-page bytes of the mappings of one file (or anonymous memory) in a running process."""

    mapped_bytes: int
    file_pmd_bytes: int
    anon_huge_bytes: int
    weight_bytes: int

    @property
    def share(self) -> float:
        huge = self.file_pmd_bytes + self.anon_huge_bytes
        return huge / self.weight_bytes if self.weight_bytes else 0.0

    def to_json(self) -> dict[str, float | int]:
        return {"mapped_bytes": self.mapped_bytes, "file_pmd_bytes": self.file_pmd_bytes,
                "anon_huge_bytes": self.anon_huge_bytes, "weight_bytes": self.weight_bytes,
                "share": round(self.share, 4)}

    @classmethod
    def from_json(cls, data: dict) -> HugePageShare:
        return cls(int(data["mapped_bytes"]), int(data["file_pmd_bytes"]), int(data["anon_huge_bytes"]),
                   int(data["weight_bytes"]))


_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \d+\s*(.*)$")
_FIELD = re.compile(r"^(\w+):\s+(\d+) kB$")


def smaps_mappings(text: str) -> Iterable[tuple[str, dict[str, int]]]:
    """(pathname, fields in bytes) per mapping of a /proc/PID/smaps text (pure)."""
    path: str | None = None
    fields: dict[str, int] = {}
    for line in text.splitlines():
        head = _HEADER.match(line)
        if head:
            if path is not None:
                yield path, fields
            path, fields = head.group(3).strip(), {}
            continue
        field = _FIELD.match(line)
        if field and path is not None:
            fields[field.group(1)] = int(field.group(2)) * 1024
    if path is not None:
        yield path, fields


def file_share(smaps_text: str, file: Path, weight_bytes: int) -> HugePageShare:
    """Huge-page bytes of the mappings of `file` (pure)."""
    want = str(file)
    mapped = pmd = anon = 0
    for path, fields in smaps_mappings(smaps_text):
        if path == want:
            mapped += fields.get("Rss", 0)
            pmd += fields.get("FilePmdMapped", 0)
            anon += fields.get("AnonHugePages", 0)
    return HugePageShare(mapped, pmd, anon, weight_bytes)


def watch_share(pid: int, file: Path, weight_bytes: int, *, interval: float = 0.05,
                alive: object = None) -> HugePageShare:
    """Poll /proc/PID/smaps until the process ends; returns the largest huge-page share seen (the weights are
    mapped once and stay mapped until exit, so the peak is the loaded state)."""
    best = HugePageShare(0, 0, 0, weight_bytes)
    smaps = Path(f"/proc/{pid}/smaps")
    while True:
        try:
            text = smaps.read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return best
        current = file_share(text, file.resolve(), weight_bytes)
        if (current.file_pmd_bytes + current.anon_huge_bytes, current.mapped_bytes) > (
                best.file_pmd_bytes + best.anon_huge_bytes, best.mapped_bytes):
            best = current
        if callable(alive) and not alive():
            return best
        time.sleep(interval)
