"""Reads the files amptrace.c writes (format version 2). Pure: no subprocess, no compiler.

The layout is mirrored from amptrace.c (struct sample, token_event, region_event, thread_header,
module_rec); both sides change together and bump ``FORMAT_VERSION``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from amppatch.errors import UsageError

FORMAT_VERSION = 2
MAGIC = b"AMPTRACE"

SEC_META, SEC_THREAD, SEC_TOKENS, SEC_REGIONS, SEC_MODULES, SEC_MAPS = 1, 2, 3, 4, 5, 6
SEC_END = 0xFFFFFFFF

TOKEN_KINDS = {
    1: "decode_begin",
    2: "decode_end",
    3: "process_begin",
    4: "process_end",
    5: "sync_begin",
    6: "sync_end",
}
REGION_KINDS = {1: "mmap", 2: "munmap", 3: "posix_memalign", 4: "buffer_usage", 5: "buffer_clear"}
BUFFER_USAGE = {0: "any", 1: "weights", 2: "compute"}

SAMPLE_DTYPE = np.dtype([("t_ns", "<u8"), ("pc", "<u8"), ("weight", "<u4"), ("pad", "<u4")])
TOKEN_DTYPE = np.dtype([("kind", "<u4"), ("tid", "<u4"), ("t_ns", "<u8"), ("arg", "<i8")])
THREAD_HEADER = struct.Struct("<IIII6Q")
REGION_STRUCT = struct.Struct("<IIQQQqq128s")
MODULE_STRUCT = struct.Struct("<QQ8Q256s")


@dataclass(frozen=True)
class ThreadTrace:
    tid: int
    state: str  # "running" when the file was written, or "exited"
    samples: np.ndarray  # SAMPLE_DTYPE records
    dropped: int
    start_ns: int
    end_ns: int
    cpu_ns: int
    handler_ns: int

    @property
    def n_samples(self) -> int:
        return int(self.samples.shape[0])


@dataclass(frozen=True)
class Region:
    kind: str
    tid: int
    t_ns: int
    addr: int
    size: int
    a: int
    b: int
    name: str


@dataclass(frozen=True)
class Module:
    path: str
    base: int
    segments: tuple[tuple[int, int], ...]  # executable PT_LOAD ranges, absolute addresses


@dataclass(frozen=True)
class MapsEntry:
    start: int
    end: int
    perms: str
    offset: int
    path: str


@dataclass(frozen=True)
class TokenEvent:
    kind: str
    tid: int
    t_ns: int
    arg: int


@dataclass(frozen=True)
class TokenCall:
    """One llama_decode/llama_process call, from its begin through the llama_synchronize that ends it."""

    begin_ns: int
    end_ns: int
    n_tokens: int | None  # tokens in its batch (1: a generation step); None: not known

    @property
    def ns(self) -> int:
        return self.end_ns - self.begin_ns


@dataclass
class Trace:
    path: Path
    version: int
    meta: dict[str, str]
    threads: list[ThreadTrace]
    tokens: list[TokenEvent]
    regions: list[Region]
    modules: list[Module]
    maps: list[MapsEntry]
    complete: bool
    token_calls: list[TokenCall] = field(default_factory=list)

    @property
    def token_spans(self) -> list[tuple[int, int]]:
        """(begin_ns, end_ns) of every decode/process call."""
        return [(c.begin_ns, c.end_ns) for c in self.token_calls]

    @property
    def token_ns(self) -> list[int]:
        """Duration of every llama_decode/llama_process call through the llama_synchronize that ends it."""
        return [c.ns for c in self.token_calls]

    @property
    def generation_ns(self) -> list[int]:
        """Duration of every call that decoded exactly one token: the generation steps, without the prompt
        batches and the context fill before a generation at depth (one call of thousands of tokens)."""
        return [c.ns for c in self.token_calls if c.n_tokens == 1]

    @property
    def crash_signal(self) -> int:
        return int(self.meta.get("crash_signal", "0") or 0)

    @property
    def pid(self) -> int:
        return int(self.meta.get("pid", "0") or 0)

    @property
    def n_samples(self) -> int:
        return sum(t.n_samples for t in self.threads)

    def all_samples(self) -> np.ndarray:
        if not self.threads:
            return np.zeros(0, dtype=SAMPLE_DTYPE)
        return np.concatenate([t.samples for t in self.threads])

    def calls(self) -> dict[str, int]:
        return {k.removeprefix("calls."): int(v) for k, v in self.meta.items() if k.startswith("calls.")}


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def parse_maps(text: str) -> list[MapsEntry]:
    """Parse /proc/<pid>/maps lines: 'start-end perms offset dev inode [path]'."""
    out: list[MapsEntry] = []
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5:
            continue
        lo, hi = parts[0].split("-")
        out.append(MapsEntry(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), parts[5] if len(parts) > 5 else ""))
    return out


def _call(begin: TokenEvent, end_ns: int) -> TokenCall:
    return TokenCall(begin.t_ns, end_ns, begin.arg if begin.arg >= 0 else None)


def token_calls(events: list[TokenEvent]) -> list[TokenCall]:
    """Pair token boundaries into calls, per thread and in time order.

    A call starts at a decode/process begin (whose argument is its batch's token count, negative when the
    tracer could not follow it); it ends at the end of the first llama_synchronize that follows (compute is
    asynchronous), or at the decode/process end when the next call starts first.
    """
    calls: list[TokenCall] = []
    by_tid: dict[int, list[TokenEvent]] = {}
    for ev in sorted(events, key=lambda e: e.t_ns):
        by_tid.setdefault(ev.tid, []).append(ev)
    for evs in by_tid.values():
        begin: TokenEvent | None = None
        call_end: int | None = None
        for ev in evs:
            if ev.kind in ("decode_begin", "process_begin"):
                if begin is not None and call_end is not None:
                    calls.append(_call(begin, call_end))
                begin, call_end = ev, None
            elif ev.kind in ("decode_end", "process_end"):
                if begin is not None:
                    call_end = ev.t_ns
            elif ev.kind == "sync_end" and begin is not None and call_end is not None:
                calls.append(_call(begin, ev.t_ns))
                begin, call_end = None, None
        if begin is not None and call_end is not None:
            calls.append(_call(begin, call_end))
    return sorted(calls, key=lambda c: (c.begin_ns, c.end_ns))


def read_trace(path: Path) -> Trace:
    """Parse one trace file; raises UsageError when it is not one (or is from another format version)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read trace {path}: {exc.strerror}") from exc
    if len(data) < 16 or data[:8] != MAGIC:
        raise UsageError(
            f"{path} is not an amptrace file" + (" (empty: the process died before writing)" if not data else ""),
            next_step="check that the workload ran with the tracer's environment (tracer_env)",
        )
    version, header_size = struct.unpack_from("<II", data, 8)
    if version != FORMAT_VERSION:
        raise UsageError(
            f"{path} has trace format {version}, this amppatch reads {FORMAT_VERSION}",
            next_step="re-run the profile with this amppatch version",
        )
    meta: dict[str, str] = {}
    threads: list[ThreadTrace] = []
    tokens: list[TokenEvent] = []
    regions: list[Region] = []
    modules: list[Module] = []
    maps: list[MapsEntry] = []
    complete = False
    pos = header_size
    while pos + 16 <= len(data):
        kind, _zero, length = struct.unpack_from("<IIQ", data, pos)
        pos += 16
        if pos + length > len(data):
            break  # truncated (the writer was killed mid-file)
        payload = data[pos : pos + length]
        pos += length
        if kind == SEC_END:
            complete = True
            break
        if kind == SEC_META:
            for line in payload.decode("utf-8", "replace").splitlines():
                key, _, value = line.partition("=")
                meta[key] = value
        elif kind == SEC_THREAD:
            tid, _slot, state, _pad, n, dropped, start, end, cpu, handler = THREAD_HEADER.unpack_from(payload, 0)
            samples = np.frombuffer(payload, dtype=SAMPLE_DTYPE, count=n, offset=THREAD_HEADER.size).copy()
            threads.append(
                ThreadTrace(tid, "running" if state == 1 else "exited", samples, dropped, start, end, cpu, handler)
            )
        elif kind == SEC_TOKENS:
            arr = np.frombuffer(payload, dtype=TOKEN_DTYPE)
            tokens = [
                TokenEvent(TOKEN_KINDS[int(r["kind"])], int(r["tid"]), int(r["t_ns"]), int(r["arg"]))
                for r in arr
                if int(r["kind"]) in TOKEN_KINDS
            ]
        elif kind == SEC_REGIONS:
            for off in range(0, len(payload) - REGION_STRUCT.size + 1, REGION_STRUCT.size):
                k, tid, t_ns, addr, size, a, b, name = REGION_STRUCT.unpack_from(payload, off)
                if k in REGION_KINDS:
                    regions.append(Region(REGION_KINDS[k], tid, t_ns, addr, size, a, b, _cstr(name)))
        elif kind == SEC_MODULES:
            for off in range(0, len(payload) - MODULE_STRUCT.size + 1, MODULE_STRUCT.size):
                fields = MODULE_STRUCT.unpack_from(payload, off)
                base, nseg = fields[0], fields[1]
                segs = tuple((fields[2 + 2 * i], fields[3 + 2 * i]) for i in range(min(nseg, 4)))
                modules.append(Module(_cstr(fields[10]), base, segs))
        elif kind == SEC_MAPS:
            maps = parse_maps(payload.decode("utf-8", "replace"))
    trace = Trace(path, version, meta, threads, tokens, regions, modules, maps, complete)
    trace.token_calls = token_calls(tokens)
    return trace


def trace_files(out_path: Path) -> list[Path]:
    """The root trace and the files of traced children (<out>.<pid>), root first."""
    out_path = Path(out_path)
    children = sorted(
        p
        for p in out_path.parent.glob(out_path.name + ".*")
        if p.name[len(out_path.name) + 1 :].isdigit()
    )
    return ([out_path] if out_path.exists() else []) + children
