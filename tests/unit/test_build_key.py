"""The build key is content (commit, compiler, flags, options), not where the user's tree lives; failed or
abandoned build directories do not stay in the cache."""

from __future__ import annotations

import fcntl
import os
from dataclasses import replace
from pathlib import Path

import pytest

from amppatch.build import ResolvedBuild, _removed_unless_finished, remove_abandoned_builds


def _resolved(**changes: object) -> ResolvedBuild:
    base = ResolvedBuild(repo="/src/a/llama.cpp", source_dir="/cache/worktrees/source", in_place=False,
                         commit="9fefe40" + "0" * 33, dirty_hash=None, compiler="/usr/bin/cc",
                         compiler_version="cc (Debian 12.2.0-14) 12.2.0", cflags="", kernel_cflags="",
                         cmake_options={"GGML_NATIVE": "ON", "CMAKE_BUILD_TYPE": "Release"}, pgo=False,
                         pgo_training=None, isa_disabled=("-mno-amx-tile",))
    return replace(base, **changes)  # type: ignore[arg-type]


def test_two_clones_of_one_commit_share_the_key():
    a = _resolved(repo="/src/a/llama.cpp")
    b = _resolved(repo="/tmp/elsewhere/clone")
    assert a.key == b.key and a.dir_key == b.dir_key
    assert "repo" not in a.key_fields() and "source_dir" not in a.key_fields()


@pytest.mark.parametrize("change", [
    {"commit": "1" * 40},
    {"cflags": "-O2"},
    {"kernel_cflags": "-fprefetch-loop-arrays"},
    {"cmake_options": {"GGML_NATIVE": "OFF", "CMAKE_BUILD_TYPE": "Release"}},
    {"compiler_version": "cc (GCC) 14.1.0"},
    {"compiler": "/usr/bin/clang"},
    {"isa_disabled": ()},
    {"pgo": True, "pgo_training": "/m/tiny.gguf:123"},
    {"amx_batch1": True},
])
def test_what_changes_the_binaries_changes_the_key(change: dict):
    assert _resolved(**change).key != _resolved().key


def test_a_dirty_in_place_build_keeps_its_path_in_the_key():
    a = _resolved(repo="/src/a/llama.cpp", source_dir="/src/a/llama.cpp", in_place=True, dirty_hash="d1")
    b = replace(a, repo="/src/b/llama.cpp", source_dir="/src/b/llama.cpp")
    assert a.key != b.key and a.dir_key != b.dir_key  # built in place: other paths, other objects
    edited = replace(a, dirty_hash="d2")
    assert edited.key != a.key and edited.dir_key == a.dir_key  # successive edits rebuild in one directory
    assert a.key != _resolved().key  # and never the clean build's key


def _make_build_dir(builds: Path, name: str, *, manifest: bool) -> Path:
    d = builds / name
    (d / "bin").mkdir(parents=True)
    (d / "CMakeCache.txt").write_text("x\n")
    if manifest:
        (d / "manifest.json").write_text("{}\n")
    return d


def test_abandoned_build_dirs_are_removed_but_not_finished_or_locked_ones(tmp_path: Path):
    finished = _make_build_dir(tmp_path, "0123456789abcdef", manifest=True)
    abandoned = _make_build_dir(tmp_path, "fedcba9876543210", manifest=False)
    abandoned_side = _make_build_dir(tmp_path, "fedcba9876543210-tests", manifest=False)
    in_progress = _make_build_dir(tmp_path, "00000000000000aa", manifest=False)
    other = _make_build_dir(tmp_path, "configure-0123456789abcdef", manifest=False)  # not a build: kept
    fd = os.open(tmp_path / f".{in_progress.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process is building it
        removed = remove_abandoned_builds(tmp_path)
    finally:
        os.close(fd)
    assert sorted(removed) == sorted([abandoned, abandoned_side])
    assert not abandoned.exists() and not abandoned_side.exists()
    assert finished.is_dir() and in_progress.is_dir() and other.is_dir()


@pytest.mark.parametrize("exc", [RuntimeError("compiler failed"), KeyboardInterrupt()])
def test_an_unfinished_build_dir_is_removed_on_failure_or_interrupt(tmp_path: Path, exc: BaseException):
    d = _make_build_dir(tmp_path, "0123456789abcdef", manifest=False)
    with pytest.raises(type(exc)), _removed_unless_finished(d):
        raise exc
    assert not d.exists()
    kept = _make_build_dir(tmp_path, "fedcba9876543210", manifest=True)
    with pytest.raises(RuntimeError), _removed_unless_finished(kept):
        raise RuntimeError("after the manifest was written")
    assert kept.is_dir()
