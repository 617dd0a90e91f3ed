"""The companion tracer: compiled on first use, loaded into a workload with LD_PRELOAD.

Public API (the ab-test helper imports exactly these two names):
    tracer_env(out_path, *, sample_hz=0) -> dict[str, str]   environment to add to a child's
    read_trace(path) -> Trace                                  samples, regions, modules, token_ns
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from amppatch import proc
from amppatch.ctools import compile_c_tool
from amppatch.errors import ToolMissingError
from amppatch.tracer.reader import FORMAT_VERSION, Trace, read_trace, trace_files

__all__ = ["FORMAT_VERSION", "Trace", "read_trace", "sanitizer_runtime", "trace_files", "tracer_env", "tracer_library"]

_BASE_FLAGS = ("-O2", "-g", "-fPIC", "-shared", "-Wall", "-Wextra")
# The sanitized variant exists for the stress test: it must behave exactly like the plain one.
_SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined")


def _source() -> bytes:
    return (resources.files("amppatch") / "tracer" / "amptrace.c").read_bytes()


def tracer_library(*, sanitize: bool = False) -> Path:
    """Path of the compiled tracer (libamptrace.so), compiled and cached on first use."""
    flags = _BASE_FLAGS + (_SANITIZE_FLAGS if sanitize else ())
    name = "libamptrace-asan.so" if sanitize else "libamptrace.so"
    return compile_c_tool(_source(), name, flags, ("-ldl", "-lpthread"))


def sanitizer_runtime() -> Path:
    """The ASan runtime that must come first in LD_PRELOAD when the sanitized tracer is preloaded."""
    cc = proc.require_tool(os.environ.get("CC") or "cc", install_hint="install a C compiler (apt-get install gcc)")
    path = Path(proc.run([cc, "-print-file-name=libasan.so"], what="cc -print-file-name").stdout.strip())
    if not path.is_absolute() or not path.exists():
        raise ToolMissingError("the compiler has no AddressSanitizer runtime (libasan.so)", next_step="install libasan")
    return path.resolve()


def tracer_env(out_path: Path, *, sample_hz: int = 0, sanitize: bool = False,
               base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables that run a child under the tracer, writing `out_path`.

    sample_hz=0 records token boundaries and memory regions only (no timers, no signals); otherwise every
    thread is sampled at that many samples per second of its CPU time (the kernel delivers at most one per
    scheduler tick; the samples' weights count the ticks in between). Add the result to the child's
    environment (it keeps any LD_PRELOAD already set in `base_env`, default os.environ). The child spawned
    by *this* process writes `out_path`; traced grandchildren write `out_path.<pid>`. A stale file at
    out_path is removed.
    """
    out_path = Path(out_path).resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in trace_files(out_path):
        stale.unlink(missing_ok=True)
    preload = [str(tracer_library(sanitize=sanitize))]
    if sanitize:
        preload.insert(0, str(sanitizer_runtime()))
    existing = (os.environ if base_env is None else base_env).get("LD_PRELOAD", "")
    if existing:
        preload.append(existing)
    env = {
        "LD_PRELOAD": ":".join(preload),
        "AMPTRACE_OUT": str(out_path),
        "AMPTRACE_HZ": str(int(sample_hz)),
        "AMPTRACE_PARENT": str(os.getpid()),
    }
    if sanitize:
        # Leak reports would be about the traced program, not the tracer (whose buffers live until the file
        # is written); and the program's own crashes must reach the tracer's handler, which re-raises them,
        # instead of ASan's, which would turn them into exit status 1.
        env["ASAN_OPTIONS"] = (
            "detect_leaks=0:handle_segv=0:handle_sigbus=0:handle_sigfpe=0:handle_sigill=0:handle_abort=0"
        )
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env
