"""The build cache is keyed by content: clones of one commit share a build and its compile database, and a
failed build leaves nothing behind."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from amppatch.build import Build, BuildOptions, build, resolve
from amppatch.errors import BuildError
from amppatch.patch import ApplyOptions, apply
from amppatch.paths import cache_dir
from amppatch.workspace import FetchOptions, fetch_llama


def test_clones_of_the_pinned_commit_reuse_one_build_and_its_compile_db(
        llama_repo: Path, native_build: Build, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = fetch_llama(FetchOptions(dest=tmp_path / "one" / "llama.cpp"))
    second = fetch_llama(FetchOptions(dest=tmp_path / "two" / "elsewhere"))
    configure_dirs = sorted(cache_dir("builds").glob("configure-*"))
    try:
        for clone in (first, second):
            start = time.monotonic()
            again = build(BuildOptions(repo=clone, name="native"))
            seconds = time.monotonic() - start
            assert again.dir == native_build.dir, "a clone of the same commit must find the same build"
            assert again.manifest["created"] == native_build.manifest["created"]  # reused, not rebuilt
            assert seconds < 5, f"reusing took {seconds:.1f} s"
            assert again.manifest["repo"] == str(clone)  # the repository that asked last
        # apply on a clone takes the cached build's compile commands (recorded for amppatch's checkout) and
        # still decides the live loop in the clone's own files: no CMake configure
        capsys.readouterr()
        result = apply(ApplyOptions(repo=second, sites=("ggml_vec_dot_q8_0_q8_0",), dry_run=True))
        err = capsys.readouterr().err
        assert f"deciding live #if branches with {native_build.dir / 'compile_commands.json'}" in err
        assert "running CMake configure" not in err
        assert sorted(cache_dir("builds").glob("configure-*")) == configure_dirs
        (site,) = result.sites
        assert site.loop.live is True and "amppatch: ggml_vec_dot_q8_0_q8_0" in result.diff
    finally:
        build(BuildOptions(repo=llama_repo, name="native"))  # the manifest names the pinned tree again


def test_a_failed_build_leaves_no_directory(llama_repo: Path, native_build: Build) -> None:
    # configure succeeds (kernel flags reach only the ggml-cpu target), then the compiler rejects the flag
    options = BuildOptions(repo=llama_repo, name="broken", kernel_cflags="-fno-such-option-amppatch-test")
    dir_key = resolve(options).dir_key
    with pytest.raises(BuildError, match="failed") as info:
        build(options)
    assert "no-such-option-amppatch-test" in str(info.value)
    builds = cache_dir("builds")
    assert not (builds / dir_key).exists()
    assert not [p for p in builds.iterdir() if p.is_dir() and p.name.startswith(dir_key)]


def test_an_interrupted_child_takes_its_own_children_down(tmp_path: Path) -> None:
    """What an interrupted build relies on before it deletes its directory: the build tool and every
    compiler it started are gone when stream() returns (they would otherwise keep writing into it)."""
    import os

    from amppatch.proc import stream

    started: list[str] = []

    def interrupt(line: str) -> None:
        started.append(line)
        raise KeyboardInterrupt

    pid_file = tmp_path / "pids"
    script = f"sleep 60 & echo $! > {pid_file}; echo $$ >> {pid_file}; echo go; wait"
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        stream(["sh", "-c", script], on_line=interrupt)
    assert started == ["go"] and time.monotonic() - start < 15
    for pid in map(int, pid_file.read_text().split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
