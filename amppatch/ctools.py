"""Small C programs amppatch compiles on first use (the tracer, the machine and huge-page probes, the
roofline microbenchmark, the AMX permission shim), cached by source, compiler and flags.

It lives apart from the tracer because most of its users are not the tracer: the machine probe, doctor,
roofline and the shims would otherwise import the tracer package to build unrelated programs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from amppatch import proc
from amppatch.errors import BuildError
from amppatch.paths import FileLock, cache_dir

__all__ = ["compile_c_tool"]


def compile_c_tool(source: bytes, name: str, flags: tuple[str, ...], libs: tuple[str, ...] = ()) -> Path:
    """Compile one C file into cache_dir('tools')/<name>-<hash>/<name>, keyed by source, compiler and flags.

    Shared by the tracer and the probes; a FileLock makes concurrent first uses compile once.
    """
    cc = proc.require_tool(os.environ.get("CC") or "cc", install_hint="install a C compiler (apt-get install gcc)")
    version = proc.run([cc, "--version"], what="cc --version").stdout.splitlines()[0]
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags + libs).encode()])).hexdigest()[:16]
    out_dir = cache_dir("tools") / f"{name}-{key}"
    target = out_dir / name
    if target.exists():
        return target
    with FileLock(out_dir.with_suffix(".lock")):
        if target.exists():
            return target
        out_dir.mkdir(parents=True, exist_ok=True)
        src = out_dir / f"{name}.c"
        src.write_bytes(source)
        tmp = out_dir / f".{name}.tmp{os.getpid()}"
        done = proc.run([cc, *flags, "-o", str(tmp), str(src), *libs], check=False, what=f"compiling {name}")
        if done.returncode != 0:
            raise BuildError(
                f"compiling {name} with {cc} failed: {proc.describe_returncode(done.returncode)}",
                next_step="check the compiler installation; the error lines follow",
                returncode=done.returncode,
                output_tail=done.stderr[-4000:],
            )
        os.replace(tmp, target)
    return target
