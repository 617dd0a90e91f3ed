"""The `amppatch build` stage: build (or reuse) llama.cpp for some options, and side builds of one extra
target from a finished build's source."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from amppatch.build.cleanup import _removed_unless_finished, remove_abandoned_builds
from amppatch.build.cmake import _configure_and_build
from amppatch.build.options import SCHEMA_VERSION, Build, BuildOptions, load_build
from amppatch.build.pgo import _pgo_train
from amppatch.build.programs import TreePrograms, require_programs
from amppatch.build.resolution import (
    ResolvedBuild,
    _check_source_unchanged,
    _prepare_worktree,
    _resolved_of,
    resolve_with_programs,
)
from amppatch.errors import BuildError
from amppatch.features import probe_isa
from amppatch.paths import FileLock, cache_dir, write_text_atomic
from amppatch.proc import progress, require_tool, run
from amppatch.workspace import describe_tree


def _reused(existing: Build, rb: ResolvedBuild, manifest_path: Path, programs: TreePrograms) -> Build:
    """A finished build found for a request. Its key does not depend on the repository (for a clean or
    --ref build), so another clone may find it: the manifest's `repo` is updated to the repository that
    asked last (what `--like` and model synthesis read), and `programs` is added to a manifest written
    before manifests recorded them; everything else stays as built."""
    if existing.manifest.get("repo") == rb.repo and existing.manifest.get("programs") == programs.to_json():
        return existing
    manifest = {**existing.manifest, "repo": rb.repo, "programs": programs.to_json()}
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return Build(existing.dir, manifest, existing.source_dir)


def build(options: BuildOptions) -> Build:
    """Build (or reuse) llama.cpp for `options`; returns the finished build."""
    rb, programs = resolve_with_programs(options)
    # The default targets name roles (llama-completion: a greedy completion); a tree may call them otherwise
    require_programs(programs, programs.roles_of(options.targets), describe_tree(Path(rb.repo), rb.commit))
    targets = tuple(dict.fromkeys(programs.target_for(t) for t in options.targets))
    builds = cache_dir("builds")
    remove_abandoned_builds(builds)
    build_dir = builds / rb.dir_key
    label = options.name or f"build {rb.key}"
    with FileLock(builds / f".{rb.dir_key}.lock"):
        manifest_path = build_dir / "manifest.json"
        existing = load_build(build_dir) if manifest_path.is_file() else None
        if existing is not None and existing.manifest.get("key") != rb.key:
            existing = None  # the same tree with other uncommitted changes: rebuild incrementally
        if existing is not None and all((build_dir / "bin" / t).is_file() for t in targets):
            progress(f"{label}: reusing {build_dir}")
            return _reused(existing, rb, manifest_path, programs)
        previous_targets = existing.manifest.get("targets", []) if existing is not None else []
        source_lock = FileLock(Path(rb.source_dir + ".lock")) if not rb.in_place else contextlib.nullcontext()
        start = time.monotonic()
        build_dir.mkdir(parents=True, exist_ok=True)
        # No manifest while building: an interrupted or failed build is never taken for a good one.
        manifest_path.unlink(missing_ok=True)
        kernel = rb.kernel_flags()
        with _removed_unless_finished(build_dir), source_lock:
            if not rb.in_place:
                _prepare_worktree(Path(rb.repo), Path(rb.source_dir), rb.commit)
            if rb.pgo:
                gcda = build_dir / "pgo-data"
                shutil.rmtree(gcda, ignore_errors=True)
                gen = [f"-fprofile-generate={gcda}", "-fprofile-update=prefer-atomic"]
                _configure_and_build(rb, build_dir, targets, f"{label} (pgo: instrumented)", kernel + gen,
                                     ["-fprofile-generate"])
                _pgo_train(rb, build_dir)
                use = [f"-fprofile-use={gcda}", "-fprofile-partial-training", "-Wno-missing-profile"]
                _configure_and_build(rb, build_dir, targets, f"{label} (pgo: optimized)", kernel + use, [])
            else:
                _configure_and_build(rb, build_dir, targets, label, kernel, [])
            seconds = time.monotonic() - start
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "key": rb.key,
                "name": options.name,
                **{k: v for k, v in asdict(rb).items()},
                "ref": options.ref,
                "kernel_flags_applied": kernel,
                "isa": _isa_summary(rb),
                "targets": sorted(set(previous_targets) | set(targets)),
                "programs": programs.to_json(),
                "build_seconds": round(seconds, 1),
                "build_dir": str(build_dir),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
        progress(f"{label}: built in {seconds:.0f} s -> {build_dir}")
        return Build(build_dir, manifest, Path(rb.source_dir))


def source_text(build_: Build, relpath: str) -> str | None:
    """A file of the source a build compiled, as of its commit (None when the tree has no such file). The
    shared checkout may have moved on to another commit since, so its text comes from git, not the disk."""
    rb = _resolved_of(build_)
    if rb.in_place:
        path = Path(rb.source_dir) / relpath
        return path.read_text(errors="replace") if path.is_file() else None
    git = require_tool("git", install_hint="install git (apt-get install -y git)")
    done = run([git, "-C", rb.source_dir, "show", f"{rb.commit}:{relpath}"], check=False)
    return done.stdout if done.returncode == 0 else None


def build_side_target(parent: Build, target: str, defines: dict[str, str], *, suffix: str) -> Path:
    """Build one extra target of `parent`'s source with `parent`'s compiler, flags and options plus
    `defines` (e.g. LLAMA_BUILD_TESTS=ON for a llama.cpp test) in a side directory `<parent>-<suffix>`,
    keyed off the parent's key; returns the target's binary. The parent's own build, and so every cached
    build, stays without it. Same source paths and flags, so ccache serves everything the parent
    compiled; a failed or interrupted side build is removed like any other."""
    rb = _resolved_of(parent)
    side_rb = replace(rb, cmake_options={**rb.cmake_options, **defines})
    builds = cache_dir("builds")
    remove_abandoned_builds(builds)
    side_dir = builds / f"{parent.dir.name}-{suffix}"
    binary = side_dir / "bin" / target
    key = parent.manifest.get("key")
    label = f"{target} (side build of {parent.dir.name})"
    with FileLock(builds / f".{side_dir.name}.lock"):
        manifest_path = side_dir / "manifest.json"
        if manifest_path.is_file() and binary.is_file():
            try:
                if json.loads(manifest_path.read_text()).get("key") == key:
                    progress(f"{label}: reusing {side_dir}")
                    return binary
            except json.JSONDecodeError:
                pass
        start = time.monotonic()
        side_dir.mkdir(parents=True, exist_ok=True)
        manifest_path.unlink(missing_ok=True)
        kernel = list(parent.manifest.get("kernel_flags_applied", rb.kernel_flags()))
        if rb.pgo:  # the parent's trained profile, so its kernels compile as in the parent
            kernel += [f"-fprofile-use={parent.dir / 'pgo-data'}", "-fprofile-partial-training",
                       "-Wno-missing-profile"]
        source_lock = FileLock(Path(rb.source_dir + ".lock")) if not rb.in_place else contextlib.nullcontext()
        with _removed_unless_finished(side_dir), source_lock:
            if rb.in_place:
                _check_source_unchanged(rb, target)
            else:
                _prepare_worktree(Path(rb.repo), Path(rb.source_dir), rb.commit)
            _configure_and_build(side_rb, side_dir, (target,), label, kernel, [])
            if not binary.is_file():
                raise BuildError(f"{label} produced no {binary.relative_to(side_dir)}",
                                 next_step=f"check that this llama.cpp version defines the target {target}")
            write_text_atomic(manifest_path, json.dumps({
                "schema_version": SCHEMA_VERSION,
                "key": key,
                "parent": str(parent.dir),
                "target": target,
                "defines": defines,
                "build_seconds": round(time.monotonic() - start, 1),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }, indent=2) + "\n")
        progress(f"{label}: built in {time.monotonic() - start:.0f} s -> {side_dir}")
        return binary


def _isa_summary(rb: ResolvedBuild) -> dict:
    if not rb.isa_disabled:
        return {"disabled_flags": [], "reason": None}
    report = probe_isa()
    return {
        "disabled_flags": list(rb.isa_disabled),
        "reason": {name: report.detail[name] for name in report.faulting},
    }
