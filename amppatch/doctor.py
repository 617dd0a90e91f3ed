"""Preflight: what this machine can do for amppatch (tools, ISA features that really execute, counters)."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

from amppatch.errors import AmppatchError
from amppatch.features import probe_isa
from amppatch.hugepages import HugePagesReport, HugetlbPool, ThpModes, filesystem_of, parse_probe_output
from amppatch.machine import cpu_model
from amppatch.paths import cache_dir, cache_root
from amppatch.proc import run

THP_SYSFS = Path("/sys/kernel/mm/transparent_hugepage")
PROBE_MIB = 16  # size of the huge-page probe's temporary file (8 PMDs)


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
    huge_pages: HugePagesReport | None = None

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


def _huge_page_probe_binary() -> Path:
    from amppatch.ctools import compile_c_tool

    source = (resources.files("amppatch") / "probes" / "hugepage_probe.c").read_bytes()
    return compile_c_tool(source, "hugepage_probe", ("-O2", "-Wall"))


def probe_huge_pages(directory: Path | None = None, mib: int = PROBE_MIB) -> HugePagesReport:
    """THP modes, the hugetlb pool, and — measured by a C probe that writes a `mib`-MiB temporary file in
    `directory` (default: the model cache, so the same filesystem as the models) and removes it — whether
    a read-only file mapping gets PMD-mapped huge pages after MADV_HUGEPAGE, and whether MADV_COLLAPSE is
    accepted on anonymous and on file memory."""
    directory = (directory or cache_dir("models")).resolve()
    thp = ThpModes.parse(_read(str(THP_SYSFS / "enabled")), _read(str(THP_SYSFS / "defrag")),
                         _read(str(THP_SYSFS / "shmem_enabled")))
    hugetlb = HugetlbPool.parse_meminfo(_read("/proc/meminfo") or "")
    filesystem = filesystem_of(str(directory), _read("/proc/mounts") or "")
    base = HugePagesReport(thp=thp, hugetlb=hugetlb, directory=str(directory), filesystem=filesystem)
    try:
        exe = _huge_page_probe_binary()
        done = run([exe, directory, str(mib)], timeout=120, what="huge-page probe")
    except AmppatchError as error:
        return replace(base, probe_error=str(error).splitlines()[0])
    files, collapses = parse_probe_output(done.stdout)
    return replace(base, file_thp=files, collapse=collapses)


def _collapse_detail(report: HugePagesReport) -> str:
    parts = []
    for probe in report.collapse:
        if probe.error:
            parts.append(f"{probe.on}: not tested ({probe.error})")
        elif probe.accepted:
            parts.append(f"{probe.on}: accepted ({probe.huge_bytes / 2**20:.0f} MiB on huge pages)")
        else:
            parts.append(f"{probe.on}: refused ({probe.errno})")
    return "; ".join(parts) or "not tested"


def huge_page_checks(report: HugePagesReport) -> list[Check]:
    """The huge-page lines of doctor's summary (none of them required)."""
    pool = report.hugetlb
    return [
        Check("file-backed THP", report.file_thp_works, report.summary().removeprefix("file-backed THP: ")),
        Check("MADV_COLLAPSE", any(p.accepted for p in report.collapse), _collapse_detail(report)),
        Check("hugetlb pool", pool.total_pages > 0,
              f"{pool.free_pages} of {pool.total_pages} pages free, {pool.page_size_bytes // 1024} KiB each"),
    ]


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
    huge = probe_huge_pages()
    checks.extend(huge_page_checks(huge))
    free = shutil.disk_usage(cache_root().parent if not cache_root().exists() else cache_root()).free
    checks.append(Check("disk", free > 8 << 30, f"{free / 2**30:.1f} GiB free for {cache_root()} "
                        "(a 1.1B model set and a few builds need ~8 GiB)"))
    facts = {
        "cpu_model": cpu_model(),
        "cpus": str(os.cpu_count()),
        "kernel": platform.release(),
        "thp": f"enabled={huge.thp.enabled} defrag={huge.thp.defrag} shmem_enabled={huge.thp.shmem_enabled}",
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") or "not exposed (VM?)",
        "boost": _read("/sys/devices/system/cpu/cpufreq/boost") or "not exposed",
        "cache_root": str(cache_root()),
    }
    return DoctorReport(tuple(checks), facts, huge)


def report_dict(report: DoctorReport) -> dict:
    data = {"schema_version": 1, "ready": report.ready, "checks": [asdict(c) for c in report.checks],
            "facts": report.facts}
    if report.huge_pages is not None:
        data["huge_pages"] = report.huge_pages.to_json()
    return data
