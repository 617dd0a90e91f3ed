"""Which ISA features a native build will use, and whether this CPU really executes them.

Some VMs advertise features (CPUID, so `-march=native` enables them) that fault when executed — AMX tiles
raise SIGILL on some clouds. A tiny probe per feature runs in a child; a feature that faults is disabled in
the kernel flags of the build by default, and the reason goes into the build manifest.
"""

from __future__ import annotations

import hashlib
import json
import signal
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from amppatch.paths import FileLock, cache_dir, write_text_atomic
from amppatch.proc import require_tool, run


@dataclass(frozen=True)
class Feature:
    name: str  # the probe's argument and the GCC -m suffix
    macro: str  # what `-march=native` defines when the compiler will use it
    disable: tuple[str, ...]  # flags that keep the compiler from emitting it (dependants included)


FEATURES: tuple[Feature, ...] = (
    Feature("avx2", "__AVX2__", ("-mno-avx2",)),
    Feature("avx512f", "__AVX512F__", ("-mno-avx512f",)),
    Feature("avx512vnni", "__AVX512VNNI__", ("-mno-avx512vnni",)),
    Feature("avx512bf16", "__AVX512BF16__", ("-mno-avx512bf16",)),
    Feature("avxvnni", "__AVXVNNI__", ("-mno-avxvnni",)),
    Feature("amx-tile", "__AMX_TILE__", ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")),
    Feature("amx-int8", "__AMX_INT8__", ("-mno-amx-int8",)),
)


@dataclass(frozen=True)
class IsaReport:
    """What the compiler would use with -march=native and what the CPU actually ran."""

    compiler: str
    advertised: tuple[str, ...]  # feature names whose macro -march=native defines
    executes: dict[str, bool]  # per advertised feature: ran cleanly (True) or faulted (False)
    detail: dict[str, str]  # per feature: how the probe ended

    @property
    def faulting(self) -> tuple[str, ...]:
        return tuple(name for name, ok in self.executes.items() if not ok)


def disable_flags(report: IsaReport) -> tuple[str, ...]:
    """Compiler flags that remove every faulting feature from a native build (pure)."""
    flags: list[str] = []
    by_name = {f.name: f for f in FEATURES}
    for name in report.faulting:
        for flag in by_name[name].disable:
            if flag not in flags:
                flags.append(flag)
    return tuple(flags)


def native_macros(compiler: str) -> set[str]:
    """The macros `-march=native` defines for this compiler on this CPU."""
    done = run([compiler, "-march=native", "-dM", "-E", "-x", "c", "-"], input_text="", what=f"{compiler} -dM -E")
    return {line.split()[1] for line in done.stdout.splitlines() if line.startswith("#define ")}


def _cpu_identity() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "microcode"))]
    return "\n".join(sorted(set(keep)))


def probe_isa(compiler: str = "cc", *, refresh: bool = False) -> IsaReport:
    """Probe (or load the cached result for this compiler and CPU) which native features execute."""
    compiler_path = require_tool(compiler, install_hint="install a C compiler (apt-get install -y gcc)")
    version = run([compiler_path, "--version"]).stdout.splitlines()[0]
    source = (resources.files("amppatch") / "probes" / "isa_probe.c").read_bytes()
    key = hashlib.sha256("\0".join([version, _cpu_identity(), source.decode()]).encode()).hexdigest()[:16]
    tools = cache_dir("tools")
    cached = tools / f"isa-{key}.json"
    with FileLock(tools / f".isa-{key}.lock"):
        if cached.is_file() and not refresh:
            try:
                data = json.loads(cached.read_text(encoding="utf-8"))
                return IsaReport(data["compiler"], tuple(data["advertised"]), data["executes"], data["detail"])
            except (ValueError, KeyError, TypeError):
                pass  # a damaged cache entry (not UTF-8/JSON, old layout) is probed again
        macros = native_macros(compiler_path)
        advertised = tuple(f.name for f in FEATURES if f.macro in macros)
        src = tools / f"isa_probe-{key}.c"
        exe = tools / f"isa_probe-{key}"
        src.write_bytes(source)
        run([compiler_path, "-O1", "-march=native", "-o", exe, src], what="compiling the ISA probe")
        executes: dict[str, bool] = {}
        detail: dict[str, str] = {}
        for name in advertised:
            done = run([exe, name], check=False, timeout=30)
            executes[name] = done.returncode == 0
            if done.returncode == 0:
                detail[name] = "executes"
            elif done.returncode == -signal.SIGILL:
                detail[name] = "advertised by the CPU but faults (SIGILL) when executed"
            else:
                detail[name] = f"probe failed ({done.returncode}): {done.stderr.strip()[:200]}"
        report = IsaReport(version, advertised, executes, detail)
        write_text_atomic(cached, json.dumps(asdict(report), indent=2))
        return report
