"""Preflight: what this machine can do for amppatch (tools, ISA features that really execute, counters)."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from amppatch.errors import AmppatchError
from amppatch.features import probe_isa
from amppatch.machine import cpu_model
from amppatch.paths import cache_root
from amppatch.proc import run


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = False


@dataclass(frozen=True)
class DoctorReport:
    checks: tuple[Check, ...]
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return all(c.ok for c in self.checks if c.required)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _tool_version(name: str, args: tuple[str, ...] = ("--version",)) -> tuple[bool, str]:
    path = shutil.which(name)
    if path is None:
        return False, "not installed"
    done = run([path, *args], check=False, timeout=30)
    first = (done.stdout or done.stderr).strip().splitlines()
    return done.returncode == 0, first[0] if first else "?"


def _perf_counters() -> tuple[bool, str]:
    perf = shutil.which("perf")
    if perf is None:
        return False, "perf not installed (apt-get install -y linux-perf); cache-miss counts unavailable"
    done = run([perf, "stat", "-x,", "-e", "instructions", "true"], check=False, timeout=30)
    text = done.stderr + done.stdout
    if done.returncode == 0 and "not supported" not in text and "<not counted>" not in text:
        return True, "hardware counters available"
    return False, "no hardware counters on this machine (perf stat says not supported); the sampler is used"


def diagnose() -> DoctorReport:
    checks: list[Check] = []
    for name, hint in (("cc", "apt-get install -y gcc"), ("c++", "apt-get install -y g++"),
                       ("cmake", "apt-get install -y cmake"), ("git", "apt-get install -y git")):
        ok, detail = _tool_version(name)
        checks.append(Check(name, ok, detail if ok else f"{detail} ({hint})", required=True))
    for name, why in (("ninja", "faster incremental builds"), ("ccache", "patched rebuilds in seconds")):
        ok, detail = _tool_version(name)
        checks.append(Check(name, ok, detail if ok else f"{detail} — optional, for {why} (apt-get install -y {name})"))
    ok, detail = _tool_version("gdb")
    checks.append(Check("gdb", ok, detail if ok else "not installed — optional"))
    try:
        isa = probe_isa()
        for feature in isa.advertised:
            runs = isa.executes[feature]
            checks.append(Check(f"isa:{feature}", runs, isa.detail[feature] if runs else
                                f"{isa.detail[feature]}; native builds leave it out by default"))
    except AmppatchError as error:
        checks.append(Check("isa probe", False, str(error)))
    ok, detail = _perf_counters()
    checks.append(Check("hardware counters", ok, detail))
    free = shutil.disk_usage(cache_root().parent if not cache_root().exists() else cache_root()).free
    checks.append(Check("disk", free > 8 << 30, f"{free / 2**30:.1f} GiB free for {cache_root()} "
                        "(a 1.1B model set and a few builds need ~8 GiB)"))
    facts = {
        "cpu_model": cpu_model(),
        "cpus": str(os.cpu_count()),
        "kernel": platform.release(),
        "thp": _read("/sys/kernel/mm/transparent_hugepage/enabled") or "unknown",
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") or "not exposed (VM?)",
        "boost": _read("/sys/devices/system/cpu/cpufreq/boost") or "not exposed",
        "cache_root": str(cache_root()),
    }
    return DoctorReport(tuple(checks), facts)


def report_dict(report: DoctorReport) -> dict:
    return {"schema_version": 1, "ready": report.ready, "checks": [asdict(c) for c in report.checks],
            "facts": report.facts}
