"""ab-test's optional collaborators: machine probe (stream ceiling), tracer (per-token latency), perf (LLC
misses). Each reports why it is unavailable instead of failing the run."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from amppatch.errors import AmppatchError, UsageError
from amppatch.proc import run


def stream_ceiling() -> tuple[dict[int, float] | None, str, str | None]:
    """(ceiling GB/s by thread count, note, cpu model) from the machine probe, if that module exists."""
    try:
        from amppatch import machine
    except ImportError:
        return None, "not measured (run amppatch profile / machine probe)", None
    probe = getattr(machine, "probe_machine", None)
    if probe is None:
        return None, "not measured (run amppatch profile / machine probe)", None
    try:
        info = probe(refresh=False)
    except AmppatchError as exc:
        return None, f"not measured (machine probe failed: {exc.message})", None
    ceiling = getattr(info, "stream_ceiling_gbps", None)
    model = getattr(info, "cpu_model", None)
    if not ceiling:
        return None, "not measured (machine probe has no stream-read ceiling)", model
    return {int(k): float(v) for k, v in dict(ceiling).items()}, "machine probe stream-read ceiling", model


def ceiling_for(ceiling: dict[int, float] | None, threads: int) -> tuple[float | None, int | None]:
    """The ceiling measured with `threads` threads, else the closest thread count below (then above)."""
    if not ceiling:
        return None, None
    if threads in ceiling:
        return ceiling[threads], threads
    below = [t for t in ceiling if t < threads]
    key = max(below) if below else min(ceiling)
    return ceiling[key], key


@dataclass
class _Tracer:
    """The tracer's two entry points, looked up by name so an install without the tracer still runs."""

    env_for: Callable[[Path], dict[str, str]]  # environment that traces a child into this file
    read: Callable[[Path], Any]  # a parsed trace (its generation_ns are the per-token latencies)


def load_tracer(mode: str) -> tuple[_Tracer | None, str]:
    if mode == "off":
        return None, "per-token latency off (--latency off)"
    tracer: ModuleType | None
    try:
        from amppatch import tracer
    except ImportError:  # an install without the tracer measures no latency (auto) or refuses (on)
        tracer = None
    env_for = getattr(tracer, "tracer_env", None)
    read = getattr(tracer, "read_trace", None)
    if env_for is None or read is None:
        if mode == "on":
            raise UsageError("--latency on needs the amppatch tracer, which is not available in this install",
                             next_step="use --latency auto or off")
        return None, "per-token latency unavailable (the amppatch tracer is not available)"
    return _Tracer(lambda p: env_for(p, sample_hz=0), read), "tracer token hooks loaded in every arm"


def llc_counter_status() -> tuple[bool, str]:
    """Whether `perf stat` can count last-level cache misses here."""
    perf = shutil.which("perf")
    if perf is None:
        return False, "unavailable on this machine (perf is not installed)"
    done = run([perf, "stat", "-x", ",", "-e", "LLC-load-misses", "true"], check=False, timeout=30,
               what="perf stat probe")
    text = done.stderr + done.stdout
    if done.returncode != 0 or "<not supported>" in text or "<not counted>" in text:
        return False, "unavailable on this machine (no hardware cache counters: perf reports <not supported>)"
    return True, "perf stat -e LLC-load-misses"


def parse_perf_llc(text: str) -> int | None:
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) >= 3 and "LLC-load-misses" in parts[2] and parts[0].strip().isdigit():
            return int(parts[0])
    return None


