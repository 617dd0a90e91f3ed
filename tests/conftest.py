"""Fixtures both tiers use: a fake llama.cpp tree made of our own C fixtures, and one patch step on it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from amppatch.patch import analyze_requests, build_changes, parse_site_spec, plan_sites

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """A fake llama.cpp tree whose CPU backend holds our own C fixtures (never llama.cpp code)."""
    cpu = tmp_path / "ggml" / "src" / "ggml-cpu"
    cpu.mkdir(parents=True)
    for f in FIXTURES.iterdir():
        shutil.copy(f, cpu / f.name)
    return tmp_path


ApplyOnce = Callable[..., tuple]


@pytest.fixture()
def apply_once() -> ApplyOnce:
    """Plan, render and write the given site specs into a fixture tree; returns (plan, changes, applied)."""

    def _apply_once(tree: Path, specs: list[str], *, tunable: bool = False, line_size: int = 64):
        requests = [parse_site_spec(s, None, None) for s in specs]
        plan = plan_sites(requests, analyze_requests(tree, requests, None), line_size)
        changes, applied = build_changes(plan, tree, tunable=tunable, line_size=line_size)
        for ch in changes:
            (tree / ch.relpath).write_bytes(ch.after)
        return plan, changes, applied

    return _apply_once
