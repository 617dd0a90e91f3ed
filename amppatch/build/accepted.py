"""Which command-line flags a build's program accepts, read from its own `--help`.

llama.cpp's programs refuse an argument they do not know ("error: invalid argument"), and the set moved
between versions: llama-perplexity took `--no-warmup` only later, `-nr` (no weight repacking) did not exist
in early 2025. amppatch's optional flags go to a program only where its `--help` lists them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from amppatch.build.options import Build, run_env
from amppatch.proc import run

# An option line of llama.cpp's usage: its spellings, comma-separated, first on the line
# ("-h,    --help, --usage        print usage and exit", "-c,    --ctx-size N   size of the prompt context").
_OPTION_LINE_RE = re.compile(r"^\s*(-{1,2}[A-Za-z0-9][\w-]*(?:,\s*-{1,2}[A-Za-z0-9][\w-]*)*)")


def parse_help_flags(text: str) -> frozenset[str]:
    """Every flag spelling a llama.cpp usage text lists (pure)."""
    flags: set[str] = set()
    for line in text.splitlines():
        m = _OPTION_LINE_RE.match(line)
        if m:
            flags.update(part.strip() for part in m.group(1).split(","))
    return frozenset(flags)


# (binary, mtime) -> its flags: one --help per binary and process
_SEEN: dict[tuple[str, int], frozenset[str] | None] = {}


def accepted_flags(build: Build, role: str) -> frozenset[str] | None:
    """The flags the role's program of `build` accepts (None: its --help listed none, so unknown)."""
    binary = build.program(role)
    key = (str(binary), binary.stat().st_mtime_ns)
    if key not in _SEEN:
        done = run([str(binary), "--help"], env=run_env(build), timeout=120, check=False,
                   what=f"{binary.name} --help")
        _SEEN[key] = parse_help_flags(done.stdout + "\n" + done.stderr) or None  # no usage text: unknown
    return _SEEN[key]


def supported(flags: Sequence[str], *accepted: frozenset[str] | None) -> tuple[str, ...]:
    """The valueless `flags` every program accepts (an unknown set holds nothing back), in order (pure)."""
    return tuple(f for f in flags if all(known is None or f in known for known in accepted))
