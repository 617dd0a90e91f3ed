"""Where amppatch keeps heavy artifacts: outside any repository, under the user's cache dir (XDG)."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amppatch.inputs import write_error

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


def cache_root() -> Path:
    """$AMPPATCH_CACHE_DIR, else $XDG_CACHE_HOME/amppatch, else ~/.cache/amppatch."""
    explicit = os.environ.get("AMPPATCH_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "amppatch").resolve()


# The kinds of artifact `amppatch clean` knows, each in its own subdirectory of the cache root.
CACHE_KINDS: dict[str, str] = {
    "sources": "downloaded llama-cpp-python source archives",
    "trees": "llama.cpp source trees made into git repositories",
    "builds": "CMake build directories with their manifests",
    "models": "synthetic GGUF models",
    "tools": "compiled helper programs (feature probes, tracer, machine probe)",
    "worktrees": "git worktrees amppatch uses to build patched branches",
}


def cache_dir(kind: str) -> Path:
    """The directory for one kind of artifact (created on demand)."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"unknown cache kind {kind!r}")
    path = cache_root() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


class FileLock:
    """An exclusive advisory lock (flock) on `path`, so two amppatch processes never build into or fetch
    into the same cache entry at once; the second waits and then finds the first one's finished result."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> FileLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written result file; on any
    failure (disk full, a directory in the way, Ctrl-C) the temporary file is removed and an OSError becomes
    one WriteError line naming the path and the cause."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path.parent, exc, "create") from None
    if path.is_dir():
        raise write_error(path, IsADirectoryError(errno.EISDIR, "Is a directory"))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise


def save_figure_atomic(fig: Any, path: Path, *, dpi: int = 110) -> Path:
    """Save a matplotlib figure the way write_text_atomic writes text: to a temporary file renamed into place,
    which a failure removes (an OSError becomes one WriteError line); the figure is closed either way."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        tmp.replace(path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # a failed render leaves no temporary file
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise
    finally:
        plt.close(fig)
    return path


def options_json(options: DataclassInstance) -> dict[str, Any]:
    """A frozen options dataclass (nested ones included) as plain JSON values, for result files."""
    import dataclasses
    import json

    return json.loads(json.dumps(dataclasses.asdict(options), default=str))
