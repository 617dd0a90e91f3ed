"""Huge pages, as text: THP modes from sysfs, the hugetlb pool from /proc/meminfo, /proc/PID/smaps mappings,
and what amppatch's huge-page probe printed — each parsed into a typed value with to_json/from_json.

Pure: nothing here reads a file or runs a program (doctor.py runs the probe and hands the text over), so
every function is tested on recorded text. `huge_bytes_in_ranges` answers "how much of these address ranges
(a process's weight regions) sits on huge pages" from that process's smaps text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from amppatch.inputs import check_schema_version

SCHEMA_VERSION = 1  # of the "huge_pages" section of doctor.json

_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+)\s+(\S{4})\s+([0-9a-f]+)\s+(\S+)\s+(\d+)\s*(.*)$")
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):\s+(\d+)(\s+kB)?\s*$")


def selected_mode(text: str | None) -> str:
    """The bracketed choice of a sysfs THP file ("always [madvise] never" -> "madvise"); "unknown" when
    the file is missing or empty, the text itself when it has no brackets."""
    if not text or not text.strip():
        return "unknown"
    text = text.strip()
    match = re.search(r"\[([^\]]+)\]", text)
    return match.group(1) if match else text


@dataclass(frozen=True)
class ThpModes:
    """/sys/kernel/mm/transparent_hugepage/{enabled,defrag,shmem_enabled}: the selected value of each."""

    enabled: str
    defrag: str
    shmem_enabled: str

    @classmethod
    def parse(cls, enabled: str | None, defrag: str | None, shmem_enabled: str | None) -> ThpModes:
        return cls(selected_mode(enabled), selected_mode(defrag), selected_mode(shmem_enabled))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ThpModes:
        return cls(str(data["enabled"]), str(data["defrag"]), str(data["shmem_enabled"]))


@dataclass(frozen=True)
class HugetlbPool:
    """The hugetlbfs pool of the default huge page size (HugePages_Total/Free, Hugepagesize)."""

    total_pages: int
    free_pages: int
    page_size_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.total_pages * self.page_size_bytes

    @property
    def free_bytes(self) -> int:
        return self.free_pages * self.page_size_bytes

    @classmethod
    def parse_meminfo(cls, text: str) -> HugetlbPool:
        values: dict[str, int] = {}
        for line in text.splitlines():
            match = _FIELD.match(line.strip())
            if match:
                values[match.group(1)] = int(match.group(2)) * (1024 if match.group(3) else 1)
        return cls(values.get("HugePages_Total", 0), values.get("HugePages_Free", 0), values.get("Hugepagesize", 0))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> HugetlbPool:
        return cls(int(data["total_pages"]), int(data["free_pages"]), int(data["page_size_bytes"]))


@dataclass(frozen=True)
class Mapping:
    """One mapping (VMA) of a smaps file; `fields` in bytes for the "kB" lines, as printed otherwise."""

    start: int
    end: int
    perms: str
    offset: int
    path: str
    fields: dict[str, int] = field(default_factory=dict)
    vm_flags: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def file_pmd_bytes(self) -> int:
        return self.fields.get("FilePmdMapped", 0)

    @property
    def anon_huge_bytes(self) -> int:
        return self.fields.get("AnonHugePages", 0)


def parse_smaps(text: str) -> list[Mapping]:
    """Every mapping of a /proc/PID/smaps text, in order. Lines that are neither a mapping header nor a
    field of the current mapping are ignored (so an excerpt or a concatenation parses too)."""
    out: list[Mapping] = []
    header: re.Match[str] | None = None
    fields: dict[str, int] = {}
    flags: tuple[str, ...] = ()

    def flush() -> None:
        if header is not None:
            out.append(Mapping(int(header.group(1), 16), int(header.group(2), 16), header.group(3),
                               int(header.group(4), 16), header.group(7).strip(), dict(fields), flags))

    for raw in text.splitlines():
        line = raw.rstrip()
        match = _HEADER.match(line)
        if match:
            flush()
            header, fields, flags = match, {}, ()
            continue
        if header is None:
            continue
        if line.startswith("VmFlags:"):
            flags = tuple(line.split(":", 1)[1].split())
            continue
        match = _FIELD.match(line)
        if match:
            fields[match.group(1)] = int(match.group(2)) * (1024 if match.group(3) else 1)
    flush()
    return out


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping [start, end) ranges covering the same bytes; empty ranges dropped."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted((int(s), int(e)) for s, e in ranges if int(e) > int(s)):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@dataclass(frozen=True)
class HugeShare:
    """How much of some address ranges sits on huge pages, from smaps.

    smaps counts per mapping, not per address: a mapping that lies wholly inside the ranges counts exactly;
    one that the ranges cover only in part counts its huge-page bytes in proportion to the covered part
    (`exact` is then False).
    """

    range_bytes: int  # bytes of the ranges asked about (overlaps merged)
    mapped_bytes: int  # of those, bytes that some mapping covers
    file_pmd_bytes: int  # FilePmdMapped: file pages mapped by a PMD (file-backed THP)
    anon_huge_bytes: int  # AnonHugePages: anonymous THP
    mappings: int  # how many mappings overlap the ranges
    exact: bool

    @property
    def huge_bytes(self) -> int:
        return self.file_pmd_bytes + self.anon_huge_bytes

    @property
    def share(self) -> float:
        """Huge-page bytes over the ranges' bytes (0 when the ranges are empty)."""
        return self.huge_bytes / self.range_bytes if self.range_bytes else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "huge_bytes": self.huge_bytes, "share": round(self.share, 6)}

    @classmethod
    def from_json(cls, data: dict) -> HugeShare:
        return cls(int(data["range_bytes"]), int(data["mapped_bytes"]), int(data["file_pmd_bytes"]),
                   int(data["anon_huge_bytes"]), int(data["mappings"]), bool(data["exact"]))


