"""The trace reader against files built byte by byte in the documented layout (no compiler needed)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from amppatch.errors import UsageError
from amppatch.tracer.reader import (
    FORMAT_VERSION,
    MODULE_STRUCT,
    REGION_STRUCT,
    SAMPLE_DTYPE,
    THREAD_HEADER,
    TOKEN_DTYPE,
    TokenCall,
    TokenEvent,
    Trace,
    parse_maps,
    read_trace,
    token_calls,
    trace_files,
)


def section(kind: int, payload: bytes) -> bytes:
    return struct.pack("<IIQ", kind, 0, len(payload)) + payload


def build_file(*, end: bool = True, version: int = FORMAT_VERSION) -> bytes:
    out = b"AMPTRACE" + struct.pack("<II", version, 16)
    out += section(1, b"pid=42\nhz=1000\ncrash_signal=11\ncalls.llama_decode=3\nexe=/bin/x\n")
    samples = np.zeros(3, dtype=SAMPLE_DTYPE)
    samples["t_ns"] = [100, 200, 300]
    samples["pc"] = [0x1000, 0x1004, 0x2000]
    samples["weight"] = [1, 4, 2]
    out += section(2, THREAD_HEADER.pack(7, 0, 2, 0, 3, 5, 10, 400, 12345, 0) + samples.tobytes())
    toks = np.zeros(4, dtype=TOKEN_DTYPE)
    toks["kind"] = [3, 4, 5, 0]  # process begin/end, sync begin, then a reserved-but-unfilled slot
    toks["tid"] = 7
    toks["t_ns"] = [150, 160, 170, 0]
    out += section(3, toks.tobytes())
    out += section(4, REGION_STRUCT.pack(4, 7, 50, 0x7000, 1 << 20, 1, 0, b"CPU_REPACK"))
    out += section(5, MODULE_STRUCT.pack(0x400000, 1, 0x401000, 0x402000, 0, 0, 0, 0, 0, 0, b"/lib/libx.so"))
    out += section(6, b"00400000-00402000 r-xp 00001000 08:01 12 /lib/libx.so\n7ff0-7ff8 rw-p 0 00:00 0\n")
    if end:
        out += section(0xFFFFFFFF, b"")
    return out


def test_reads_every_section(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    path.write_bytes(build_file())
    t = read_trace(path)
    assert t.complete and t.pid == 42 and t.crash_signal == 11
    assert t.calls() == {"llama_decode": 3}
    (th,) = t.threads
    assert th.tid == 7 and th.state == "exited" and th.dropped == 5 and th.cpu_ns == 12345
    assert th.samples["pc"].tolist() == [0x1000, 0x1004, 0x2000]
    assert th.samples["weight"].tolist() == [1, 4, 2]
    assert [e.kind for e in t.tokens] == ["process_begin", "process_end", "sync_begin"]  # unfilled slot skipped
    (r,) = t.regions
    assert (r.kind, r.name, r.size, r.a) == ("buffer_usage", "CPU_REPACK", 1 << 20, 1)
    (m,) = t.modules
    assert m.path == "/lib/libx.so" and m.segments == ((0x401000, 0x402000),)
    assert t.maps[0].offset == 0x1000 and t.maps[0].path == "/lib/libx.so" and t.maps[1].path == ""


def test_truncated_file_is_marked_incomplete(tmp_path: Path) -> None:
    data = build_file(end=False)
    path = tmp_path / "t.bin"
    path.write_bytes(data[:-30])  # cut inside the maps section
    t = read_trace(path)
    assert not t.complete and t.threads


def test_rejects_other_versions_and_empty_files(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    path.write_bytes(build_file(version=99))
    with pytest.raises(UsageError, match="format 99"):
        read_trace(path)
    path.write_bytes(b"")
    with pytest.raises(UsageError, match="empty"):
        read_trace(path)


def token_spans(events: list[TokenEvent]) -> list[tuple[int, int]]:
    return [(c.begin_ns, c.end_ns) for c in token_calls(events)]


def ev(kind: str, t: int, tid: int = 1, arg: int = 0) -> TokenEvent:
    return TokenEvent(kind, tid, t, arg)


def test_token_spans_pair_process_with_following_synchronize() -> None:
    events = [
        ev("process_begin", 0), ev("process_end", 5), ev("sync_begin", 6), ev("sync_end", 20),
        ev("process_begin", 30), ev("process_end", 31), ev("sync_begin", 32), ev("sync_end", 50),
    ]
    assert token_spans(events) == [(0, 20), (30, 50)]


def test_token_spans_without_synchronize_use_the_call_itself() -> None:
    events = [ev("decode_begin", 0), ev("decode_end", 10), ev("decode_begin", 12), ev("decode_end", 25)]
    assert token_spans(events) == [(0, 10), (12, 25)]


def test_token_spans_are_per_thread() -> None:
    events = [ev("decode_begin", 0, 1), ev("decode_begin", 1, 2), ev("decode_end", 5, 2), ev("decode_end", 9, 1)]
    assert token_spans(events) == [(0, 9), (1, 5)]


def test_unfinished_token_is_not_counted() -> None:
    assert token_spans([ev("process_begin", 0)]) == []


def test_trace_files_lists_root_then_children(tmp_path: Path) -> None:
    root = tmp_path / "t.bin"
    for name in ("t.bin", "t.bin.123", "t.bin.45", "t.bin.tmp99", "t.binx"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in trace_files(root)] == ["t.bin", "t.bin.123", "t.bin.45"]


def test_parse_maps_keeps_paths_with_spaces() -> None:
    (e,) = parse_maps("10-20 r-xp 00000000 08:01 5 /a dir/lib.so\n")
    assert (e.start, e.end, e.path) == (0x10, 0x20, "/a dir/lib.so")


def test_a_generation_step_is_a_call_of_one_token() -> None:
    """A generation at depth: the context fill (two calls of 2048 tokens, the last one synchronized like a
    step), then two steps of one token; one call whose batch the tracer could not follow (-1)."""
    events = [
        ev("process_begin", 0, arg=2048), ev("process_end", 100),
        ev("process_begin", 101, arg=2048), ev("process_end", 200), ev("sync_begin", 201), ev("sync_end", 300),
        ev("process_begin", 400, arg=1), ev("process_end", 401), ev("sync_begin", 402), ev("sync_end", 410),
        ev("decode_begin", 500, arg=1), ev("decode_end", 512),
        ev("process_begin", 600, arg=-1), ev("process_end", 605),
    ]
    calls = token_calls(events)
    assert calls == [TokenCall(0, 100, 2048), TokenCall(101, 300, 2048), TokenCall(400, 410, 1),
                     TokenCall(500, 512, 1), TokenCall(600, 605, None)]
    trace = Trace(Path("t.bin"), FORMAT_VERSION, {}, [], events, [], [], [], True, calls)
    assert trace.generation_ns == [10, 12]  # the steps only: no fill, no unknown batch
    assert trace.token_ns == [100, 199, 10, 12, 5]  # every call, as the profile counts them

