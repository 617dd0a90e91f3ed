"""Shared unit-test fixtures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from gguf_files import write_small_gguf

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """A fake llama.cpp tree whose CPU backend holds our own C fixtures (never llama.cpp code)."""
    cpu = tmp_path / "ggml" / "src" / "ggml-cpu"
    cpu.mkdir(parents=True)
    for f in FIXTURES.iterdir():
        shutil.copy(f, cpu / f.name)
    return tmp_path



@pytest.fixture()
def small_gguf(tmp_path: Path) -> Path:
    """A small but whole GGUF model file."""
    return write_small_gguf(tmp_path / "small.gguf")