def huge_bytes_in_ranges(smaps_text: str, ranges: Sequence[tuple[int, int]]) -> HugeShare:
    """Bytes of `ranges` ([start, end) addresses, e.g. a process's weight regions) that its smaps text shows
    on PMD-mapped file pages (FilePmdMapped) and on anonymous huge pages (AnonHugePages)."""
    merged = merge_ranges(ranges)
    mapped = file_pmd = anon = 0.0
    count = 0
    exact = True
    for m in parse_smaps(smaps_text):
        overlap = sum(max(0, min(m.end, e) - max(m.start, s)) for s, e in merged)
        if overlap <= 0:
            continue
        count += 1
        mapped += overlap
        fraction = overlap / m.size if m.size else 0.0
        if overlap < m.size and (m.file_pmd_bytes or m.anon_huge_bytes):
            exact = False
        file_pmd += m.file_pmd_bytes * fraction
        anon += m.anon_huge_bytes * fraction
    return HugeShare(sum(e - s for s, e in merged), int(mapped), round(file_pmd), round(anon), count, exact)


def filesystem_of(path: str, mounts_text: str) -> str:
    """The filesystem type of the mount holding absolute `path`, from /proc/mounts text ("unknown" if none)."""
    best, kind = "", "unknown"
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


@dataclass(frozen=True)
class FileThpProbe:
    """A read-only shared file mapping advised MADV_HUGEPAGE before its pages were cached: how much of it
    the kernel mapped with PMDs (FilePmdMapped) after touching every page."""

    test: str  # "file_thp" (where the kernel placed it, as llama.cpp's mmap) or "file_thp_aligned"
    bytes: int
    file_pmd_bytes: int
    aligned: bool  # the mapping started on a 2 MiB boundary
    cached_before_touch: int  # bytes still in the page cache after POSIX_FADV_DONTNEED (should be 0)
    madvise_error: str  # errno name when madvise(MADV_HUGEPAGE) failed, else ""
    error: str = ""  # the test could not run (e.g. the file could not be written)

    @property
    def works(self) -> bool:
        return not self.error and self.file_pmd_bytes > 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> FileThpProbe:
        return cls(str(data["test"]), int(data["bytes"]), int(data["file_pmd_bytes"]), bool(data["aligned"]),
                   int(data["cached_before_touch"]), str(data["madvise_error"]), str(data.get("error", "")))


@dataclass(frozen=True)
class CollapseProbe:
    """madvise(MADV_COLLAPSE) on a touched 2 MiB-aligned range of small pages."""

    on: str  # "anon" (private anonymous memory) or "file" (a read-only file mapping, pages already cached)
    accepted: bool  # the call returned 0
    errno: str  # its errno name when it did not
    huge_bytes: int  # AnonHugePages / FilePmdMapped of the range afterwards
    error: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CollapseProbe:
        return cls(str(data["on"]), bool(data["accepted"]), str(data["errno"]), int(data["huge_bytes"]),
                   str(data.get("error", "")))


def _smaps_blocks(text: str) -> dict[str, str]:
    blocks: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("#smaps-begin "):
            name, lines = line.split(None, 1)[1].strip(), []
        elif line.startswith("#smaps-end ") and name is not None:
            blocks[name] = "\n".join(lines)
            name = None
        elif name is not None:
            lines.append(line)
    return blocks


