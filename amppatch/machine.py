"""Machine probe: what this CPU and its memory can do, measured (cached per CPU and probe version).

Cache sizes come from sysfs, ISA macros from the compiler, THP mode and governor from sysfs; memory
latency from a pointer chase over a random cycle far larger than the LLC; stream-read bandwidth at 1..N
threads with and without transparent huge pages and with and without software prefetch at several
distances. The best stream-read figure per thread count is the ceiling ab-test and the benchmark divide by.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from amppatch import proc
from amppatch.errors import SubprocessError
from amppatch.paths import FileLock, cache_dir, write_text_atomic

SCHEMA_VERSION = 1
# Prefetch distances (bytes ahead) and hints the stream probe tries; "0" is the plain read.
STREAM_GRID: tuple[str, ...] = ("0", "256:0", "512:0", "1024:0", "2048:0", "4096:0", "512:3", "1024:3", "2048:3")
STREAM_SECONDS = 0.12  # per configuration; the best pass counts
MAX_PROBE_THREADS = 8  # keeps the probe within ~20 s on big machines


@dataclass(frozen=True)
class CacheLevel:
    level: int
    type: str  # Data, Instruction, Unified
    size_bytes: int
    shared_cpus: int


@dataclass(frozen=True)
class MachineInfo:
    schema_version: int
    key: str
    cpu_model: str
    cpu_count: int
    arch: str
    caches: list[CacheLevel]
    llc_bytes: int
    isa_macros: list[str]
    thp_mode: str
    governor: str
    latency_ns: float  # pointer chase, huge pages allowed (DRAM latency with few TLB misses)
    latency_ns_4k: float  # pointer chase, 4 KiB pages (what an mmapped model sees on a miss)
    latency_buffer_mib: int
    stream: list[dict] = field(default_factory=list)  # every measurement (threads, thp, distance, hint, gbps)
    stream_ceiling_gbps: dict[int, float] = field(default_factory=dict)  # best per thread count
    stream_plain_gbps: dict[int, float] = field(default_factory=dict)  # no prefetch, 4 KiB pages
    stream_best: dict[int, dict] = field(default_factory=dict)  # which configuration gave the ceiling
    stream_buffer_mib: int = 0
    probe_seconds: float = 0.0

    def to_json(self) -> dict:
        data = asdict(self)
        # JSON object keys are strings; readers convert back with int().
        for name in ("stream_ceiling_gbps", "stream_plain_gbps", "stream_best"):
            data[name] = {str(k): v for k, v in data[name].items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> MachineInfo:
        data = dict(data)
        data["caches"] = [CacheLevel(**c) for c in data["caches"]]
        for name in ("stream_ceiling_gbps", "stream_plain_gbps", "stream_best"):
            data[name] = {int(k): v for k, v in data.get(name, {}).items()}
        return cls(**data)

    def ceiling_for(self, threads: int) -> float | None:
        """The stream-read ceiling at `threads` (the largest measured count when more were asked)."""
        if not self.stream_ceiling_gbps:
            return None
        if threads in self.stream_ceiling_gbps:
            return self.stream_ceiling_gbps[threads]
        return self.stream_ceiling_gbps[max(self.stream_ceiling_gbps)]


def _read(path: str, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in mult:
        return int(text[:-1]) * mult[text[-1]]
    return int(text) if text.isdigit() else 0


def _count_cpus(cpu_list: str) -> int:
    n = 0
    for part in cpu_list.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            n += int(hi) - int(lo) + 1
        elif part.strip():
            n += 1
    return n


def read_caches(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> list[CacheLevel]:
    out: list[CacheLevel] = []
    for index in sorted(root.glob("index*")):
        level = _read(str(index / "level"))
        if not level.isdigit():
            continue
        out.append(
            CacheLevel(
                int(level),
                _read(str(index / "type")),
                _parse_size(_read(str(index / "size"))),
                _count_cpus(_read(str(index / "shared_cpu_list"), "0")),
            )
        )
    return out


def _bracketed(text: str) -> str:
    # "always [madvise] never" -> "madvise"
    if "[" in text and "]" in text:
        return text[text.index("[") + 1 : text.index("]")]
    return text or "unknown"


def _probe_binary() -> Path:
    from amppatch.ctools import compile_c_tool

    source = (resources.files("amppatch") / "probes" / "machine_probe.c").read_bytes()
    return compile_c_tool(source, "machine_probe", ("-O2", "-march=native", "-Wall"), ("-lpthread",))


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _mem_available_mib() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 4096


def _key() -> str:
    source = (resources.files("amppatch") / "probes" / "machine_probe.c").read_bytes()
    meminfo = _read("/proc/meminfo")
    ident = "\n".join([cpu_model(), str(os.cpu_count()), meminfo.splitlines()[0] if meminfo else ""])
    return hashlib.sha256(source + ident.encode() + repr(STREAM_GRID).encode()).hexdigest()[:16]


def summarize_stream(rows: list[dict]) -> tuple[dict[int, float], dict[int, float], dict[int, dict]]:
    """Best figure per thread count (the ceiling), the plain one (no prefetch, no THP), and which won."""
    ceiling: dict[int, float] = {}
    plain: dict[int, float] = {}
    best: dict[int, dict] = {}
    for r in rows:
        t = int(r["threads"])
        if r["gbps"] > ceiling.get(t, 0.0):
            ceiling[t] = float(r["gbps"])
            best[t] = {k: r[k] for k in ("thp", "distance", "hint", "gbps")}
        if r["distance"] == 0 and r["thp"] == 0:
            plain[t] = float(r["gbps"])
    return ceiling, plain, best


def probe_machine(refresh: bool = False) -> MachineInfo:
    """Measure this machine once (≈10–20 s) and cache the result under cache_dir('tools')."""
    key = _key()
    tools = cache_dir("tools")
    cached = tools / f"machine-{key}.json"
    with FileLock(tools / f".machine-{key}.lock"):
        if cached.is_file() and not refresh:
            try:
                return MachineInfo.from_json(json.loads(cached.read_text(encoding="utf-8")))
            except (ValueError, KeyError, TypeError):  # a damaged cache entry (not UTF-8/JSON, old layout)
                proc.progress(f"machine probe: {cached} is unreadable; measuring again")
        start = time.monotonic()
        proc.progress("machine probe: caches, ISA, memory latency and stream bandwidth (≈15 s, cached afterwards)")
        caches = read_caches()
        llc = max((c.size_bytes for c in caches if c.type != "Instruction"), default=32 << 20)
        cc = proc.require_tool(os.environ.get("CC") or "cc", install_hint="install a C compiler (apt-get install gcc)")
        from amppatch.features import native_macros

        isa_prefixes = ("__AVX", "__AMX", "__SSE", "__FMA", "__F16C", "__ARM_")
        macros = sorted(m for m in native_macros(cc) if m.startswith(isa_prefixes))
        exe = _probe_binary()
        avail = _mem_available_mib()
        lat_mib = int(min(max(256, 8 * llc >> 20), max(64, avail // 4)))
        stream_mib = int(min(max(512, 16 * llc >> 20), max(64, avail // 4)))
        threads = max(1, min(os.cpu_count() or 1, MAX_PROBE_THREADS))
        lat: dict[int, float] = {}
        for thp in (1, 0):
            done = proc.run([exe, "latency", str(lat_mib), str(thp)], timeout=120, what="machine probe (latency)")
            lat[thp] = float(_json_lines(done.stdout)[0]["ns"])
        rows: list[dict] = []
        for thp in (1, 0):
            done = proc.run(
                [exe, "stream", str(stream_mib), str(threads), str(thp), str(STREAM_SECONDS), *STREAM_GRID],
                timeout=300,
                what="machine probe (stream)",
            )
            rows += _json_lines(done.stdout)
        if not rows:
            raise SubprocessError("the machine probe printed no stream results", next_step=f"run it by hand: {exe}")
        ceiling, plain, best = summarize_stream(rows)
        info = MachineInfo(
            schema_version=SCHEMA_VERSION,
            key=key,
            cpu_model=cpu_model(),
            cpu_count=os.cpu_count() or 1,
            arch=platform.machine(),
            caches=caches,
            llc_bytes=llc,
            isa_macros=macros,
            thp_mode=_bracketed(_read("/sys/kernel/mm/transparent_hugepage/enabled")),
            governor=_read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor", "unavailable (no cpufreq)"),
            latency_ns=lat[1],
            latency_ns_4k=lat[0],
            latency_buffer_mib=lat_mib,
            stream=rows,
            stream_ceiling_gbps=ceiling,
            stream_plain_gbps=plain,
            stream_best=best,
            stream_buffer_mib=stream_mib,
            probe_seconds=round(time.monotonic() - start, 2),
        )
        write_text_atomic(cached, json.dumps(info.to_json(), indent=2))
        return info
