"""Remove what amppatch keeps: cached artifacts by kind, its worktrees, and `amppatch/*` branches of a repo."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from amppatch.errors import UsageError
from amppatch.paths import CACHE_KINDS, cache_root
from amppatch.proc import require_tool, run

BRANCH_PREFIX = "amppatch/"


@dataclass(frozen=True)
class CleanOptions:
    kinds: tuple[str, ...] = tuple(CACHE_KINDS)
    repo: Path | None = None  # also delete this repo's amppatch/* branches
    dry_run: bool = False


@dataclass(frozen=True)
class Item:
    kind: str
    path: str  # a directory, or `repo:branch` for a branch
    bytes: int


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed while we walk
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _main_repo_of_worktree(worktree: Path) -> Path | None:
    """A linked worktree's `.git` file points into <main>/.git/worktrees/<name>."""
    pointer = worktree / ".git"
    if not pointer.is_file():
        return None
    text = pointer.read_text().strip()
    if not text.startswith("gitdir:"):
        return None
    gitdir = Path(text.split(":", 1)[1].strip())
    return gitdir.parent.parent.parent if gitdir.parent.name == "worktrees" else None


def _branches(repo: Path) -> list[str]:
    git = require_tool("git", install_hint="install git")
    out = run([git, "-C", str(repo), "for-each-ref", "--format=%(refname:short)", f"refs/heads/{BRANCH_PREFIX}"])
    return [b for b in out.stdout.split() if b]


def plan_clean(options: CleanOptions) -> list[Item]:
    unknown = [k for k in options.kinds if k not in CACHE_KINDS]
    if unknown:
        raise UsageError(f"unknown kind(s): {', '.join(unknown)}", next_step=f"use {', '.join(CACHE_KINDS)}")
    items: list[Item] = []
    root = cache_root()
    for kind in options.kinds:
        folder = root / kind
        if folder.is_dir():
            for entry in sorted(folder.iterdir()):
                items.append(Item(kind, str(entry), _size(entry)))
    if options.repo is not None:
        repo = Path(options.repo).expanduser().resolve()
        if not (repo / ".git").exists():
            raise UsageError(f"{repo} is not a git repository", next_step="pass the llama.cpp repo given to apply")
        items.extend(Item("branches", f"{repo}:{b}", 0) for b in _branches(repo))
    return items


def execute_clean(items: list[Item]) -> None:
    git = shutil.which("git")
    for item in items:
        if item.kind == "branches":
            repo, branch = item.path.split(":", 1)
            if git:
                run([git, "-C", repo, "branch", "-D", branch], check=False)
            continue
        path = Path(item.path)
        main = _main_repo_of_worktree(path) if item.kind == "worktrees" else None
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if main is not None and git:
            run([git, "-C", str(main), "worktree", "prune"], check=False)
