"""Samples → module → function (demangled) → file:line.

Module placement comes from the trace (dl_iterate_phdr bases, or /proc/self/maps plus the ELF program
headers when the trace was written from a signal handler). Names and lines come from `addr2line -f -C -i`
(binutils) reading the DWARF of builds compiled with -g; a module without debug info still gets function
names from its symbol table (via pyelftools) and no lines.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from amppatch import proc
from amppatch.tracer.reader import MapsEntry, Trace

UNKNOWN = "??"


@dataclass(frozen=True)
class Frame:
    function: str
    file: str
    line: int


@dataclass(frozen=True)
class Location:
    """What one program counter is: the real (outermost) function, and the source line the instruction
    belongs to — the innermost inlined frame that is not in a compiler or system header."""

    module: str
    function: str
    file: str
    line: int
    inlined_from: str  # innermost function when it differs (e.g. an inlined helper), else ""
    line_function: str = ""  # the function whose source holds `line` (an inlined kernel body, or `function`)
    chain: tuple[Frame, ...] = ()  # the whole inline chain, innermost first (for mapping lines onto loops)


@dataclass(frozen=True)
class Placement:
    module: str  # file path
    vaddr: int  # address as the ELF file sees it


def normalize_function(name: str) -> str:
    """One spelling per function: addr2line prints a DWARF name ('f<T>') for some addresses and a demangled
    linkage name with return type and parameters ('void f<T>(int, float*)') for others (pure)."""
    text = name.strip()
    if text in ("", UNKNOWN):
        return text or UNKNOWN
    anon = "(anonymous namespace)"
    text = text.replace(anon, "\x00")  # no spaces or parentheses inside while we cut
    # drop a trailing parameter list at template depth 0 (and cv-qualifiers after it)
    depth = 0
    cut = None
    for i, ch in enumerate(text):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    if cut is not None:
        text = text[:cut].rstrip()
    # drop a leading return type: everything before the last space at template depth 0
    depth = 0
    last_space = -1
    for i, ch in enumerate(text):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == " " and depth == 0:
            last_space = i
    text = text[last_space + 1 :] if last_space >= 0 else text
    return text.replace("\x00", anon)


def pick_line(frames: Sequence[Frame]) -> Frame:
    """Innermost frame in the program's own sources; intrinsic headers (/usr/lib/gcc/...) are skipped (pure)."""
    for f in frames:
        if f.file and f.file != UNKNOWN and not f.file.startswith(("/usr/lib/gcc", "/usr/include", "/usr/lib/llvm")):
            return f
    return frames[0] if frames else Frame(UNKNOWN, UNKNOWN, 0)


def parse_addr2line(text: str) -> dict[int, list[Frame]]:
    """Parse `addr2line -a -f -C -i` output: per address, the inline chain innermost first (pure)."""
    out: dict[int, list[Frame]] = {}
    current: int | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("0x") and " " not in line.strip():
            current = int(line, 16)
            out[current] = []
            i += 1
            continue
        if current is not None and i + 1 < len(lines):
            func = line.strip()
            loc = lines[i + 1].strip()
            file, _, rest = loc.rpartition(":")
            num = rest.split()[0] if rest else "0"
            out[current].append(Frame(func or UNKNOWN, file or UNKNOWN, int(num) if num.isdigit() else 0))
            i += 2
            continue
        i += 1
    return out


