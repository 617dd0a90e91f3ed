"""Unit-test fixtures: the tier is pure, so starting a process fails the test."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf_files import write_small_gguf


class _SpawnBlocked(RuntimeError):
    """Raised when a unit test tries to start a process: such a test belongs in tests/integration."""


@pytest.fixture(autouse=True)
def _no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests are pure: any attempt to spawn a process fails the test, so a test that needs a compiler,
    git or llama.cpp cannot hide in the fast tier."""
    import os
    import subprocess

    def blocked(*args: object, **kwargs: object) -> None:
        raise _SpawnBlocked(f"unit tests may not start processes (tried {args[:1]!r}); move the test to "
                            "tests/integration")

    monkeypatch.setattr(subprocess, "Popen", blocked)
    for name in ("system", "posix_spawn", "posix_spawnp", "fork", "forkpty", "execv", "execve", "execvp",
                 "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, blocked)


@pytest.fixture()
def small_gguf(tmp_path: Path) -> Path:
    """A small but whole GGUF model file."""
    return write_small_gguf(tmp_path / "small.gguf")