def parse_probe_output(text: str) -> tuple[tuple[FileThpProbe, ...], tuple[CollapseProbe, ...]]:
    """The huge-page probe's stdout (amppatch/probes/hugepage_probe.c): one JSON object per test, each
    followed by the process's smaps while the test's mapping was in place."""
    blocks = _smaps_blocks(text)
    files: list[FileThpProbe] = []
    collapses: list[CollapseProbe] = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        test = str(rec.get("test", ""))
        error = str(rec.get("error", ""))
        share = None
        if "start" in rec and test in blocks:
            share = huge_bytes_in_ranges(blocks[test], [(int(rec["start"]), int(rec["end"]))])
        if test.startswith("file_thp"):
            files.append(FileThpProbe(
                test=test, bytes=int(rec.get("bytes", 0)), file_pmd_bytes=share.file_pmd_bytes if share else 0,
                aligned=bool(rec.get("aligned", 0)), cached_before_touch=int(rec.get("cached_before_touch", 0)),
                madvise_error=str(rec.get("madvise_errno", "")), error=error))
        elif test.startswith("collapse_"):
            accepted = not error and int(rec.get("rc", -1)) == 0
            collapses.append(CollapseProbe(
                on=test.removeprefix("collapse_"), accepted=accepted, errno=str(rec.get("errno", "")),
                huge_bytes=share.huge_bytes if share else 0, error=error))
    return tuple(files), tuple(collapses)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class HugePagesReport:
    """doctor.json's "huge_pages" section."""

    thp: ThpModes
    hugetlb: HugetlbPool
    directory: str  # where the probe wrote its file (the model cache)
    filesystem: str
    file_thp: tuple[FileThpProbe, ...] = ()
    collapse: tuple[CollapseProbe, ...] = ()
    probe_error: str = ""  # the probe could not be compiled or run
    schema_version: int = SCHEMA_VERSION

    @property
    def file_thp_works(self) -> bool:
        """File-backed THP for a read-only mapping placed where the kernel chose (as llama.cpp maps a model)."""
        return any(p.works for p in self.file_thp if p.test == "file_thp")

    def collapse_accepted(self, on: str) -> bool | None:
        for probe in self.collapse:
            if probe.on == on:
                return probe.accepted
        return None

    def summary(self) -> str:
        """One line: does file-backed THP work here, and on what."""
        where = f"{self.filesystem} at {self.directory}"
        if self.probe_error:
            return f"file-backed THP: unknown (probe failed: {self.probe_error})"
        plain = next((p for p in self.file_thp if p.test == "file_thp"), None)
        aligned = next((p for p in self.file_thp if p.test == "file_thp_aligned"), None)
        if plain is None:
            return "file-backed THP: unknown (the probe printed no result)"
        if plain.error:
            return f"file-backed THP: unknown ({plain.error})"
        if plain.works:
            return (f"file-backed THP: works — {_mib(plain.file_pmd_bytes)} of a {_mib(plain.bytes)} read-only "
                    f"mapping on PMDs after MADV_HUGEPAGE ({where})")
        if aligned is not None and aligned.works:
            return (f"file-backed THP: works only at a 2 MiB-aligned address — the kernel placed the mapping "
                    f"unaligned, and there 0 of {_mib(plain.bytes)} were on PMDs ({where})")
        why = (f"madvise failed with {plain.madvise_error}" if plain.madvise_error else
               f"THP enabled={self.thp.enabled}; the filesystem may not give page-cache files huge folios")
        return f"file-backed THP: does not work — 0 of {_mib(plain.bytes)} on PMDs after MADV_HUGEPAGE ({why}; {where})"

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "thp": self.thp.to_json(),
            "hugetlb": self.hugetlb.to_json(),
            "directory": self.directory,
            "filesystem": self.filesystem,
            "file_thp_works": self.file_thp_works,
            "file_thp": [p.to_json() for p in self.file_thp],
            "collapse": [p.to_json() for p in self.collapse],
            "probe_error": self.probe_error,
        }

    @classmethod
    def from_json(cls, data: dict) -> HugePagesReport:
        check_schema_version(data, SCHEMA_VERSION, what="huge_pages section",
                             next_step="rerun `amppatch doctor` to write a current doctor.json")
        return cls(
            thp=ThpModes.from_json(data["thp"]),
            hugetlb=HugetlbPool.from_json(data["hugetlb"]),
            directory=str(data["directory"]),
            filesystem=str(data["filesystem"]),
            file_thp=tuple(FileThpProbe.from_json(p) for p in data.get("file_thp", [])),
            collapse=tuple(CollapseProbe.from_json(p) for p in data.get("collapse", [])),
            probe_error=str(data.get("probe_error", "")),
            schema_version=SCHEMA_VERSION,
        )
