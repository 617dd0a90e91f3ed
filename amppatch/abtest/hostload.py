"""Host load while ab-test runs: load average, cpufreq, CPU time shares and busy processes (reads /proc and
/sys; no subprocess)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def read_loadavg() -> dict[str, Any] | None:
    try:
        parts = Path("/proc/loadavg").read_text().split()
    except OSError:
        return None
    running, total = parts[3].split("/")
    return {"1min": float(parts[0]), "5min": float(parts[1]), "15min": float(parts[2]),
            "runnable": int(running), "threads": int(total)}


def read_cpufreq() -> dict[str, Any]:
    """Governor and boost/turbo where the kernel exposes them (VMs often expose neither)."""
    base = Path("/sys/devices/system/cpu")
    governors = sorted({p.read_text().strip() for p in base.glob("cpu[0-9]*/cpufreq/scaling_governor")
                        if p.is_file()})
    boost: str | None = None
    for path, meaning in ((base / "cpufreq/boost", "boost"), (base / "intel_pstate/no_turbo", "no_turbo")):
        try:
            value = path.read_text().strip()
        except OSError:
            continue
        boost = f"{meaning}={value}"
        break
    return {
        "governor": ",".join(governors) if governors else "not readable (no cpufreq in sysfs)",
        "boost": boost or "not readable",
    }


def read_cpu_times() -> dict[str, int] | None:
    """Machine-wide CPU ticks from /proc/stat (all CPUs summed)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    values = [int(v) for v in first[1 : 1 + len(names)]]
    return dict(zip(names, values, strict=False))


def own_cpu_ticks() -> int:
    """This process's CPU ticks plus those of its reaped children (every llama-bench it ran)."""
    text = Path("/proc/self/stat").read_text()
    rest = text[text.rfind(")") + 2 :].split()
    return sum(int(v) for v in rest[11:15])


def cpu_usage(before: dict[str, int] | None, after: dict[str, int] | None, own_ticks: int) -> dict[str, float] | None:
    """Shares of the whole machine's CPU capacity during timing: ours (ab-test and its llama-bench
    children), everybody else's, and the hypervisor's steal."""
    if not before or not after:
        return None
    delta = {k: after[k] - before.get(k, 0) for k in after}
    total = sum(delta.values())
    if total <= 0:
        return None
    busy = total - delta.get("idle", 0) - delta.get("iowait", 0) - delta.get("steal", 0)
    return {
        "busy": busy / total,
        "ours": min(own_ticks / total, 1.0),
        "others": max(busy - own_ticks, 0) / total,
        "steal": delta.get("steal", 0) / total,
    }


def _proc_cpu_ticks() -> dict[int, tuple[str, int]]:
    """pid → (name, CPU ticks of the process and of its reaped children). Counting reaped children makes
    a build tool visible even when each compiler it runs lives only a few seconds."""
    out: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue  # the process ended while we looked
        comm = text[text.find("(") + 1 : text.rfind(")")]
        rest = text[text.rfind(")") + 2 :].split()
        out[int(entry.name)] = (comm, sum(int(v) for v in rest[11:15]))
    return out


def busy_processes(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]], seconds: float,
                   *, exclude: set[int], threshold: float = 0.05) -> list[dict[str, Any]]:
    """Processes that used more than `threshold` of a CPU between two snapshots (ours excluded)."""
    hz = os.sysconf("SC_CLK_TCK")
    busy: list[dict[str, Any]] = []
    for pid, (comm, ticks) in after.items():
        if pid in exclude:
            continue
        start = before.get(pid, (comm, 0))[1] if pid in before else 0
        share = (ticks - start) / hz / max(seconds, 1e-9)
        if share >= threshold:
            busy.append({"pid": pid, "comm": comm, "cpu_share": round(share, 3)})
    return sorted(busy, key=lambda p: -p["cpu_share"])[:8]


