"""Small LD_PRELOAD shims a build's binaries may need at run time (compiled on first use, cached)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from amppatch.ctools import compile_c_tool


def amx_permit_library() -> Path:
    """libamxpermit.so: grants ggml's AMX permission request (see amx_permit.c for why and what)."""
    source = (resources.files("amppatch") / "shims" / "amx_permit.c").read_bytes()
    return compile_c_tool(source, "libamxpermit.so", ("-O2", "-fPIC", "-shared", "-Wall", "-Wextra"), ("-ldl",))
