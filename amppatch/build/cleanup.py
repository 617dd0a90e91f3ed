"""Keeping the build cache clean: a build that fails or is interrupted is removed, and one whose process
was killed outright is removed by the next build that finds it abandoned (no manifest, lock free)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from amppatch.proc import progress

_BUILD_DIR_RE = re.compile(r"[0-9a-f]{16}(-[a-z]+)?")


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """The build lock `path` if no one holds it (yields True), else yields False at once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def remove_abandoned_builds(builds: Path) -> list[Path]:
    """Remove build directories without a manifest whose lock nobody holds: what a build killed outright
    (SIGKILL, power loss) left behind. A build in progress holds its lock, so it is never touched."""
    removed = []
    for entry in sorted(builds.iterdir()):
        if not entry.is_dir() or entry.is_symlink() or not _BUILD_DIR_RE.fullmatch(entry.name):
            continue
        if (entry / "manifest.json").is_file():
            continue
        with _try_lock(builds / f".{entry.name}.lock") as free:
            if free and entry.is_dir() and not (entry / "manifest.json").is_file():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    if removed:
        progress(f"build: removed {len(removed)} abandoned build director{'y' if len(removed) == 1 else 'ies'} "
                 f"(no manifest: failed or killed): {', '.join(p.name for p in removed)}")
    return removed


@contextlib.contextmanager
def _removed_unless_finished(build_dir: Path) -> Iterator[None]:
    """A build directory that does not get its manifest is deleted, whether the build failed or was
    interrupted (Ctrl-C): a half build is never reused and never left to grow the cache."""
    try:
        yield
    except BaseException:
        if not (build_dir / "manifest.json").is_file():
            shutil.rmtree(build_dir, ignore_errors=True)
            progress(f"build: removed the unfinished build directory {build_dir}")
        raise
