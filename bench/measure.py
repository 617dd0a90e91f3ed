"""What every bench step that times or builds shares: the measurement lock, what this machine allows
(transparent huge pages, AMX) and one interleaved ab-test race."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from amppatch.abtest.result import AbTestResult
from amppatch.errors import CorrectnessError
from amppatch.proc import progress
from bench.options import BenchOptions

MEASURE_LOCK = Path("/tmp/amppatch-measure.lock")

# One arm of a race: (name, build directory, llama-bench flags, environment).
RaceArm = tuple[str, Path, tuple[str, ...], tuple[tuple[str, str], ...]]


@contextlib.contextmanager
def measure_lock(what: str) -> Iterator[None]:
    """Exclusive flock on the shared measurement lock: no timing run overlaps another process's heavy work."""
    fd = os.open(MEASURE_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"bench: waiting for {MEASURE_LOCK} ({what}) ...")
            t0 = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            progress(f"bench: got the lock after {time.monotonic() - t0:.0f} s")
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_status(enabled: Path = THP_ENABLED) -> str | None:
    """None when transparent huge pages can back memory here (mode `always` or `madvise`), else why not: what
    the file-backed lever's arms need (the lever itself maps like stock where THP is `never`)."""
    try:
        thp = enabled.read_text()
    except OSError:
        return "no transparent huge pages in this kernel (/sys/kernel/mm/transparent_hugepage missing)"
    mode = re.search(r"\[(\w+)\]", thp)
    if mode and mode.group(1) == "never":
        return "transparent huge pages are disabled (mode never)"
    return None


def hugepages_status(enabled: Path = THP_ENABLED) -> str | None:
    """None when the hugepages arm (glibc's malloc THP tunable) can run here, else why not."""
    reason = thp_status(enabled)
    if reason:
        return reason
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""
    m = re.match(r"glibc (\d+)\.(\d+)", libc)
    if not m or (int(m.group(1)), int(m.group(2))) < (2, 35):
        return f"glibc.malloc.hugetlb needs glibc >= 2.35 (this is {libc or 'not glibc'})"
    return None


def thp_mode() -> str:
    try:
        m = re.search(r"\[(\w+)\]", THP_ENABLED.read_text())
        return m.group(1) if m else "?"
    except OSError:
        return "unavailable"


def has_amx() -> bool:
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def read_json(path: Path) -> Any:
    """The file's JSON, or None when it is missing or unreadable (a cache entry to redo, not an error)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def race(arms: Sequence[RaceArm], model: Path, threads: tuple[int, ...], out: Path, options: BenchOptions, *,
         gate_model: Path | None, max_time: float | None, rounds: int | None) -> tuple[AbTestResult, str | None]:
    """One interleaved ab-test run under the measurement lock; returns its result and, when the arms were
    re-gated with the perplexity tolerance, why."""
    from amppatch.abtest import AbTestOptions, ArmSpec, run_abtest

    ab = AbTestOptions(
        arms=tuple(ArmSpec(n, b, args, env) for n, b, args, env in arms),
        model=model, threads=threads, tokens=options.tokens, reps=options.reps,
        rounds=rounds, max_time=None if rounds is not None else max_time,
        min_effect=options.min_effect, seed=options.seed, out=out,
        skip_correctness=gate_model is None, gate_model=gate_model, latency="off", llc=False,
    )
    gate_note = None
    with measure_lock(f"ab-test {out.name}"):
        try:
            result = run_abtest(ab)
        except CorrectnessError as exc:
            # Different code generation (PGO, -fprefetch-loop-arrays) may legitimately contract a*b+c into
            # an FMA differently; such an arm is then held to the perplexity tolerance instead of dropped.
            gate_note = f"identical-output gate failed ({exc.message}); re-gated with --gate tolerance"
            progress(f"bench: {gate_note}")
            result = run_abtest(replace(ab, gate_mode="tolerance"))
    return result, gate_note