@lru_cache(maxsize=64)
def _load_segments(path: str) -> tuple[tuple[int, int, int], ...]:
    """(p_offset, p_filesz, p_vaddr) of every PT_LOAD segment of an ELF file."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            return tuple(
                (s["p_offset"], s["p_filesz"], s["p_vaddr"]) for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"
            )
    except (OSError, ELFError):  # an unreadable or non-ELF file just cannot be placed
        return ()


class Placer:
    """Maps absolute program counters to (module path, ELF virtual address)."""

    def __init__(self, trace: Trace) -> None:
        exe = trace.meta.get("exe", "")
        self._ranges: list[tuple[int, int, str, int]] = []  # (lo, hi, path, bias)
        if trace.modules:
            for m in trace.modules:
                path = m.path or exe
                if not path or path.startswith("linux-vdso"):
                    continue
                for lo, hi in m.segments:
                    self._ranges.append((lo, hi, path, m.base))
        else:
            self._from_maps(trace.maps)
        self._ranges.sort()
        self._los = [r[0] for r in self._ranges]

    def _from_maps(self, maps: Iterable[MapsEntry]) -> None:
        for e in maps:
            if "x" not in e.perms or not e.path.startswith("/"):
                continue
            for p_off, p_filesz, p_vaddr in _load_segments(e.path):
                if p_off <= e.offset < p_off + max(p_filesz, 1):
                    # vaddr = (pc - start + offset) - p_offset + p_vaddr  =>  bias = start - offset + p_offset - p_vaddr
                    self._ranges.append((e.start, e.end, e.path, e.start - e.offset + p_off - p_vaddr))
                    break

    def place(self, pc: int) -> Placement | None:
        i = bisect.bisect_right(self._los, pc) - 1
        if i >= 0:
            lo, hi, path, bias = self._ranges[i]
            if lo <= pc < hi:
                return Placement(path, pc - bias)
        return None


@lru_cache(maxsize=64)
def _symtab(path: str) -> tuple[list[int], list[tuple[int, int, str]]]:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    syms: list[tuple[int, int, str]] = []
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            for name in (".symtab", ".dynsym"):
                sec = elf.get_section_by_name(name)
                if not isinstance(sec, SymbolTableSection):  # absent (or not a symbol table)
                    continue
                for s in sec.iter_symbols():
                    if s["st_info"]["type"] == "STT_FUNC" and s["st_value"]:
                        syms.append((s["st_value"], s["st_size"], s.name))
                if syms:
                    break
    except (OSError, ELFError):
        pass
    syms.sort()
    return [s[0] for s in syms], syms


def symtab_name(path: str, vaddr: int) -> str:
    starts, syms = _symtab(path)
    i = bisect.bisect_right(starts, vaddr) - 1
    if i >= 0:
        start, size, name = syms[i]
        if vaddr < start + max(size, 1):
            return name
    return UNKNOWN


def addr2line(path: str, vaddrs: Sequence[int]) -> dict[int, list[Frame]]:
    """Batch-symbolize addresses of one module with binutils' addr2line."""
    exe = proc.require_tool("addr2line", install_hint="install binutils (apt-get install binutils)")
    out: dict[int, list[Frame]] = {}
    for start in range(0, len(vaddrs), 4000):
        chunk = vaddrs[start : start + 4000]
        done = proc.run(
            [exe, "-a", "-f", "-C", "-i", "-e", path, *(hex(v) for v in chunk)],
            check=False,
            what=f"addr2line on {Path(path).name}",
            timeout=300,
        )
        out.update(parse_addr2line(done.stdout))
    return out


def symbolize(trace: Trace, pcs: np.ndarray) -> dict[int, Location]:
    """Location of every distinct program counter in `pcs`."""
    placer = Placer(trace)
    by_module: dict[str, dict[int, int]] = defaultdict(dict)  # module -> vaddr -> pc
    result: dict[int, Location] = {}
    for pc in np.unique(pcs).tolist():
        where = placer.place(int(pc))
        if where is None:
            result[int(pc)] = Location("[unknown]", UNKNOWN, UNKNOWN, 0, "", UNKNOWN)
            continue
        by_module[where.module][where.vaddr] = int(pc)
    for module, table in by_module.items():
        vaddrs = sorted(table)
        frames = addr2line(module, vaddrs)
        for vaddr in vaddrs:
            chain = frames.get(vaddr, [])
            outer = normalize_function(chain[-1].function) if chain else UNKNOWN
            if all(f.file in ("", UNKNOWN) for f in chain):
                # No debug info: addr2line then names the nearest preceding symbol even far past its end
                # (libgomp's internal spin loop comes out as omp_get_num_procs); trust the symbol table
                # only inside a symbol's size, else name the module.
                outer = normalize_function(symtab_name(module, vaddr))
                if outer == UNKNOWN:
                    outer = f"[{Path(module).name}]"
            line = pick_line(chain) if chain else Frame(UNKNOWN, UNKNOWN, 0)
            inner = normalize_function(chain[0].function) if chain else ""
            result[table[vaddr]] = Location(
                module, outer, line.file, line.line, inner if inner != outer else "",
                line.function if line.function != UNKNOWN else outer,
                tuple(Frame(normalize_function(f.function), f.file, f.line) for f in chain),
            )
    return result
